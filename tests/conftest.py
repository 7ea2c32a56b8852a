"""Fixtures: real `fuseport serve` processes on loopback, ready when gRPC health says SERVING."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuseport.client import Client


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    store_dir: Path
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def wait_until_serving(target: str, timeout: float = 120) -> None:
    """Blocks on the health Watch stream until the server says SERVING."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stream = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=True)
        for resp in stream:
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                stream.cancel()
                return
    raise TimeoutError(f"{target} never reported SERVING")


def start_server(tmp: Path, store_dir: Path | None = None, *args: str, port: int = 0) -> ServerProcess:
    """Starts `fuseport serve` on 127.0.0.1, returns once it is SERVING. The device
    is the CPU unless `args` names another (the last flag wins)."""
    tmp.mkdir(parents=True, exist_ok=True)
    store_dir = store_dir or tmp / "store"
    port_file = tmp / "port"
    port_file.unlink(missing_ok=True)
    log_path = tmp / "server.log"
    cmd = [
        sys.executable, "-m", "fuseport.client.cli", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--port-file", str(port_file),
        "--store-dir", str(store_dir), "--device", "cpu", *args,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSEPORT_")}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    # The port is known only once bound; the file is written atomically after start.
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"server did not bind:\n{log_path.read_text()}")
        time.sleep(0.05)
    server = ServerProcess(proc, int(port_file.read_text()), store_dir, log_path)
    wait_until_serving(server.target)
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the whole session: the first CPU compile is slow (10-20 s)."""
    s = start_server(tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.target, timeout=120) as c:
        yield c
