"""Local server processes: the port file a server writes, and how its starter waits on it and stops it.

Used by `fuseport serve --port-file`, the demo's own server, the benchmark's
servers and the tests: one protocol, one implementation.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuseport.wire.security import open_channel

__all__ = ["read_named_port", "read_port_file", "stop_process", "wait_until_serving", "write_port_file"]


def write_port_file(path: Path, port: int, others: Mapping[str, int] | None = None) -> None:
    """The gRPC port on the first line, as ever; then one `name=port` line for
    each other port the server bound (`metrics=9090`), so that one atomic write
    tells a reader every port once the file exists."""
    lines = [str(port)] + [f"{name}={p}" for name, p in (others or {}).items()]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)  # readers never see a half-written file


def read_named_port(path: Path, name: str) -> int | None:
    """The `name=port` line of a port file, if the server bound that port."""
    for line in path.read_text().splitlines()[1:]:
        key, _, value = line.partition("=")
        if key == name:
            return int(value)
    return None


def read_port_file(
    proc: subprocess.Popen[bytes],
    path: Path,
    what: str,
    timeout: float = 120,
    log: Callable[[], str] = lambda: "",
) -> int:
    """The port `proc` bound, once its port file appears (written after binding).

    Raises RuntimeError if the process exits first, TimeoutError (after killing
    it) if the file does not appear in time; both end with `log()`."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{what} did not bind in {timeout:.0f} s:\n{log()}")
        time.sleep(0.05)
    return int(path.read_text().splitlines()[0])


def wait_until_serving(
    target: str, timeout: float = 120, credentials: grpc.ChannelCredentials | None = None
) -> None:
    """Blocks on the gRPC health Watch stream until the server says SERVING.

    `credentials` for a TLS server (see `fuseport.wire.security.channel_credentials`);
    health needs no token, so none is sent."""
    with open_channel(target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stream = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=True)
        for resp in stream:
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                stream.cancel()
                return
    raise TimeoutError(f"{target} never reported SERVING")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60, sig: int = signal.SIGTERM) -> int:
    """Sends `sig` (SIGTERM: the server drains), then kills it if it outlives `timeout`."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
