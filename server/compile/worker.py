"""The compile worker: a separate process that turns (graph, ArgSpec, device) into a saved Inductor artifact.

Dynamo and Inductor hold the GIL for seconds at a time while they trace and
lower; in the serving process that stalled every request (p99 5-12x the
fallback's). Here they run in a process of their own, started with `spawn`
(torch is not fork-safe), which the serving process drives over a pipe:

- request: one JSON header (device, artifact path, compile mode, per input a
  tensor's dtype, sizes and dim order, or a scalar's value) and the graph's
  own IR bytes. No pickle crosses the pipe in either direction, and nothing a
  client sent but the graph itself (which the worker validates and rebuilds
  like any server does) and its inputs' sizes and scalar values: the compile
  traces fake tensors of those sizes, and one test run on zeros of them
  follows (build.compile_job).
- reply: one JSON object, {"ok": true, "seconds": s, ...what
  build.compile_job returns} once the artifact is at the path given, or
  {"ok": false, "error": "..."}. With "retire": true the worker's test runs
  passed the call budget (header "budget", --max-call-seconds) and one runs on:
  the worker is replaced before the next compile.

A worker that dies or passes the timeout is killed and replaced for the next
compile; the compile it ran is reported failed by `CompileWorker.compile`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["CompileCrashed", "CompileTimedOut", "CompileWorker", "FAULT_ENV"]

log = logging.getLogger(__name__)

# For tests only: makes the worker die ("crash": SIGKILL itself, as a segfault
# in the compiler would) or hang ("hang") on every compile it is given.
FAULT_ENV = "_FUSEPORT_DEBUG_COMPILE_FAULT"


# The most a worker may take to start, when the compile timeout is shorter.
_START_SECONDS = 300.0


class CompileCrashed(Exception):
    """The worker died during a compile."""


class CompileTimedOut(Exception):
    """The worker passed the compile timeout and was killed."""


class CompileWorker:
    """One worker process, started on first use and replaced when it dies or hangs.
    `compile` is called from one thread at a time (the executor's compile thread)."""

    def __init__(self, timeout: float, threads: int = 1) -> None:
        self.timeout = timeout
        self.threads = threads  # Inductor's compile processes in the worker (--compile-threads)
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._ready = False  # the worker said it is ready (imports and warm-up done)
        self.started = 0  # workers started so far (the first, and each replacement)

    def start(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.is_alive():
                return
            self._stop_locked()
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, self.threads), name="fuseport-compile-worker")
            proc.start()
            child.close()
            self._proc, self._conn = proc, parent
            self._ready = False
            self.started += 1
            log.info("compile worker %d started (pid %d)", self.started, proc.pid)

    def compile(self, header: dict[str, Any], graph: bytes) -> dict[str, Any]:
        self.start()
        proc, conn = self._proc, self._conn
        assert proc is not None and conn is not None
        try:
            if not self._ready:
                # Its start (importing torch, warming Inductor up: tens of seconds
                # on a busy CPU) is not part of any compile's timeout.
                self._wait(proc, conn, time.monotonic() + max(self.timeout, _START_SECONDS), "start")
                conn.recv_bytes()
                self._ready = True
            deadline = time.monotonic() + self.timeout
            conn.send_bytes(json.dumps(header).encode())
            conn.send_bytes(graph)
            self._wait(proc, conn, deadline, "compile")
            reply: dict[str, Any] = json.loads(conn.recv_bytes())
            if reply.pop("retire", False):
                # Its test runs passed the call budget and one still runs on a thread of
                # its own: only the worker's end stops it. The next compile starts a fresh one.
                log.info("compile worker %d replaced: a test run passed --max-call-seconds", self.started)
                self.stop()
            return reply
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError) as e:
            proc.join(5)
            code = proc.exitcode
            self.stop()
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise CompileCrashed(f"the compile worker died during this compile ({how})") from e

    def _wait(self, proc: Any, conn: Connection, deadline: float, what: str) -> None:
        """Until the worker has something to say; EOFError if it died meanwhile."""
        while not conn.poll(0.2):
            if not proc.is_alive():
                raise EOFError
            if time.monotonic() > deadline:
                self.stop()
                limit = self.timeout if what == "compile" else max(self.timeout, _START_SECONDS)
                raise CompileTimedOut(
                    f"the {what} passed its {limit:g} s timeout (--compile-timeout-seconds); its worker was killed"
                )

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(10)


def _worker_main(conn: Connection, threads: int = 1) -> None:
    """The worker process: compile requests, one at a time, until the pipe closes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s compile-worker %(levelname)s %(message)s")
    fault = os.environ.get(FAULT_ENV, "")
    # Ctrl-C in a terminal reaches the whole process group: the server decides
    # when its worker stops (it closes the pipe), not the terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Compiles are background work: on a machine with few cores they must not take
    # them from the serving process (p99 of requests during a compile, 2 cores:
    # 2.3x the fallback's with the worker at the same priority and Inductor's
    # compile threads on every core).
    with contextlib.suppress(OSError):
        os.nice(10)
    if not fault:  # a worker that only crashes or hangs need not spend seconds on imports
        from fuseport.server.compile.torch_config import (
            configure_compiler,
            prepare_inductor,
            set_compile_threads,
        )

        set_compile_threads(threads)
        prepare_inductor()
        configure_compiler()
        _warm_up()
    from fuseport.server.compile.build import EagerRefuses, compile_job

    try:
        conn.send_bytes(b'{"ready": true}')
    except (EOFError, OSError):
        return
    while True:
        try:
            header = json.loads(conn.recv_bytes())
            graph = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the server closed the pipe or died
        if fault == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "hang":
            threading.Event().wait()
        start = time.perf_counter()
        try:
            reply: dict[str, Any] = {"ok": True, **compile_job(header, graph)}
            reply["seconds"] = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - every failure goes back to the server as text
            log.debug("compile failed", exc_info=e)
            text = str(e).strip().splitlines()
            reply = {"ok": False, "error": f"{type(e).__name__}: {text[0] if text else ''}"[:500]}
            if isinstance(e, EagerRefuses):
                reply = {"ok": False, "refused": str(e)}
        try:
            conn.send_bytes(json.dumps(reply).encode())
        except (EOFError, OSError):
            return


def _warm_up() -> None:
    """Inductor's first compile in a process imports and builds much (the C++
    header on CPU: 10-20 s): paid at start, before a request waits on it."""
    import torch

    start = time.perf_counter()
    try:
        torch.compile(lambda t: t * 2 + 1, dynamic=True, fullgraph=True)(torch.ones(8))
        import torch._inductor.config as inductor_config

        log.info("warmed up in %.1f s (Inductor compile threads: %d)", time.perf_counter() - start,
                 inductor_config.compile_threads)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a real compile will report the problem
        log.warning("warm-up failed: %s", e)
