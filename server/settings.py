"""Server settings: one frozen object, built from defaults < FUSEPORT_* environment < flags."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fuseport.wire.security import is_loopback

__all__ = ["COMPILERS", "COMPILE_MODES", "EVENT_LOOPS", "Settings", "default_store_dir"]

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead", "off")
COMPILERS = ("standalone", "inprocess")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")

ENV_PREFIX = "FUSEPORT_"


def default_store_dir() -> Path:
    """Where registered kernels live when nobody says: the user's cache directory."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fuseport" / "store"


@dataclass(frozen=True)
class Settings:
    """Everything `fuseport serve` can be told. Each field is also FUSEPORT_<NAME>, and a
    flag unless its metadata says `env_only`."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 in containers"})
    port: int = field(default=50051, metadata={"help": "port to bind; 0 picks a free one"})
    device: str = field(
        default="auto",
        metadata={
            "help": "auto (first CUDA device, else cpu), cpu, cuda or cuda:N; all (every CUDA device) or a "
            "list (cuda:0,cuda:1): a serving process per device (see --processes)"
        },
    )
    store_dir: Path = field(
        default_factory=default_store_dir,
        metadata={"help": "directory holding registered graphs (survives restarts)"},
    )
    max_message_bytes: int = field(
        default=1 << 30,
        metadata={"help": "largest request or response in bytes (protobuf's ceiling is 2 GiB)"},
    )
    compile_mode: str = field(
        default="default",
        metadata={
            "help": f"torch.compile mode for fused kernels: {', '.join(COMPILE_MODES)} (reduce-overhead: "
            "CUDA graphs, compiled by torch.compile in the serving process; off: always the fallback)"
        },
    )
    max_kernels: int = field(
        default=256, metadata={"help": "compiled kernels kept in memory (LRU over all keys)"}
    )
    max_arg_specs: int = field(
        default=16, metadata={"help": "compiled kernels kept per variant (LRU over its ArgSpecs)"}
    )
    max_variants: int = field(
        default=64,
        metadata={
            "help": "variants (captures for other ranks, sizes or static values) kept per kernel; past it "
            "Register is RESOURCE_EXHAUSTED"
        },
    )
    max_call_bytes: int = field(
        default=0,
        metadata={
            "help": "most memory one Execute/Fallback may need on the device, from its plan: its inputs and "
            "the most its graph holds at once, intermediates and results by liveness, views counting nothing (bytes; 0: only the "
            "device's own size limits it); host memory per call is bounded by --max-message-bytes"
        },
    )
    max_call_seconds: float = field(
        default=0.0,
        metadata={
            "help": "most time one Execute/Fallback may run: past it the call is RESOURCE_EXHAUSTED at once and "
            "the unfused graph stops at its next op (0: no limit; a client's deadline does the same, "
            "DEADLINE_EXCEEDED); a fused kernel, or one op, is not interrupted: see --overrun-grace-seconds"
        },
    )
    overrun_grace_seconds: float = field(
        default=5.0,
        metadata={
            "help": "how long a kernel may run on after its call's deadline or --max-call-seconds passed (its "
            "caller is answered at the limit, the results dropped): past it the kernel is a runaway that only "
            "the process's end stops, and the serving process retires (health NOT_SERVING, drain, exit status "
            "4) for its supervisor or the container to restart"
        },
    )
    runaway_penalty_seconds: float = field(
        default=60.0,
        metadata={
            "help": "after a caller's kernel ran away and retired a serving process (--overrun-grace-seconds), "
            "how long that caller's calls that are not light are refused (RESOURCE_EXHAUSTED naming this flag), "
            "on every serving process sharing --store-dir, across restarts; doubled on each further runaway "
            "(at most a day), back to this after a day without one. The caller is its token, or without "
            "--auth-tokens its host (0: no penalty)"
        },
    )
    max_graph_bytes: int = field(
        default=512 << 20,
        metadata={"help": "largest graph Register accepts, constants included (bytes)"},
    )
    max_store_bytes: int = field(
        default=16 << 30, metadata={"help": "bytes of graphs the store keeps, all kernels and variants"}
    )
    max_store_kernels: int = field(
        default=10_000, metadata={"help": "kernels the store keeps (variants count towards the bytes only)"}
    )
    workers: int = field(
        default=8,
        metadata={
            "help": "threads that decode, run and encode requests (each has its own CUDA stream); a small "
            "call whose planned work is light (at most 1 MiB touched and 16 MFLOP) runs on the event loop itself"
        },
    )
    workers_per_identity: int = field(
        default=0,
        metadata={
            "help": "most workers the calls of one caller (its token; without --auth-tokens, its host) may hold "
            "running kernels at once, so that another caller's call always finds one; calls waiting for a worker "
            "are served caller by caller, the caller holding fewest first (0: --workers minus one, at least 1)"
        },
    )
    # Calls waiting for a worker hold their request (gRPC's buffer, or a streamed stack's
    # reservation): without a bound, one caller holding its workers could queue any number.
    max_waiting_calls_per_identity: int = field(
        default=64,
        metadata={
            "help": "most calls of one caller (its token; without --auth-tokens, its host) that may wait for a "
            "worker at once; one past it is RESOURCE_EXHAUSTED at once (each holds its request meanwhile)"
        },
    )
    event_loop: str = field(
        default="auto",
        metadata={
            "help": "the serving process's event loop: uvloop (libuv; a small call costs the server about a "
            "fifth less CPU than on asyncio's own loop, as little as a sync gRPC echo), asyncio, or auto "
            "(uvloop where it is installed, as it is with fuseport on Linux)"
        },
    )
    # A thread that slept pays for its wake-up and its cold caches on every call that
    # wakes it (server/rpc/poll.py measures it): a client calling back to back is
    # answered sooner by a loop that polls for a moment. The window adapts to the gaps.
    # Not in an embedded server (create_server): there its polling loop contends for the
    # GIL with the program's own threads (a caller in the same process: 1.1-1.3x slower).
    busy_poll_us: int | None = field(
        default=None,
        metadata={
            "help": "after a call that ran on the event loop ends (a small one), with none other in flight, the "
            "serving loop keeps polling for the next call for up to this many microseconds instead of sleeping (a "
            "1 KiB call back to back: 0.93-1.06x the gRPC echo's time against 1.42-1.76x, CPU machine); it adapts, "
            "polling less while calls come further apart, and not at all at rest; 0: sleep at once (no CPU spent "
            "waiting); unset: 2000 under fuseport serve, 0 in a server embedded with create_server (its polling "
            "would contend for the GIL with the program's threads)"
        },
    )
    # A GPU kept busy between a client's calls answers the next one sooner than one that
    # idled (docs/perf.md, "the price of an idle GPU").
    busy_poll_gpu_us: int = field(
        default=200,
        metadata={
            "help": "on a CUDA server, while the serving loop polls for the next call (--busy-poll-us), it queues a "
            "one-element kernel on its stream every this many microseconds, never waited for, so that the GPU does "
            "not idle between a client's calls (a small call's p50 on an H100: a fifth lower); 0: off"
        },
    )
    keep_host_memory: bool = field(
        default=True,
        metadata={
            "help": "keep freed host memory for the next message instead of returning it to the OS "
            "(glibc: one arena, no mmap; no page faults on large messages), up to --keep-host-memory-bytes"
        },
    )
    keep_host_memory_bytes: int = field(
        default=1 << 30,
        metadata={
            "help": "most freed host memory kept for reuse (glibc's trim threshold; bytes, at most 2 GiB - 1); "
            "after a call that moved more, freed memory goes back to the OS"
        },
    )
    # Off by default: on the H100 a 1 KiB call's core.execute took 72-77 us with it off and
    # 85 us on (in process, alternating runs, 2026-12-07), and end to end three fresh servers
    # gave off the lower ratio too: packing costs more than the waits it saves there.
    cuda_staging_bytes: int = field(
        default=0,
        metadata={
            "help": "CUDA: a call's small inputs (each under 256 KiB) go to the device through a pinned "
            "buffer of the serving thread, without waiting, and its small results come back through "
            "another, so the call waits on the device once, not once per tensor; a call with more than "
            "this many bytes of them copies them one by one; 0 (the default: measured slower for a "
            "call of one small input on an H100): off"
        },
    )
    grace_seconds: float = field(
        default=10.0, metadata={"help": "on SIGTERM, time given to in-flight calls"}
    )
    log_level: str = field(
        default="info",
        metadata={"help": "debug logs one line per request; compiles and fallbacks log at info"},
    )
    port_file: Path | None = field(
        default=None,
        metadata={
            "help": "write the bound port here once serving, as its first line (with metrics on, a second "
            "line metrics=PORT), for tooling"
        },
    )
    tls_cert: Path | None = field(
        default=None,
        metadata={"help": "server certificate chain (PEM); with --tls-key the port speaks TLS only; reread on SIGHUP"},
    )
    tls_key: Path | None = field(
        default=None, metadata={"help": "private key of --tls-cert (PEM; both or neither); reread on SIGHUP"}
    )
    tls_client_ca: Path | None = field(
        default=None,
        metadata={
            "help": "CA bundle (PEM) that client certificates must chain to: makes a client "
            "certificate required (mTLS); needs --tls-cert/--tls-key; reread on SIGHUP"
        },
    )
    auth_tokens: Path | None = field(
        default=None,
        metadata={
            "help": "file of 'TOKEN ROLE' lines (roles: admin, user; # comments): KernelService "
            "calls then need 'authorization: Bearer TOKEN'; reread on SIGHUP"
        },
    )
    insecure: bool = field(
        default=False,
        metadata={"help": "serve a non-loopback --host with neither TLS nor tokens (anyone who reaches it may call it)"},
    )
    # Off unless asked: the endpoint is plain HTTP without authentication, so a
    # second open port is the operator's choice. 0 picks a free port, as for --port.
    metrics_port: int | None = field(
        default=None,
        metadata={
            "help": "serve Prometheus metrics over HTTP on this port, on --host (0 picks a free one; "
            "unset: no metrics endpoint)"
        },
    )
    # Streamed stacks (ExecuteStream/FallbackStream).
    max_stream_bytes: int = field(
        default=8 << 30,
        metadata={
            "help": "largest stack one streamed call may send, and largest result it may return (bytes); "
            "checked against the header before anything is allocated"
        },
    )
    stream_chunk_bytes: int = field(
        default=4 << 20, metadata={"help": "data bytes per chunk of a streamed result"}
    )
    # A stalled client must not hold a stream's memory for as long as it keeps the call open.
    stream_idle_seconds: float = field(
        default=30.0,
        metadata={
            "help": "a streamed call whose client sends no message for this long before its stack is "
            "complete is ended (DEADLINE_EXCEEDED) and what it received is freed"
        },
    )
    max_stream_buffer_bytes: int | None = field(
        default=None,
        metadata={
            "help": "bytes that streamed calls still arriving may hold together on one serving process: each "
            "header reserves what it declares (its destination is allocated whole), until its stack is "
            "complete; a header past it is RESOURCE_EXHAUSTED (unset: half the host memory the server may "
            "use, its cgroup's limit if lower, shared among the serving processes)"
        },
    )
    max_stream_buffer_bytes_per_token: int | None = field(
        default=None,
        metadata={
            "help": "with --auth-tokens, what one token's streamed calls still arriving may hold of "
            "--max-stream-buffer-bytes (unset: half of it)"
        },
    )
    # Device-resident values (ExecuteOptions.keep_outputs: outputs kept on the device as handles).
    handle_lease_seconds: float = field(
        default=60.0,
        metadata={
            "help": "a client's handles are freed when it has not renewed its lease (the Python client "
            "renews in the background) for this many seconds"
        },
    )
    max_resident_bytes: int = field(
        default=4 << 30,
        metadata={"help": "bytes of device-resident values the server keeps, all clients (0: none kept)"},
    )
    max_resident_bytes_per_client: int = field(
        default=2 << 30, metadata={"help": "bytes of device-resident values one client may keep"}
    )
    max_handles_per_client: int = field(
        default=10_000, metadata={"help": "device-resident handles one client may hold at once"}
    )
    # Client ids are chosen by the client: with tokens, what all the ids of one token
    # hold is bounded together (without tokens, by --max-resident-bytes).
    max_resident_bytes_per_token: int = field(
        default=2 << 30,
        metadata={"help": "bytes of device-resident values one token may keep, all its client ids together"},
    )
    max_handles_per_token: int = field(
        default=10_000,
        metadata={"help": "device-resident handles one token may hold at once, all its client ids together"},
    )

    # Shared memory for co-located clients (server/shm.py).
    shared_memory: bool = field(
        default=True,
        metadata={
            "help": "let clients on this host (the same network namespace) pass tensors through shared "
            "memory instead of messages (Linux; the client picks it by itself)"
        },
    )
    shared_memory_max_bytes: int = field(
        default=16 << 30,
        metadata={"help": "bytes of shared-memory regions one client session may map, its inputs' and outputs'"},
    )
    shared_memory_sessions: int = field(
        default=256,
        metadata={"help": "shared-memory sessions one serving process keeps, pending and connected"},
    )
    shared_memory_sessions_per_identity: int = field(
        default=64,
        metadata={
            "help": "shared-memory sessions (pending tickets and connected) one identity may hold: a token; "
            "without tokens, a client id for tickets and the peer process (SO_PEERCRED) once connected"
        },
    )
    shared_memory_ticket_seconds: float = field(
        default=30.0,
        metadata={"help": "a shared-memory ticket not presented on the socket within this is void"},
    )
    shared_memory_idle_seconds: float = field(
        default=600.0,
        metadata={"help": "a shared-memory session without a call for this long is ended (memory unmapped)"},
    )
    cuda_ipc: bool = field(
        default=True,
        metadata={
            "help": "with shared memory, let a client's CUDA tensors on this server's GPUs travel as CUDA IPC "
            "handles, and results it asks for on that GPU come back in device allocations of the server's "
            "(copied on the device; no host copy)"
        },
    )
    shared_memory_page_lock_bytes: int | None = field(
        default=None,
        metadata={
            "help": "on a CUDA server, bytes of shared-memory regions it page-locks at most (cudaHostRegister), so "
            "that copies between a region and the GPU run at the bus's speed; regions past it are copied at "
            "pageable speed; 0: none; unset: a quarter of the host memory the server may use, shared among its "
            "serving processes"
        },
    )

    # --processes (procs): several serving processes on one port, under a supervisor.
    processes: int = field(
        default=0,
        metadata={
            "help": "serving processes sharing the port (SO_REUSEPORT) and the store, under a supervisor "
            "that restarts them; 0: chosen per device served: one per CPU device, and on a GPU one per 4 usable "
            "cores of its share, at most 4 (see the Serving processes guide); 1: a single server without a supervisor"
        },
    )
    restart_limit: int = field(
        default=5,
        metadata={
            "help": "with --processes: restarts of a process that keeps dying within a minute of its start "
            "before the supervisor gives up on it"
        },
    )
    # --- compile worker and artifact cache (out-of-process compiles, warm restart)
    compiler: str = field(
        default="standalone",
        metadata={
            "help": "standalone: compile in a worker process into Inductor artifacts, cached on disk, "
            "loaded by every serving process and after restarts, called with no Dynamo guards; "
            "inprocess: torch.compile in the serving process (no cache; for comparison)"
        },
    )
    artifact_dir: Path | None = field(
        default=None,
        metadata={"help": "directory of compiled artifacts, made 0700 (unset: the store directory's artifacts/)"},
    )
    artifact_cache_bytes: int = field(
        default=4 << 30,
        metadata={"help": "bytes of compiled artifacts kept on disk; past it, the least recently used go"},
    )
    compile_timeout_seconds: float = field(
        default=600.0,
        metadata={
            "help": "a compile running longer is killed (its worker replaced) and its ArgSpec served unfused"
        },
    )
    # A pool (Inductor's default: min(32, cores) processes) starts with the worker's warm-up,
    # each process importing torch and Triton: fuseport's earlier min(8, cores // 2) kept
    # 1.3-2 cores of the H100 machine busy beside the serving processes after a start.
    compile_threads: int = field(
        default=1,
        metadata={
            "help": "processes Inductor compiles a graph's kernels in (its compile pool, started when the "
            "compile worker starts); 1: one after the other, with no pool, which suits the few kernels of a fused "
            "graph; more compiles a graph of many kernels sooner, at the cost of a pool whose start takes cores "
            "from the serving processes"
        },
    )
    batch_window_us: int = field(
        default=0,
        metadata={
            "help": "dynamic batching: small Execute calls of one kernel, variant and sizes that arrive within "
            "this many microseconds of the first are stacked and run as one launch, where the graph is proven "
            "batchable; 0: off (the default: on the CPU and on an H100 it was measured not to pay)"
        },
    )
    max_batch: int = field(
        default=64,
        metadata={"help": "most calls one batched launch takes; a full batch launches without waiting out the window"},
    )
    # --- fault injection (device faults stay local): for tests only, so an environment
    # variable and never a flag (`env_only`): a command line copied from a test cannot turn it on.
    fault_injection: bool = field(
        default=False,
        metadata={
            "env_only": True,
            "help": "FOR TESTS ONLY: a call carrying the metadata 'fuseport-inject-fault: device' "
            "breaks this server's device on purpose (a real device-side assert on CUDA) instead of running; "
            "logged as a warning at startup; any other server ignores that metadata. Never in production",
        },
    )

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile_mode must be one of {', '.join(COMPILE_MODES)}, not {self.compile_mode!r}"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, not {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535, not {self.metrics_port}")
        if not 0 < self.max_message_bytes <= 2**31 - 1:
            raise ValueError("max_message_bytes must be in 1..2147483647 (protobuf's 2 GiB ceiling)")
        for name in (
            "max_kernels", "max_arg_specs", "max_variants", "max_graph_bytes", "max_store_bytes",
            "max_store_kernels", "workers",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_waiting_calls_per_identity < 1:
            raise ValueError("max_waiting_calls_per_identity must be at least 1")
        if not 0 <= self.workers_per_identity <= self.workers:
            raise ValueError("workers_per_identity must be in 0..workers (0: workers minus one, at least 1)")
        if self.runaway_penalty_seconds < 0:
            raise ValueError("runaway_penalty_seconds must be >= 0 (0: no penalty)")
        if self.max_stream_bytes < 0:
            raise ValueError("max_stream_bytes must be >= 0")
        if self.stream_chunk_bytes < 1:
            raise ValueError("stream_chunk_bytes must be at least 1")
        if self.stream_idle_seconds <= 0:
            raise ValueError("stream_idle_seconds must be > 0")
        for name in ("max_stream_buffer_bytes", "max_stream_buffer_bytes_per_token"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (unset: derived from memory)")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, not {self.event_loop!r}")
        if self.compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {', '.join(COMPILERS)}, not {self.compiler!r}")
        if self.artifact_cache_bytes < 1:
            raise ValueError("artifact_cache_bytes must be at least 1")
        if not 1 <= self.compile_threads <= 256:
            raise ValueError("compile_threads must be in 1..256")
        if self.compile_timeout_seconds <= 0:
            raise ValueError("compile_timeout_seconds must be > 0")
        if self.max_call_bytes < 0:
            raise ValueError("max_call_bytes must be >= 0 (0: no limit of its own)")
        if self.shared_memory_page_lock_bytes is not None and self.shared_memory_page_lock_bytes < 0:
            raise ValueError("shared_memory_page_lock_bytes must be >= 0 (0: no region is page-locked)")
        if self.busy_poll_us is not None and not 0 <= self.busy_poll_us <= 1_000_000:
            raise ValueError("busy_poll_us must be in 0..1000000 (0: the loop sleeps at once)")
        if not 0 <= self.busy_poll_gpu_us <= 1_000_000:
            raise ValueError("busy_poll_gpu_us must be in 0..1000000 (0: off)")
        if not 0 <= self.batch_window_us <= 1_000_000:
            raise ValueError("batch_window_us must be in 0..1000000 (0: batching off)")
        if not 1 <= self.max_batch <= 1024:
            raise ValueError("max_batch must be in 1..1024")
        if self.max_call_seconds < 0:
            raise ValueError("max_call_seconds must be >= 0 (0: no limit of its own)")
        if self.overrun_grace_seconds <= 0:
            raise ValueError("overrun_grace_seconds must be > 0")
        if not 0 <= self.keep_host_memory_bytes <= 2**31 - 1:
            raise ValueError("keep_host_memory_bytes must be in 0..2147483647 (glibc's limit)")
        if not 0 <= self.cuda_staging_bytes <= 1 << 30:
            raise ValueError("cuda_staging_bytes must be in 0..1073741824 (0: off)")
        if self.shared_memory_max_bytes < 1 << 20:
            raise ValueError("shared_memory_max_bytes must be at least 1 MiB")
        if not 0 < self.handle_lease_seconds <= 86400:
            raise ValueError("handle_lease_seconds must be in (0, 86400]")
        if self.max_resident_bytes < 0 or self.max_resident_bytes_per_client < 0:
            raise ValueError("max_resident_bytes and max_resident_bytes_per_client must be >= 0")
        if self.max_handles_per_client < 1:
            raise ValueError("max_handles_per_client must be at least 1")
        if self.max_resident_bytes_per_token < 0:
            raise ValueError("max_resident_bytes_per_token must be >= 0")
        if self.max_handles_per_token < 1:
            raise ValueError("max_handles_per_token must be at least 1")
        if self.shared_memory_sessions < 1 or self.shared_memory_sessions_per_identity < 1:
            raise ValueError("shared_memory_sessions and shared_memory_sessions_per_identity must be >= 1")
        if self.shared_memory_ticket_seconds <= 0 or self.shared_memory_idle_seconds <= 0:
            raise ValueError("shared_memory_ticket_seconds and shared_memory_idle_seconds must be > 0")
        if self.processes < 0:
            raise ValueError("processes must be >= 0 (0: one per device served)")
        if self.restart_limit < 0:
            raise ValueError("restart_limit must be >= 0")
        if self.grace_seconds < 0:
            raise ValueError("grace_seconds must be >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (--tls-cert and --tls-key): give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (--tls-client-ca) needs the server's own --tls-cert and --tls-key")
        # Safe by default: a port other machines can reach is not opened to
        # anyone at all unless someone said so.
        if not is_loopback(self.host) and not self.tls and self.auth_tokens is None and not self.insecure:
            raise ValueError(
                f"host {self.host!r} is reachable from other machines, and the server would have neither TLS "
                "nor tokens: anyone who can connect could register and run graphs. Give --tls-cert/--tls-key "
                "(FUSEPORT_TLS_CERT/FUSEPORT_TLS_KEY), --auth-tokens (FUSEPORT_AUTH_TOKENS), or --insecure "
                "(FUSEPORT_INSECURE=1) to accept it explicitly"
            )

    @classmethod
    def load(
        cls, flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Defaults, then FUSEPORT_* variables from `environ`, then `flags` (None = not given)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                try:
                    values[f.name] = _parse(f, raw)
                except ValueError as e:
                    raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r}: {e}") from None
        for name, value in (flags or {}).items():
            if value is not None:
                values[name] = value
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def artifact_path(self) -> Path:
        """Where compiled artifacts live: --artifact-dir, else beside the graphs in the store."""
        return self.artifact_dir if self.artifact_dir is not None else Path(self.store_dir) / "artifacts"

    @property
    def worker_share(self) -> int:
        """The most workers one caller's calls hold at once (--workers-per-identity)."""
        return self.workers_per_identity or max(1, self.workers - 1)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {raw!r}")


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = str(f.type).removesuffix(" | None")  # optional: set means a value (unset is None)
    if kind == "bool":
        return parse_bool(raw)
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if "Path" in kind:
        return Path(raw)
    return raw
