"""Prometheus metrics of a server, and the HTTP endpoint that serves them (`--metrics-port`).

Counting happens at the points that already exist: the servicer tells its
`CallObserver` of every finished call (method, status code, path, reason,
timings, bytes) and the executor its `ExecutorEvents` (compiles, evictions).
What is a state rather than an event (kernels registered, cache entries,
memory) is read when Prometheus scrapes. docs/guides/metrics.md lists
every metric; `fuseport stats` reads them back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from fuseport.server.batching import BatchEvents
from fuseport.server.executor import ExecutorEvents
from fuseport.server.rpc.plumbing import CallObserver, CallRecord
from fuseport.wire import _pb

if TYPE_CHECKING:
    from fuseport.server.core import Core
    from fuseport.server.rpc.poll import BusyPoll
    from fuseport.server.rpc.share import WorkerShare
    from fuseport.server.shm import SharedMemory

__all__ = ["Metrics"]

log = logging.getLogger(__name__)

# Seconds. Small calls take tens of microseconds on the server, a large message or
# a wait for a compile tens of seconds: the default buckets (5 ms to 10 s) would put
# every small call in the first one.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# A first CPU compile takes 10-20 s, a later one about a second; max-autotune minutes.
COMPILE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

# Calls per batched launch: powers of two up to the largest --max-batch.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

_STAGES = ("decode", "queue", "run", "encode")


def _path_label(path: int) -> str:
    """fused, fallback, or none (a call that ran no kernel: another method, or an error)."""
    if path == _pb.service.PATH_UNSPECIFIED:
        return "none"
    return _pb.service.Path.Name(path).removeprefix("PATH_").lower()


def _reason_label(reason: int) -> str:
    """The documented names (docs/guides/compiling.md) (requested, compiling, ...), none when no fallback ran."""
    if reason == _pb.service.FALLBACK_REASON_UNSPECIFIED:
        return "none"
    return _pb.service.FallbackReason.Name(reason).removeprefix("FALLBACK_REASON_").lower()


class Metrics(CallObserver, ExecutorEvents, BatchEvents):
    """The metrics of one server, in a registry of its own (not prometheus_client's
    global one: several servers in one process, as in tests, each count their own)."""

    def __init__(
        self,
        core: Core,
        shared: SharedMemory | None = None,
        share: WorkerShare | None = None,
        poll: BusyPoll | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fuseport_requests", "Calls finished (KernelService and KServe v2 methods), by method, path, fallback reason and status code",
            ["method", "path", "reason", "code"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "fuseport_request_duration_seconds",
            "Server-side time of a call (KernelService or KServe v2), from its handler's start to its response or error",
            ["method", "path"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.stages = Histogram(
            "fuseport_request_stage_seconds",
            "Stages of a successful Execute, Fallback or ModelInfer, as in Execute's Timings: decode, queue, run, encode",
            ["method", "stage"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.received = Counter(
            "fuseport_received_bytes", "Request message bytes received, by method", ["method"], registry=r
        )
        self.sent = Counter(
            "fuseport_sent_bytes", "Response message bytes sent, by method (0 for an error)", ["method"], registry=r
        )
        self.compiles = Counter(
            "fuseport_compiles", "Kernel compiles finished, by outcome (ok: fused kernel ready; failed: served unfused)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.compile_seconds = Histogram(
            "fuseport_compile_seconds", "Time of each kernel compile, whatever its outcome",
            buckets=COMPILE_BUCKETS, registry=r,
        )  # fmt: skip
        self.evictions = Counter(
            "fuseport_kernel_cache_evictions", "Compiled kernels dropped from the cache to keep it within its bounds",
            registry=r,
        )  # fmt: skip
        self.artifact_loads = Counter(
            "fuseport_artifact_loads", "Compiled artifacts read from the artifact cache, by outcome "
            "(ok: loaded, no compile; refused: damaged or not safely ours, compiled again)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "fuseport_batch_size", "Calls per launch of a kernel proven batchable (--batch-window-us), 1 included",
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_wait = Histogram(
            "fuseport_batch_wait_seconds", "Time each batched call waited in the batching window before its launch",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        # Present from the first scrape, at 0: a rate() needs the series before its first event.
        for outcome in ("ok", "failed"):
            self.compiles.labels(outcome)
        for outcome in ("ok", "refused"):
            self.artifact_loads.labels(outcome)
        r.register(_StateCollector(core, shared, share, poll))
        # process_resident_memory_bytes and friends (Linux: read from /proc; elsewhere none).
        ProcessCollector(registry=r)
        self._http: WSGIServer | None = None

    # ------------------------------------------------------------------ hooks

    def finished(
        self, record: CallRecord, code: grpc.StatusCode, seconds: float, received: int, sent: int
    ) -> None:
        method, path = record.method, _path_label(record.path)
        self.requests.labels(method, path, _reason_label(record.reason), code.name).inc()
        self.duration.labels(method, path).observe(seconds)
        self.received.labels(method).inc(received)
        self.sent.labels(method).inc(sent)
        t = record.timings
        if t is not None:
            for stage, us in zip(_STAGES, (t.decode_us, t.queue_us, t.run_us, t.encode_us)):
                self.stages.labels(method, stage).observe(us / 1e6)

    def compiled(self, seconds: float, ok: bool) -> None:
        self.compiles.labels("ok" if ok else "failed").inc()
        self.compile_seconds.observe(seconds)

    def evicted(self) -> None:
        self.evictions.inc()

    def loaded(self, ok: bool) -> None:
        self.artifact_loads.labels("ok" if ok else "refused").inc()

    def launched(self, size: int, waited: Sequence[float]) -> None:
        self.batch_size.observe(size)
        for seconds in waited:
            self.batch_wait.observe(seconds)

    # ------------------------------------------------------------------ endpoint

    def serve_on(self, http: WSGIServer) -> int:
        """Takes the HTTP endpoint, bound already (the server binds its ports before
        anything else, server/_http.py), and returns its port; it answers once
        `serve` is called. Every path answers with the metrics."""
        http.set_app(make_wsgi_app(self.registry))
        self._http = http
        return int(http.server_address[1])

    def serve(self) -> None:
        assert self._http is not None, "bind first"
        threading.Thread(target=self._http.serve_forever, name="fuseport-metrics", daemon=True).start()

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


class _StateCollector:
    """What is read at scrape time: kernels registered, the compiled-kernel cache, memory."""

    def __init__(
        self,
        core: Core,
        shared: SharedMemory | None,
        share: WorkerShare | None = None,
        poll: BusyPoll | None = None,
    ) -> None:
        self.core = core
        self.shared = shared
        self.share = share
        self.poll = poll

    def describe(self) -> list[Any]:
        # Declared empty so that registering does not call collect() (and read the
        # device) before the server has started.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        kernels, variants = self.core.registry.counts()  # a scrape reads no stored graph
        yield GaugeMetricFamily("fuseport_registered_kernels", "Kernels registered (keys)", value=kernels)
        yield GaugeMetricFamily(
            "fuseport_registered_variants",
            "Variants of all registered kernels (each kernel has at least one)",
            value=variants,
        )
        cache = GaugeMetricFamily(
            "fuseport_kernel_cache_entries",
            "Entries of the compiled-kernel cache (one per variant and ArgSpec), by state",
            labels=["state"],
        )
        for state, n in self.core.executor.cache_states().items():
            cache.add_metric([state.name.lower()], n)
        yield cache
        yield GaugeMetricFamily(
            "fuseport_kernel_cache_capacity",
            "Entries the compiled-kernel cache keeps before evicting (--max-kernels)",
            value=self.core.executor.max_kernels,
        )
        memory = GaugeMetricFamily(
            "fuseport_device_memory_bytes",
            "Memory of the serving CUDA device: allocated by tensors, reserved by the caching "
            "allocator, total (no series on a CPU server)",
            labels=["device", "kind"],
        )
        device = self.core.device
        if device.type == "cuda":
            name = str(device)
            memory.add_metric([name, "allocated"], torch.cuda.memory_allocated(device))
            memory.add_metric([name, "reserved"], torch.cuda.memory_reserved(device))
            memory.add_metric([name, "total"], self.core.capacity)
        yield memory
        residents = self.core.residents
        totals = residents.totals()
        yield GaugeMetricFamily(
            "fuseport_resident_bytes", "Bytes of device-resident values (handles) kept, all clients", value=totals.bytes
        )
        yield GaugeMetricFamily(
            "fuseport_resident_handles", "Device-resident values (handles) kept, all clients", value=totals.handles
        )
        yield GaugeMetricFamily(
            "fuseport_resident_clients", "Clients holding at least one device-resident value", value=totals.clients
        )
        yield GaugeMetricFamily(
            "fuseport_resident_budget_bytes",
            "Bytes of device-resident values the server keeps at most (--max-resident-bytes)",
            value=residents.budget_bytes,
        )
        yield CounterMetricFamily(
            "fuseport_resident_expired_handles",
            "Handles freed because their client stopped renewing its lease",
            value=residents.expired,
        )
        buffers = self.core.stream_buffers
        yield GaugeMetricFamily(
            "fuseport_stream_buffer_bytes",
            "Bytes reserved by streamed calls whose stack is still arriving (their headers' declared sizes)",
            value=buffers.held,
        )
        yield GaugeMetricFamily(
            "fuseport_stream_buffer_limit_bytes",
            "Bytes streamed calls still arriving may hold together (--max-stream-buffer-bytes)",
            value=buffers.limit,
        )
        yield CounterMetricFamily(
            "fuseport_stream_idle_ends",
            "Streamed calls ended because their client sent nothing for --stream-idle-seconds",
            value=buffers.idle_ends,
        )
        watchdog = self.core.watchdog
        overruns = CounterMetricFamily(
            "fuseport_call_overruns",
            "Calls whose deadline or --max-call-seconds (limit) passed while their kernel still ran: answered "
            "at the limit, the kernel's results dropped when it ended",
            labels=["limit"],
        )
        for limit, n in watchdog.overruns.items():
            overruns.add_metric([limit], n)
        yield overruns
        yield CounterMetricFamily(
            "fuseport_runaway_kernels",
            "Kernels still running --overrun-grace-seconds after their call's limit: the process retires "
            "(drains and exits with status 4) at the first",
            value=watchdog.runaways,
        )
        if self.share is not None:
            # Read from the scrape's thread: two ints the event loop sets.
            yield GaugeMetricFamily(
                "fuseport_worker_calls_running",
                "Calls holding a worker to run a kernel (one caller holds at most --workers-per-identity)",
                value=self.share.running,
            )
            yield GaugeMetricFamily(
                "fuseport_worker_calls_waiting",
                "Calls waiting for a worker, queued per caller (the caller holding fewest goes first)",
                value=self.share.waiting,
            )
        if self.poll is not None and self.poll.max:
            # Read from the scrape's thread: numbers the event loop sets (a scrape mid-poll
            # counts that poll's seconds at its end).
            poll = self.poll
            calls = CounterMetricFamily(
                "fuseport_busy_poll_calls",
                "Calls that found the serving loop polling for them (caught), and polls whose window ran out with no call "
                "(missed) (--busy-poll-us)",
                labels=["outcome"],
            )
            calls.add_metric(["caught"], poll.caught)
            calls.add_metric(["missed"], poll.missed)
            yield calls
            yield CounterMetricFamily(
                "fuseport_busy_poll_seconds",
                "Seconds the serving loop spent polling for calls (a core busy meanwhile)",
                value=poll.polled,
            )
            yield GaugeMetricFamily(
                "fuseport_busy_poll_window_seconds",
                "How long the serving loop polls after its last call now (adapted to the gaps between calls, "
                "at most --busy-poll-us)",
                value=poll.window,
            )
            if poll.warm_every:
                yield CounterMetricFamily(
                    "fuseport_busy_poll_gpu_kernels",
                    "One-element kernels the polling loop queued to keep the GPU from idling (--busy-poll-gpu-us)",
                    value=poll.warmed,
                )
        if self.shared is not None and self.shared.enabled:
            sessions, mapped = self.shared.stats()
            yield GaugeMetricFamily(
                "fuseport_shared_memory_sessions", "Shared-memory sessions of connected clients", value=sessions
            )
            yield GaugeMetricFamily(
                "fuseport_shared_memory_bytes",
                "Bytes of shared-memory regions mapped for those sessions (the clients' and the server's)",
                value=mapped,
            )
            yield GaugeMetricFamily(
                "fuseport_shared_memory_locked_bytes",
                "Bytes of shared-memory regions page-locked for the GPU (up to --shared-memory-page-lock-bytes; "
                "an ended session's regions until the server lets go of them; 0 on a CPU server)",
                value=self.shared.locked_bytes,
            )
            yield GaugeMetricFamily(
                "fuseport_shared_memory_device_output_bytes",
                "Bytes of device output regions (results on the client's GPU) of those sessions, at most an "
                "eighth of the device's memory; 0 on a CPU server",
                value=self.shared.device_output_bytes,
            )

