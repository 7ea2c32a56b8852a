"""`fuseport serve --processes N`: a supervisor and N share-nothing serving processes on one port.

Each serving process is a complete server (`server.app.serve`, `process=i`): its
own gRPC server, event loop, executor and caches, bound to the same port with
SO_REUSEPORT, so the kernel spreads new connections over them, and serving the
same store (see server/registry.py for how a kernel registered through one is
found by the others). The supervisor imports torch only to count GPUs (`--device all`): it holds
the port (a bound, never listening SO_REUSEPORT socket, so `--port 0` gives one
port that every process, and every restart, binds), starts the processes,
restarts one that dies (with backoff; it gives up on one that keeps dying),
forwards SIGTERM/SIGINT (every process drains, then the supervisor exits 0) and
SIGHUP (reread TLS files and tokens), and serves `--metrics-port` with every
process's metrics labelled `process="i"`.

Health needs nothing of its own: every process serves gRPC health on the shared
port, so a check is answered SERVING by whichever live process takes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuseport.server.settings import Settings
from fuseport.server.shm import default_page_lock_bytes
from fuseport.server.streams import default_buffer_bytes
from fuseport.wire._local import read_named_port, write_port_file

__all__ = ["Supervisor", "devices_of", "plan_processes"]

log = logging.getLogger(__name__)

# A process that dies within this many seconds of its start counts towards
# --restart-limit; one that ran longer starts the count again.
STABLE_SECONDS = 60.0
# Restart delay after the n-th quick death in a row: FIRST * 2**(n-1), at most MAX.
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
# On SIGTERM, time beyond --grace-seconds before a process that has not ended is killed.
STOP_SLACK_SECONDS = 30.0
# server.app.EXIT_RUNAWAY_KERNEL (not imported: the supervisor stays free of the server's imports).
_EXIT_RUNAWAY_KERNEL = 4


def devices_of(device: str) -> list[str]:
    """The devices `--device` names: `all` (every CUDA device, else the CPU), a
    comma-separated list, or one device. Only `all` imports torch."""
    if device == "all":
        import torch

        n = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
    names = [d.strip() for d in device.split(",") if d.strip()]
    if not names:
        raise ValueError(f"device {device!r} names no device")
    return names


# --processes 0 on a GPU: one serving process per this many cores of the device's
# share, at most PROCESSES_PER_GPU_MAX. One process saturates its GIL (its event
# loop and gRPC's call machinery) long before a GPU is busy with small calls; see
# docs/perf.md ("Serving processes by default") for the measurement behind both.
CORES_PER_PROCESS = 4
PROCESSES_PER_GPU_MAX = 4


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, bounded by a cgroup v2 CPU
    quota (a container's `--cpus` or a Kubernetes CPU limit), which affinity does not show."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    return cores


def _is_gpu(devices: list[str]) -> bool:
    if devices == ["auto"]:
        import torch  # only here: what `auto` means depends on the machine

        return torch.cuda.is_available()
    return all(d.startswith("cuda") for d in devices)


def plan_processes(settings: Settings, cores: int | None = None) -> tuple[int, list[str]]:
    """(processes, devices); process i serves devices[i % len(devices)].

    --processes N is N. The default (0) is one process per device on the CPU (more
    processes would only share the same cores), and on GPUs one per CORES_PER_PROCESS
    usable cores of each device's share, at most PROCESSES_PER_GPU_MAX per device."""
    devices = devices_of(settings.device)
    if settings.processes:
        return settings.processes, devices
    if not _is_gpu(devices):
        return len(devices), devices
    share = (usable_cores() if cores is None else cores) // len(devices)
    per_device = max(1, min(PROCESSES_PER_GPU_MAX, share // CORES_PER_PROCESS))
    return per_device * len(devices), devices


@dataclass
class _Slot:
    """One serving process's place: the process now in it and its history."""

    index: int
    device: str
    port_file: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    serving: bool = False
    metrics_port: int | None = None
    quick_deaths: int = 0  # deaths in a row within STABLE_SECONDS of a start
    restarts: int = 0
    start_at: float | None = 0.0  # when to start it next; None: not to be started
    gave_up: bool = False
    ever_served: bool = False


@dataclass
class Supervisor:
    settings: Settings
    processes: int
    devices: list[str]
    slots: list[_Slot] = field(default_factory=list)

    def run(self) -> int:
        """Serves until SIGTERM/SIGINT (exit status 0 once every process drained), or
        until every process has died too often (1)."""
        # Installed before the port is held: a SIGTERM from here on is read as a stop.
        with _Signals(hup=self.settings.tls or self.settings.auth_tokens is not None) as signals, \
                _reserve_port(self.settings.host, self.settings.port) as port, _private_dir() as private:  # fmt: skip
            self.slots = [
                _Slot(i, self.devices[i % len(self.devices)], private / f"port-{i}")
                for i in range(self.processes)
            ]
            metrics = self._metrics()
            log.info(
                "supervisor %d: %d serving processes on %s:%d (devices %s, store %s)",
                os.getpid(), self.processes, self.settings.host, port, ", ".join(self.devices), self.settings.store_dir,
            )  # fmt: skip
            announced = False
            got: set[int] = set()
            try:
                while not got & _STOP_SIGNALS:
                    now = time.monotonic()
                    self._reap(now)
                    if all(s.gave_up for s in self.slots):
                        log.error(
                            "every serving process died %d times in a row: giving up",
                            self.settings.restart_limit + 1,
                        )
                        return 1
                    self._start_due(now, port)
                    self._check_serving()
                    if not announced and all(s.serving or s.gave_up for s in self.slots):
                        announced = True
                        if self.settings.port_file is not None:
                            others = {} if metrics is None else {"metrics": metrics.server_address[1]}
                            write_port_file(self.settings.port_file, port, others)
                        log.info("all %d serving processes started", self.processes)
                    if signal.SIGHUP in got:
                        # Not to a process still starting: it has no handler yet (SIGHUP would end
                        # it), and it reads the files as it starts anyway.
                        self._signal_all(signal.SIGHUP, serving_only=True)
                    # Short waits only while a process is starting (its port file is awaited).
                    starting = any(s.proc is not None and not s.serving for s in self.slots)
                    got = signals.wait(0.05 if starting else self._next_due(time.monotonic()))
                return self._stop()
            finally:
                if metrics is not None:
                    metrics.shutdown()
                    metrics.server_close()
                for s in self.slots:  # only after an error above: _stop waited for them
                    if s.proc is not None and s.proc.poll() is None:
                        s.proc.kill()
                        s.proc.wait()

    # ------------------------------------------------------------------ processes

    def _child_settings(self, slot: _Slot, port: int) -> Settings:
        # Unset: the host's share, divided among the processes (each holds its own streams).
        buffers = self.settings.max_stream_buffer_bytes or default_buffer_bytes(self.processes)
        locked = self.settings.shared_memory_page_lock_bytes
        return self.settings.replace(
            port=port,
            port_file=slot.port_file,
            device=slot.device,
            processes=1,
            metrics_port=None if self.settings.metrics_port is None else 0,
            max_stream_buffer_bytes=buffers,
            shared_memory_page_lock_bytes=default_page_lock_bytes(self.processes) if locked is None else locked,
        )

    def _start(self, slot: _Slot, port: int) -> None:
        slot.port_file.unlink(missing_ok=True)
        settings = _encode(self._child_settings(slot, port))
        cmd = [
            sys.executable,
            "-m",
            "fuseport.server.supervisor",
            "--child",
            str(slot.index),
            str(os.getpid()),
            settings,
        ]
        # Its output goes where the supervisor's goes; its log lines start with [index].
        slot.proc = subprocess.Popen(cmd)
        slot.started = time.monotonic()
        slot.serving = False
        slot.metrics_port = None
        slot.start_at = None
        log.info("process %d: started, pid %d, device %s", slot.index, slot.proc.pid, slot.device)

    def _start_due(self, now: float, port: int) -> None:
        for s in self.slots:
            if s.proc is None and s.start_at is not None and s.start_at <= now:
                self._start(s, port)

    def _next_due(self, now: float) -> float:
        due = [s.start_at - now for s in self.slots if s.proc is None and s.start_at is not None]
        return max(0.0, min(due)) if due else 1.0

    def _check_serving(self) -> None:
        for s in self.slots:
            if s.proc is not None and not s.serving and s.port_file.exists():
                s.serving = s.ever_served = True
                s.metrics_port = read_named_port(s.port_file, "metrics")
                log.info("process %d: serving (pid %d)", s.index, s.proc.pid)

    def _reap(self, now: float) -> None:
        for s in self.slots:
            if s.proc is None or (code := s.proc.poll()) is None:
                continue
            ran = now - s.started
            s.proc = None
            s.serving = False
            how = f"signal {-code}" if code < 0 else f"status {code}"
            if code == _EXIT_RUNAWAY_KERNEL:
                # It retired because a caller's kernel would not stop (server/watchdog.py): not
                # a process that cannot start, so not counted towards giving up on it, which
                # would let callers take the server down for good by repeating such calls.
                s.quick_deaths = 0
                s.restarts += 1
                s.start_at = now + BACKOFF_FIRST_SECONDS
                log.warning(
                    "process %d retired (%s) after %.1f s: a kernel ran on past its call's limit and "
                    "--overrun-grace-seconds; restarting it in %.1f s", s.index, how, ran, BACKOFF_FIRST_SECONDS,
                )  # fmt: skip
                continue
            s.quick_deaths = s.quick_deaths + 1 if ran < STABLE_SECONDS else 1
            if s.quick_deaths > self.settings.restart_limit:
                s.gave_up = True
                s.start_at = None
                log.error(
                    "process %d died (%s) %d times in a row, each within %.0f s of its start: not restarting it "
                    "(--restart-limit %d); %d of %d processes serve",
                    s.index, how, s.quick_deaths, STABLE_SECONDS, self.settings.restart_limit,
                    sum(x.proc is not None for x in self.slots), self.processes,
                )  # fmt: skip
                continue
            delay = min(BACKOFF_FIRST_SECONDS * 2 ** (s.quick_deaths - 1), BACKOFF_MAX_SECONDS)
            s.restarts += 1
            s.start_at = now + delay
            log.warning(
                "process %d died (%s) after %.1f s: restarting it in %.1f s", s.index, how, ran, delay
            )

    def _signal_all(self, sig: int, serving_only: bool = False) -> None:
        for s in self.slots:
            if s.proc is not None and s.proc.poll() is None and (s.serving or not serving_only):
                s.proc.send_signal(sig)

    def _stop(self) -> int:
        """Every process drains (its gate answers UNAVAILABLE, in-flight calls finish), then ends."""
        log.info("supervisor: stopping %d processes", sum(s.proc is not None for s in self.slots))
        for s in self.slots:
            s.start_at = None
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace_seconds + STOP_SLACK_SECONDS
        status = 0
        for s in self.slots:
            if s.proc is None:
                continue
            try:
                code = s.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("process %d did not end in time: killing it", s.index)
                s.proc.kill()
                code = s.proc.wait()
            # Killed by our own SIGTERM before its handler was installed (still starting): fine.
            if code not in (0, -signal.SIGTERM):
                log.warning("process %d ended with status %d", s.index, code)
                status = 1
        log.info("supervisor: exiting with status %d", status)
        return status

    # ------------------------------------------------------------------ metrics

    def _metrics(self) -> Any:
        """Binds --metrics-port: every serving process's metrics, each series labelled
        process="INDEX" (its place, the same across restarts), and the supervisor's own."""
        if self.settings.metrics_port is None:
            return None
        from prometheus_client import CollectorRegistry, make_wsgi_app

        from fuseport.server._http import bind_http
        from fuseport.server.app import CannotListen

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_ProcessesCollector(self))
        try:
            http = bind_http(self.settings.host, self.settings.metrics_port, make_wsgi_app(registry))
        except OSError as e:
            raise CannotListen(
                f"cannot serve metrics on {self.settings.host}:{self.settings.metrics_port} (--metrics-port): "
                f"{e.strerror or e}"
            ) from e
        threading.Thread(target=http.serve_forever, name="fuseport-metrics", daemon=True).start()
        return http


class _ProcessesCollector:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
        from prometheus_client.parser import text_string_to_metric_families

        families: dict[str, Any] = {}
        slots = list(self.supervisor.slots)
        for s in slots:
            port = s.metrics_port
            if port is None or not s.serving:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310
                    text = resp.read().decode("utf-8")
            except OSError as e:  # it died or is draining: its series are absent from this scrape
                log.info("metrics of process %d: %s", s.index, e)
                continue
            for family in text_string_to_metric_families(text):
                out = families.get(family.name)
                if out is None:
                    out = families[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    out.add_sample(sample[0], {**sample[1], "process": str(s.index)}, sample[2])
        yield from families.values()
        serving = GaugeMetricFamily(
            "fuseport_processes", "Serving processes of the supervisor, by state", labels=["state"]
        )
        states = [
            "serving" if s.serving else "starting" if s.proc else "gave_up" if s.gave_up else "waiting"
            for s in slots
        ]
        for state in ("serving", "starting", "waiting", "gave_up"):
            serving.add_metric([state], states.count(state))
        yield serving
        restarts = CounterMetricFamily(
            "fuseport_process_restarts",
            "Times the supervisor restarted a serving process",
            labels=["process"],
        )
        for s in slots:
            restarts.add_metric([str(s.index)], s.restarts)
        yield restarts


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class _Signals:
    """The supervisor's signals, for its one thread: each handler only adds the signal's
    number to a set (one C call: nothing a handler running inside another could wait on),
    and the C handler writes it to a pipe (`signal.set_wakeup_fd`) that `wait` sleeps on.

    Not a handler that sets a `threading.Event`: Python runs a handler in the main thread
    between any two bytecodes, inside another handler too, and `Event.set` takes a lock
    that is not reentrant. Two SIGCHLDs close together (two serving processes ending at
    once, as at every stop) then deadlocked the supervisor in its own handler: seen in CI,
    a supervisor that never exited after both its processes had. The set, not the pipe,
    says which signals came: a full pipe drops bytes, the set drops none."""

    def __init__(self, hup: bool) -> None:
        self.sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGCHLD]
        if hup:  # As a single server: SIGHUP rereads TLS files and tokens; without any it ends the process.
            self.sigs.append(signal.SIGHUP)
        self._read, self._write = os.pipe()
        self._came: set[int] = set()

    def __enter__(self) -> _Signals:
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._previous = {sig: signal.signal(sig, self._came_in) for sig in self.sigs}
        self._poll = select.poll()  # not select.select: it refuses descriptors past 1023
        self._poll.register(self._read, select.POLLIN)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._read)
        os.close(self._write)

    def _came_in(self, signum: int, _frame: Any) -> None:
        self._came.add(signum)

    def wait(self, timeout: float) -> set[int]:
        """The signals that came since the last call, after waiting up to `timeout` s for one."""
        if not self._came:
            # A signal from here on makes the pipe readable: poll returns (after running
            # the handler: an interrupted poll runs the handlers before it goes on).
            self._poll.poll(timeout * 1000)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass
        got, self._came = self._came, set()  # a handler running from here on adds to the new set
        return got


@contextlib.contextmanager
def _reserve_port(host: str, port: int) -> Iterator[int]:
    """Binds host:port (0: a free one) with SO_REUSEPORT and never listens: the port
    stays this supervisor's while its processes (which listen on it) come and go."""
    family, _, _, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as e:
            from fuseport.server.app import CannotListen

            raise CannotListen.port(host, port, e) from e
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


@contextlib.contextmanager
def _private_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fuseport-supervisor-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _encode(settings: Settings) -> str:
    return json.dumps(
        {
            f.name: str(v) if isinstance(v := getattr(settings, f.name), Path) else v
            for f in dataclasses.fields(settings)
        }
    )


def _decode(text: str) -> Settings:
    values = json.loads(text)
    for f in dataclasses.fields(Settings):
        if "Path" in str(f.type) and values.get(f.name) is not None:
            values[f.name] = Path(values[f.name])
    return Settings(**values)


def supervise(settings: Settings) -> int:
    """`fuseport serve` with more than one process (see the module's doc)."""
    processes, devices = plan_processes(settings)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="[supervisor] %(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from fuseport.server.app import CannotListen

    try:
        return Supervisor(settings, processes, devices).run()
    except CannotListen:
        raise  # the command says it in one line (exit 2), as for one process
    except OSError as e:
        log.error("%s", e)
        return 1


def _child(index: int, parent: int, encoded: str) -> int:
    """A serving process: ends with its supervisor (SIGTERM: it drains) however that ends."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor ended before the line above
        return 1
    settings = _decode(encoded)
    from fuseport.server.security import Security

    try:
        security = Security.load(settings)
    except ValueError as e:  # a TLS or tokens file gone or broken since the supervisor checked it
        print(f"[{index}] fuseport serve: {e}", file=sys.stderr)
        return 2
    from fuseport.server.app import serve

    serve(settings, security, process=index)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--child"] or len(sys.argv) != 5:
        sys.exit("this module is started by `fuseport serve --processes N`, not by hand")
    sys.exit(_child(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
