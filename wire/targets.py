"""What a client's target names: one server, or several replicas behind one gRPC target URI.

gRPC balances over the addresses its resolver returns, and Python cannot plug
in a resolver of its own. So several replicas reach a channel as one of:

* ``dns:///fuseport.ns.svc:50051``: gRPC's DNS resolver returns every address
  of the name (a Kubernetes headless Service has one per ready pod), and
  resolves again when a connection fails;
* ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` (or ``ipv6:[::1]:5001,[::1]:5002``):
  fixed addresses, as gRPC itself spells them;
* a list ``["host1:50051", "host2:50051"]`` (or one string of them joined by
  commas): each host is resolved here, once, and the list becomes an ``ipv4:``
  URI (``ipv6:`` when every host has only IPv6 addresses: gRPC takes one family
  per URI). Hosts that move need ``dns:///`` instead.

TLS checks the server's certificate against the channel's authority, the host
of a single target or of a ``dns:///`` one. An ``ipv4:`` list has no such host,
so `Target.server_name` is the one host name the list's entries share (the
client passes it to gRPC as the name to check); entries with different hosts
need the caller's ``tls_server_name``, a name every replica's certificate carries.

Nothing here imports torch: the CLI's health check uses it.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PROCESS_METADATA_KEY", "Target", "parse_target"]

# Behind one port, several serving processes (`fuseport serve --processes N`):
# every KernelService response carries this trailing metadata, "INDEX PID" of
# the process that answered (the client's ExecuteResult.process).
PROCESS_METADATA_KEY = "fuseport-process"

# gRPC's own URI schemes that can name several addresses or none of a host (unix).
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")


@dataclass(frozen=True)
class Target:
    uri: str  # what the channel dials
    hosts: tuple[str, ...]  # the hosts named (for the loopback check); () for unix sockets
    replicas: bool  # several addresses, or a resolver that may return several
    server_name: str | None  # for TLS when `uri` carries no single host; None: the URI's own authority


def _split_host_port(entry: str) -> tuple[str, str]:
    """("host", "port") of "host:port" or "[v6]:port"; ValueError naming the entry otherwise."""
    entry = entry.strip()
    if entry.startswith("["):
        host, sep, port = entry[1:].partition("]:")
    else:
        host, sep, port = entry.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target {entry!r}: expected host:port (an IPv6 address in brackets: [::1]:50051)")
    return host, port


def _resolve(host: str, port: str) -> tuple[list[str], list[str]]:
    """(IPv4 addresses, IPv6 addresses) of `host`, each once, in the resolver's order."""
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"target {host}:{port}: cannot resolve {host!r}: {e.strerror or e}") from None
    v4: list[str] = []
    v6: list[str] = []
    for family, _, _, _, sockaddr in infos:
        into = v4 if family == socket.AF_INET else v6 if family == socket.AF_INET6 else None
        if into is not None and sockaddr[0] not in into:
            into.append(str(sockaddr[0]))
    return v4, v6


def _from_list(entries: Sequence[str]) -> Target:
    parsed = [_split_host_port(e) for e in entries]
    if not parsed:
        raise ValueError("no targets given")
    hosts = tuple(h for h, _ in parsed)
    shared = hosts[0] if len(set(hosts)) == 1 else None
    if len(parsed) == 1:
        host, port = parsed[0]
        return Target(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", hosts, False, None)
    resolved = [(_resolve(h, p), p) for h, p in parsed]
    if all(v4 for (v4, _), _ in resolved):
        family = "ipv4"
    elif all(v6 for (_, v6), _ in resolved):
        family = "ipv6"
    else:
        raise ValueError(
            f"targets {', '.join(entries)}: some hosts have only IPv4 addresses and others only IPv6; "
            "gRPC takes one family in a list of addresses: use dns:///NAME:PORT or addresses of one family"
        )
    addresses: list[str] = []
    for (v4, v6), port in resolved:
        for a in v4 if family == "ipv4" else v6:
            address = f"{a}:{port}" if family == "ipv4" else f"[{a}]:{port}"
            if address not in addresses:
                addresses.append(address)
    return Target(f"{family}:{','.join(addresses)}", hosts, True, shared)


def parse_target(target: str | Sequence[str]) -> Target:
    """The target URI for a channel to `target`: "host:port", a gRPC URI
    (dns:///, ipv4:, ipv6:, unix:), a comma-separated or Python list of host:port."""
    if not isinstance(target, str):
        return _from_list(list(target))
    target = target.strip()
    if target.startswith(_SCHEMES):
        scheme, _, rest = target.partition(":")
        if scheme in ("unix", "unix-abstract"):
            return Target(target, (), False, None)
        if scheme == "dns":
            # dns:[//authority/]host[:port]: the DNS server's authority is not a replica.
            name = rest[2:].partition("/")[2] if rest.startswith("//") else rest
            host = name[1:].partition("]")[0] if name.startswith("[") else name.rpartition(":")[0] or name
            return Target(target, (host,), True, None)
        entries = [_split_host_port(e) for e in rest.split(",")]
        hosts = tuple(h for h, _ in entries)
        shared = hosts[0] if len(set(hosts)) == 1 else None
        return Target(target, hosts, len(entries) > 1, shared if len(entries) > 1 else None)
    if "," in target:
        return _from_list([e for e in target.split(",") if e.strip()])
    host = target[1:].partition("]")[0] if target.startswith("[") else target.rpartition(":")[0] or target
    return Target(target, (host,), False, None)
