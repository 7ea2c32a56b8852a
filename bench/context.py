"""What every benchmark section is handed: the servers, a client, the device, the options."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fuseport.client import Client

__all__ = ["Context", "Options", "fuseport_server", "minor_faults", "sync_fn"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    quick: bool
    sizes: tuple[int, ...]
    iterations: int | None  # None: each section's defaults
    clients: tuple[int, ...]
    timeout: float


@dataclass
class Context:
    options: Options
    client: Client
    target: str
    echo_target: str
    server_pid: int | None  # None with --target: its page faults cannot be read
    echo_pid: int | None
    server_device: torch.device  # what the server reports (Describe)
    local_device: torch.device | None  # where in-process kernels run; None if not here
    cache: dict[str, Any] = field(default_factory=dict)
    # The TLS arguments the benchmark's own Client got, for client processes it starts.
    client_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return self.server_device.type == "cuda"

    def identity_key(self) -> int:
        """The key of `x + 0` on uint8, registered (idempotently) and compiled."""
        if "identity" not in self.cache:
            from fuseport.bench.kernels import identity

            x = torch.zeros(1024, dtype=torch.uint8)
            key = self.client.register(identity, [x])
            res = self.client.execute_detailed(key, [x], wait=True, timeout=self.options.timeout)
            if res.path != "fused":
                log.warning("the identity kernel runs %s (%s: %s)", res.path, res.reason, res.detail)
            self.cache["identity"] = key
        return self.cache["identity"]  # type: ignore[no-any-return]


def sync_fn(device: torch.device | None) -> Any:
    if device is not None and device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def minor_faults(pid: int | None = None) -> int | None:
    """Minor page faults so far of a process (all threads), from /proc; None if unreadable."""
    try:
        stat = Path(f"/proc/{pid or os.getpid()}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name; minflt is field 10 overall.
    rest = stat.rsplit(")", 1)[1].split()
    return int(rest[7])


@contextlib.contextmanager
def fuseport_server(
    device: str,
    env: dict[str, str] | None = None,
    timeout: float = 180.0,
    processes: int | None = None,
    store_dir: Path | None = None,
    python: str | None = None,
) -> Iterator[tuple[str, int]]:
    """`fuseport serve` on 127.0.0.1 and a free port, with a fresh store (or
    `store_dir`); yields (target, pid) once gRPC health says SERVING. `env` is
    added to its environment; `processes`: its --processes (None: its default);
    `python`: the interpreter that runs it (another checkout's, to compare two versions)."""
    from fuseport.wire._local import read_port_file, stop_process, wait_until_serving

    with tempfile.TemporaryDirectory(prefix="fuseport-bench-") as tmp:
        port_file = Path(tmp) / "port"
        log_path = Path(tmp) / "server.log"
        cmd = [
            python or sys.executable, "-m", "fuseport.cli", "serve",
            "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
            "--store-dir", str(store_dir or Path(tmp) / "store"), "--device", device,
            *(("--processes", str(processes)) if processes is not None else ()),
        ]  # fmt: skip
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

        def tail() -> str:
            return "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])

        try:
            target = f"127.0.0.1:{read_port_file(proc, port_file, 'fuseport serve', timeout, tail)}"
            wait_until_serving(target, timeout)
            log.info("fuseport server %s (pid %d, device %s, log %s)", target, proc.pid, device, log_path)
            yield target, proc.pid
        except BaseException:
            if proc.poll() is not None:
                log.error("server log:\n%s", tail())
            raise
        finally:
            stop_process(proc, timeout=30)
