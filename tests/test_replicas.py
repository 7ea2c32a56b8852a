"""Replicas: one client balances over several servers, survives one dying, and fills an empty one in one call."""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from fuseport.client import (
    AsyncClient,
    Client,
    FuseportError,
    InvalidGraph,
    KeyMismatch,
    ResourceExhausted,
    capture,
    key_for,
)
from fuseport.wire import _pb, codec
from fuseport.wire.errors import ERROR_METADATA_KEY, error_from_status
from fuseport.wire.security import bearer_metadata, channel_credentials
from fuseport.wire.targets import parse_target
from tests._certs import CA
from tests._replica_caller import affine as _affine
from tests._replica_caller import caller
from tests.conftest import ServerProcess, start_server

ADMIN = "adm1n-5c1d7e2f9a0b3c84"
USER = "us3r-8e4f2a6b1c9d0735"
# Compiling is beside the point: every call runs unfused, in microseconds.
FLAGS = ("--compile-mode", "off", "--metrics-port", "0")
# The graphs a call may carry are held to these in the guarded pair.
MAX_VARIANTS, MAX_GRAPH_BYTES = 3, 4096


@pytest.fixture(autouse=True)
def _no_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FUSEPORT_TOKEN", raising=False)


# ------------------------------------------------------------------- helpers


def _scrape(server: ServerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s[0], frozenset(s[1].items())): float(s[2])
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _calls(
    server: ServerProcess, methods: tuple[str, ...] = ("Execute", "Fallback"), code: str = "OK"
) -> float:
    """KernelService calls of `methods` the server finished with `code`, whatever their path."""
    total = 0.0
    for (name, labels), v in _scrape(server).items():
        d = dict(labels)
        if name == "fuseport_requests_total" and d["method"] in methods and d["code"] == code:
            total += v
    return total


def _wait_for(what: str, condition: Callable[[], bool], timeout: float = 120) -> None:
    """Polls a real condition (a server's counters) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _stored(server: ServerProcess, key: int) -> bool:
    return (server.store_dir / f"{key & 0xFFFF_FFFF_FFFF_FFFF:016x}.pb").exists()


# ------------------------------------------------------------------- targets


def test_a_list_of_host_port_becomes_one_ipv4_uri_with_the_shared_host_as_tls_name() -> None:
    t = parse_target(["localhost:5001", "localhost:5002"])
    assert t.uri == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert t.replicas and t.server_name == "localhost"
    assert parse_target("127.0.0.1:5001,127.0.0.1:5002").uri == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    dns = parse_target("dns:///fuseport.ns.svc:50051")
    assert dns.uri == "dns:///fuseport.ns.svc:50051" and dns.hosts == ("fuseport.ns.svc",) and dns.replicas
    assert parse_target(["127.0.0.1:5001"]).uri == "127.0.0.1:5001"  # one server: as given


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (["127.0.0.1:5001", "[::1]:5002"], "one family"),
        (["127.0.0.1", "127.0.0.1:5002"], "expected host:port"),
        (["127.0.0.1:5001", "127.0.0.1:99999"], "expected host:port"),
        ([], "no targets"),
    ],
)
def test_a_list_of_targets_gRPC_cannot_dial_is_refused_naming_why(target: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_target(target)


def test_tls_to_replicas_of_different_hosts_needs_a_server_name(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    with pytest.raises(ValueError, match="tls_server_name"):
        Client(["localhost:5001", "127.0.0.1:5002"], tls_ca=ca.cert, token="")
    # Given one, the client is made (nothing connects until a call).
    Client(
        ["localhost:5001", "127.0.0.1:5002"], tls_ca=ca.cert, tls_server_name="localhost", token=""
    ).close()


# ----------------------------------------------- a guarded pair: TLS, tokens, quotas


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    ca = CA(d)
    return {"ca": ca, "server": ca.issue("server", "fuseport server", server=True)}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any]) -> Iterator[list[ServerProcess]]:
    """Two replicas, each with its own (empty) store, behind TLS and tokens."""
    servers = []
    creds = channel_credentials(pki["ca"].cert)
    try:
        for name in ("a", "b"):
            tmp = tmp_path_factory.mktemp(f"replica-{name}")
            tokens = tmp / "tokens"
            tokens.write_text(f"{ADMIN} admin\n{USER} user\n")
            servers.append(start_server(
                tmp, None, *FLAGS, "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key),
                "--auth-tokens", str(tokens), "--max-variants", str(MAX_VARIANTS),
                "--max-graph-bytes", str(MAX_GRAPH_BYTES), credentials=creds,
            ))  # fmt: skip
        yield servers
    finally:
        for s in servers:
            s.stop()


def _raw_execute(
    server: ServerProcess,
    ca: CA,
    key: int,
    stack: list[Any],
    graphs: list[_pb.graph.Graph],
    token: str = ADMIN,
) -> list[Any] | FuseportError:
    """One Execute to one replica, as built by hand: the graphs a client would only send after NOT_FOUND."""
    request = codec.encode_execute_request(key, stack, graphs=graphs)
    with grpc.secure_channel(server.target, channel_credentials(ca.cert)) as channel:
        call = channel.unary_unary("/fuseport.v1.KernelService/Execute")
        try:
            return codec.decode_execute_response(
                call(request, timeout=30, metadata=bearer_metadata(token))
            ).stack
        except grpc.RpcError as e:
            name = dict(e.trailing_metadata() or ()).get(ERROR_METADATA_KEY)
            return error_from_status(e.code(), e.details() or "", name)


def _listed(server: ServerProcess, ca: CA) -> set[int]:
    with Client(server.target, tls_ca=ca.cert, token=ADMIN, timeout=30) as c:
        return {k.key for k in c.list()}


def test_a_replica_started_empty_gets_the_kernel_in_the_call_itself(
    pair: list[ServerProcess], pki: dict[str, Any]
) -> None:
    """Register reaches one replica; the first Execute that reaches the other
    gets NOT_FOUND and its retry carries the graph: never a second Register."""
    a, b = pair
    registers_before = sum(_calls(s, ("Register",)) for s in pair)
    not_found_before = sum(_calls(s, ("Execute", "Fallback"), "NOT_FOUND") for s in pair)
    x = torch.randn(8)
    with Client([a.target, b.target], tls_ca=pki["ca"].cert, token=ADMIN, timeout=30) as c:
        key = c.register(_affine, [x])
        for _ in range(200):  # round robin reaches both replicas within a few calls
            torch.testing.assert_close(c.execute(key, [x])[0], _affine(x))
            if _stored(a, key) and _stored(b, key):
                break
        assert _stored(a, key) and _stored(b, key), "both replicas hold the kernel, each in its own store"
        # Both replicas serve it now: a few more calls each.
        before = [_calls(s) for s in pair]
        for _ in range(20):
            torch.testing.assert_close(c.fallback(key, [x])[0], _affine(x))
    after = [_calls(s) for s in pair]
    assert all(n > m for n, m in zip(after, before)), f"round robin used both replicas: {before} -> {after}"
    assert sum(_calls(s, ("Register",)) for s in pair) == registers_before + 1, "one Register, on one replica"
    # Once: the calls after it carried the graph until one filled that replica
    # (not every other call answered NOT_FOUND, its retry filling the other one).
    not_found = sum(_calls(s, ("Execute", "Fallback"), "NOT_FOUND") for s in pair) - not_found_before
    assert not_found == 1, f"{not_found} calls found a replica without the kernel"
    assert key in _listed(a, pki["ca"]) and key in _listed(b, pki["ca"])


def test_a_user_tokens_graphs_go_into_its_own_namespace_on_every_replica(
    pair: list[ServerProcess], pki: dict[str, Any]
) -> None:
    a, _ = pair
    x = torch.randn(4)
    graph = capture(lambda x: x - 3, [x])
    key = key_for(graph)
    torch.testing.assert_close(_raw_execute(a, pki["ca"], key, [x], [graph], token=USER)[0], x - 3)  # type: ignore[index]
    assert key not in _listed(a, pki["ca"]), "registered as the user's own kernel, not a shared one"
    # The same graph sent by an admin is registered; the user then runs it without graphs.
    torch.testing.assert_close(_raw_execute(a, pki["ca"], key, [x], [graph])[0], x - 3)  # type: ignore[index]
    torch.testing.assert_close(_raw_execute(a, pki["ca"], key, [x], [], token=USER)[0], x - 3)  # type: ignore[index]


def test_graphs_whose_first_is_not_the_key_are_refused_and_nothing_is_registered(
    pair: list[ServerProcess], pki: dict[str, Any]
) -> None:
    a, _ = pair
    x = torch.randn(4)
    own, other = capture(lambda x: x * 5, [x]), capture(lambda x: x * 7, [x])
    for graphs in ([other], [other, own]):
        refused = _raw_execute(a, pki["ca"], key_for(own), [x], graphs)
        assert isinstance(refused, KeyMismatch), refused
        assert str(key_for(other)) in str(refused) and "graphs[0]" in str(refused)
    assert not {key_for(own), key_for(other)} & _listed(a, pki["ca"])


def test_more_graphs_than_a_kernel_may_have_variants_are_refused_before_any_is_built(
    pair: list[ServerProcess], pki: dict[str, Any]
) -> None:
    a, _ = pair
    graphs = [capture(lambda x: x * 11, [torch.ones(*[2] * rank)]) for rank in range(1, MAX_VARIANTS + 2)]
    key = key_for(graphs[0])
    refused = _raw_execute(a, pki["ca"], key, [torch.ones(2)], graphs)
    assert isinstance(refused, ResourceExhausted) and "--max-variants" in str(refused), refused
    assert key not in _listed(a, pki["ca"])


def test_an_oversized_graph_is_refused_naming_the_limit(
    pair: list[ServerProcess], pki: dict[str, Any]
) -> None:
    a, _ = pair
    weight = torch.arange(2000.0)
    graph = capture(lambda x: x + weight, [weight])
    assert graph.ByteSize() > MAX_GRAPH_BYTES
    refused = _raw_execute(a, pki["ca"], key_for(graph), [weight], [graph])
    assert isinstance(refused, ResourceExhausted) and "--max-graph-bytes" in str(refused), refused
    assert key_for(graph) not in _listed(a, pki["ca"])


def test_a_variant_that_takes_other_inputs_is_refused_and_the_server_keeps_serving(
    pair: list[ServerProcess], pki: dict[str, Any]
) -> None:
    a, _ = pair
    x = torch.randn(3)
    own, two_inputs = capture(lambda x: x * 13, [x]), capture(lambda x, y: x * y, [x, x])
    refused = _raw_execute(a, pki["ca"], key_for(own), [x], [own, two_inputs])
    assert isinstance(refused, InvalidGraph) and "graphs[1]" in str(refused), refused
    # A well-formed set, the kernel's own graph and a variant of another rank, is taken and runs.
    rank2 = capture(lambda x: x * 13, [torch.ones(2, 2)])
    y = torch.randn(2, 2)
    out = _raw_execute(a, pki["ca"], key_for(own), [y], [own, rank2])
    torch.testing.assert_close(out[0], y * 13)  # type: ignore[index]


# ------------------------------------------------------- failover under load


def test_four_client_processes_lose_no_call_when_replicas_die_under_load(tmp_path: Path) -> None:
    """Three replicas, four client processes in tight loops: one replica is
    SIGKILLed, then another SIGTERMed (it drains); every call succeeds with the
    right result, and the replicas left take over. One test for both deaths:
    the client processes (torch in each) are the costly part."""
    graph = capture(_affine, [torch.ones(64)]).SerializeToString()
    # Separate stores: a replica has only what the calls brought it.
    killed, drained, last = (
        start_server(tmp_path / name, None, *FLAGS) for name in ("killed", "drained", "last")
    )
    targets = [s.target for s in (killed, drained, last)]
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that holds gRPC threads
    stop, results = spawn.Event(), spawn.Queue()
    procs = [
        spawn.Process(target=caller, args=(targets, graph, stop, results, i), daemon=True) for i in range(4)
    ]

    def served(*servers: ServerProcess) -> list[float]:
        return [_calls(s) for s in servers]

    collected = []
    try:
        for p in procs:
            p.start()
        # Generous bounds: four processes import torch on a small machine first.
        _wait_for("every replica to serve 40 calls", lambda: min(served(killed, drained, last)) >= 40, 300)
        killed.stop(signal.SIGKILL)
        at = served(drained, last)
        _wait_for(
            "the others to serve 100 more each",
            lambda: min(n - m for n, m in zip(served(drained, last), at)) >= 100,
            300,
        )
        assert drained.stop(signal.SIGTERM) == 0, "a drained replica exits 0"
        at_last = _calls(last)
        _wait_for("the last replica to serve 200 more", lambda: _calls(last) >= at_last + 200, 300)
    finally:
        stop.set()
        collected = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        for s in (killed, drained, last):
            if s.proc.poll() is None:
                s.stop()
    failures = [f"client {i}: {f}" for i, _, fs in collected for f in fs]
    assert not failures, "\n".join(failures[:10])
    assert all(ok > 0 for _, ok, _ in collected), collected
    assert killed.proc.returncode == -signal.SIGKILL


def test_a_dns_target_reaches_a_tls_replica_by_its_name(
    pair: list[ServerProcess], pki: dict[str, Any]
) -> None:
    """dns:/// is how a Kubernetes headless Service is reached: its name is the one TLS checks."""
    a, _ = pair
    with Client(f"dns:///localhost:{a.port}", tls_ca=pki["ca"].cert, token=ADMIN, timeout=30) as c:
        assert c.health() == "SERVING"
        c.list()


def test_the_async_client_fills_an_empty_replica_the_same_way(
    pair: list[ServerProcess], pki: dict[str, Any]
) -> None:
    a, b = pair
    x = torch.randn(5)
    graph = capture(lambda x: x / 4, [x])

    async def run() -> None:
        async with AsyncClient([a.target, b.target], tls_ca=pki["ca"].cert, token=ADMIN, timeout=30) as c:
            key = await c.register(graph)
            for _ in range(200):
                torch.testing.assert_close((await c.execute(key, [x]))[0], x / 4)
                if _stored(a, key) and _stored(b, key):
                    return
            raise AssertionError("the kernel never reached both replicas")

    asyncio.run(run())
