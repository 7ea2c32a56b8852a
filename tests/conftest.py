"""Fixtures: real `fuseport serve` processes on loopback, ready when gRPC health says SERVING."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fuseport.client import Client
from fuseport.wire._local import read_named_port, read_port_file, stop_process, wait_until_serving


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    store_dir: Path
    log_path: Path
    metrics_port: int | None = None  # with --metrics-port: the port its metrics endpoint bound

    @property
    def metrics_url(self) -> str:
        assert self.metrics_port is not None, "started without --metrics-port"
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        """One sample of its Prometheus metrics (started with --metrics-port), by its full name and labels."""
        with urllib.request.urlopen(self.metrics_url, timeout=30) as resp:  # noqa: S310 - loopback
            text = resp.read().decode()
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert found, f"no {name} in the metrics"
        return float(found.group(1))

    def rss(self) -> int:
        """The server's resident memory in bytes (Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc/PID/status")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        return stop_process(self.proc, timeout, sig)


def start_server(
    tmp: Path,
    store_dir: Path | None = None,
    *args: str,
    port: int = 0,
    credentials: grpc.ChannelCredentials | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Starts `fuseport serve` on 127.0.0.1, returns once it is SERVING. The device
    is the CPU unless `args` names another (the last flag wins). `credentials`
    to wait for a server started with --tls-cert/--tls-key (health needs no token).
    Its environment has no FUSEPORT_* variable but those of `env`."""
    tmp.mkdir(parents=True, exist_ok=True)
    store_dir = store_dir or tmp / "store"
    port_file = tmp / "port"
    port_file.unlink(missing_ok=True)
    log_path = tmp / "server.log"
    cmd = [
        sys.executable, "-m", "fuseport.cli", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--port-file", str(port_file),
        "--store-dir", str(store_dir), "--device", "cpu", *args,
    ]  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FUSEPORT_")} | (env or {})
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=environ)
    port = read_port_file(proc, port_file, "fuseport serve", log=log_path.read_text)
    server = ServerProcess(proc, port, store_dir, log_path, read_named_port(port_file, "metrics"))
    wait_until_serving(server.target, credentials=credentials)
    return server


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow", action="store_true", help="also run the tests marked slow (the exhaustive slices, minutes more)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow are deselected (not skipped: they are not run, and say so) unless --slow."""
    if config.getoption("--slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the whole session: the first CPU compile is slow (10-20 s).
    Its metrics are on, so every test that uses it also runs the counting hooks
    (test_metrics reads its compile counts)."""
    s = start_server(tmp_path_factory.mktemp("server"), None, "--metrics-port", "0")
    yield s
    s.stop()


def _cuda_server(tmp_path_factory: pytest.TempPathFactory, name: str, *flags: str) -> Iterator[ServerProcess]:
    import torch

    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (run them with scripts/gpu_check.sh)")
    s = start_server(tmp_path_factory.mktemp(name), None, "--device", "cuda", *flags)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def cuda_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One CUDA server for the `gpu` tests of the session."""
    yield from _cuda_server(tmp_path_factory, "cuda")


@pytest.fixture(scope="session")
def cuda_staging_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A CUDA server with small-tensor staging on (--cuda-staging-bytes; off by default)."""
    yield from _cuda_server(tmp_path_factory, "cuda-staging", "--cuda-staging-bytes", "1048576")


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.target, timeout=120) as c:
        yield c
