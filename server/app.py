"""Building and running the gRPC server: health, reflection, limits, graceful shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from fuseport.server._http import bind_http
from fuseport.server.checks import warm_up
from fuseport.server.core import Core
from fuseport.server.rpc.gate import FAULT_METADATA, Gate, Services
from fuseport.server.rpc.kserve import SERVICE_NAME as KSERVE_SERVICE_NAME
from fuseport.server.rpc.kserve import InferenceService
from fuseport.server.rpc.plumbing import Plumbing
from fuseport.server.rpc.service import SERVICE_NAME, KernelService
from fuseport.server.security import Security
from fuseport.server.settings import Settings
from fuseport.wire._local import write_port_file
from fuseport.wire.hostmem import keep_host_memory
from fuseport.wire.security import is_loopback
from fuseport.wire.targets import PROCESS_METADATA_KEY

if TYPE_CHECKING:
    from fuseport.server.metrics import Metrics

__all__ = [
    "EXIT_DEVICE_FAILED", "EXIT_RUNAWAY_KERNEL", "FAULT_METADATA", "PROCESS_METADATA_KEY", "CannotListen", "Server",
    "create_server", "serve",
]  # fmt: skip

log = logging.getLogger(__name__)


class CannotListen(OSError):
    """A port the server cannot bind (taken, or an address not this host's): the
    message names the port and its flag; `fuseport serve` prints it and exits 2."""

    @classmethod
    def port(cls, host: str, port: int, e: OSError) -> CannotListen:
        """--port at host:port is taken (the one message, for one process or a supervisor)."""
        reason = e.strerror or e
        return cls(f"cannot listen on {host}:{port} (--port): {reason}; choose another --port (0: any free one)")


def _check_free(host: str, port: int) -> None:
    """CannotListen, with the system's reason, when host:port cannot be bound.

    gRPC would say so too, but only after logging its own error line to stderr,
    and without the reason. Bound as gRPC binds it (SO_REUSEADDR, no
    SO_REUSEPORT), then let go; the supervisor's processes, which share their
    port, are not checked."""
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise CannotListen(f"cannot listen on {host}:{port} (--host): {e.strerror or e}") from e
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                raise CannotListen.port(host, port, e) from e


class Server:
    """A started-or-not fuseport server: the grpc.aio server plus what it serves."""

    def __init__(self, settings: Settings, security: Security | None = None, process: int | None = None) -> None:
        """`process`: this server's index under a supervisor (`--processes`): it shares
        its port (SO_REUSEPORT) and its store with the other serving processes."""
        self.settings = settings
        self.process = process
        self.security = Security.load(settings) if security is None else security
        # The ports first: one that is taken is one line at once (CannotListen),
        # before the core loads anything or warms its compiler up.
        self.grpc = grpc.aio.server(
            options=[
                # Set explicitly: gRPC's 4 MB default is found in production otherwise.
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # Off for one process: a second server on a taken port fails instead
                # of silently sharing it. On for the supervisor's processes, which share it.
                ("grpc.so_reuseport", 0 if process is None else 1),
            ]
        )
        self.port = self._listen(settings)
        metrics_http = None
        if settings.metrics_port is not None:
            # Under a supervisor, the supervisor serves --metrics-port (every process's
            # metrics, labelled); this process's own endpoint is for it alone.
            host = settings.host if process is None else "127.0.0.1"
            try:
                metrics_http = bind_http(host, settings.metrics_port, None)
            except OSError as e:
                raise CannotListen(
                    f"cannot serve metrics on {host}:{settings.metrics_port} (--metrics-port): {e.strerror or e}"
                ) from e
        self.core = Core(settings, shared_store=process is not None)
        self.plumbing = Plumbing(
            settings.workers,
            settings.keep_host_memory_bytes if settings.keep_host_memory else None,
            per_identity=settings.worker_share,
            max_waiting=settings.max_waiting_calls_per_identity,
            busy_poll_us=settings.busy_poll_us or 0,
            warm=self.core.placement.keep_warm if self.core.placement.cuda else None,
            warm_every_us=settings.busy_poll_gpu_us,
        )
        self.service = KernelService(
            self.core,
            self.plumbing,
            settings.max_message_bytes,
            # A chunk and its header must fit one message (a small --max-message-bytes).
            min(settings.stream_chunk_bytes, settings.max_message_bytes - 1024),
        )
        if self.security.access is not None:
            # A user token's kernels are its own (server/tenants.py); reloads follow.
            self.plumbing.tenant_of = self.security.access.tenant_of
            # A caller is its token (the gate checked it): for the workers' share and penalties.
            self.plumbing.tokens = True
        self.health = HealthServicer()
        # The KServe v2 protocol on the same port, behind the same gate (tokens, drain).
        self.inference = InferenceService(self.core, self.plumbing)
        self.gate = Gate(
            Services(self.service.handler(), self.inference.handler()),
            self.security.access,
            self.plumbing.refused,
            None if process is None else f"{process} {os.getpid()}",
            self.core.inject_device_fault if settings.fault_injection else None,
        )
        self.grpc.add_generic_rpc_handlers((self.gate,))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                KSERVE_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.grpc,
        )
        self.metrics: Metrics | None = None
        self.metrics_port: int | None = None
        if settings.metrics_port is not None:
            from fuseport.server.metrics import Metrics

            self.metrics = Metrics(self.core, self.core.shared, self.plumbing.share, self.plumbing.poll)
            self.plumbing.observer = self.metrics
            self.core.executor.events = self.metrics
            if self.core.batcher is not None:
                self.core.batcher.events = self.metrics
            self.metrics_port = self.metrics.serve_on(metrics_http)

    def _listen(self, settings: Settings) -> int:
        if self.process is None and settings.port:
            _check_free(settings.host, settings.port)
        try:
            if self.security.tls is not None:
                port = self.grpc.add_secure_port(settings.address, self.security.tls.credentials())
            else:
                port = self.grpc.add_insecure_port(settings.address)
        except RuntimeError:  # "Failed to bind" (older grpcio answered 0 instead)
            port = 0
        if port == 0:
            raise CannotListen(
                f"cannot listen on {settings.address} (--port): the port is in use, or the host is not "
                "this machine's; choose another --port (0: any free one)"
            )
        return port

    async def start(self) -> None:
        if self.metrics is not None:
            # Before health says SERVING: whoever waits for that can scrape at once.
            self.metrics.serve()
            log.info("metrics on http://%s:%d/metrics", self.settings.host, self.metrics_port)
        self.core.shared.start()
        threading.Thread(target=warm_up, name="fuseport-warm-up", daemon=True).start()
        await self.grpc.start()
        for name in ("", SERVICE_NAME, KSERVE_SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "fuseport serving on %s:%d (device %s, store %s; %s)",
            self.settings.host,
            self.port,
            self.core.device,
            self.settings.store_dir,
            self.security.describe(),
        )
        if self.settings.fault_injection:
            log.warning(
                "FUSEPORT_FAULT_INJECTION is on: FOR TESTS ONLY. Any caller may break this server's device "
                "(metadata %r: %r); never set it in production",
                *FAULT_METADATA,
            )
        tls = self.security.tls
        if not is_loopback(self.settings.host) and self.security.access is None and (tls is None or tls.client_ca is None):
            # TLS alone encrypts but lets anyone connect; --insecure says so explicitly.
            log.warning(
                "%s is reachable from other machines and callers are not authenticated "
                "(no --auth-tokens, no --tls-client-ca): anyone who connects may register and run graphs",
                self.settings.host,
            )

    async def drain(self, grace: float | None = None) -> bool:
        """Health NOT_SERVING first (load balancers stop sending), then refuse
        new calls with UNAVAILABLE and give in-flight ones up to `grace`
        seconds. True if every call finished in time.

        The gRPC server itself keeps running: see `_serve` for why a server
        process ends without stopping it."""
        grace = self.settings.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.gate.closed = True
        log.info(
            "shutting down: refusing new calls, finishing %d in flight (grace %.1f s)", self.gate.in_flight, grace
        )
        if self.gate.in_flight:
            try:
                await asyncio.wait_for(self.gate.idle(), grace)
            except TimeoutError:
                log.warning("%d calls still in flight after the grace period", self.gate.in_flight)
                return False
        return True

    async def stop(self, grace: float | None = None) -> None:
        """Drain (see `drain`), then stop the gRPC server and the workers.

        For a server embedded in a process that goes on. gRPC's own shutdown
        still ends every call that has reached the server but no handler yet
        with CANCELLED (grpc/grpc#41785), so a caller that goes on calling
        through the drain can see one. A server process avoids that by ending
        instead: see `_serve`."""
        grace = self.settings.grace_seconds if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.drain(grace)
        await self.grpc.stop(max(0.0, deadline - loop.time()))
        self.plumbing.close()
        self.core.close()
        if self.metrics is not None:
            self.metrics.close()


async def create_server(
    settings: Settings, security: Security | None = None, process: int | None = None
) -> tuple[Server, int]:
    """A server bound to its port, not yet started: `await server.start()`.

    `security` (TLS, tokens) is read from the files the settings name unless given;
    `process`: see `Server`."""
    server = Server(settings, security, process)
    return server, server.port


# Exit status when the device failed (a CUDA error that poisons the context):
# the supervisor should start a fresh process.
EXIT_DEVICE_FAILED = 3
# Exit status when a kernel ran on past its call's limit and --overrun-grace-seconds
# (server/watchdog.py): the process was healthy but only its end stops the kernel;
# the supervisor, or the container's restart policy, starts a fresh one.
EXIT_RUNAWAY_KERNEL = 4


# --busy-poll-us when unset, in a process that only serves (see Settings.busy_poll_us).
SERVE_BUSY_POLL_US = 2000


async def _serve(settings: Settings, security: Security | None, process: int | None) -> NoReturn:
    if settings.busy_poll_us is None:
        settings = dataclasses.replace(settings, busy_poll_us=SERVE_BUSY_POLL_US)
    server, port = await create_server(settings, security, process)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if server.security.reloadable:
        # The daemon convention for "reread your certificates and tokens". A
        # server with neither keeps SIGHUP's default (the process ends), as before.
        loop.add_signal_handler(signal.SIGHUP, server.security.reload)
    # Only now: whoever reads the port file (a supervisor forwarding SIGHUP) finds the handlers.
    if settings.port_file is not None:
        others = {} if server.metrics_port is None else {"metrics": server.metrics_port}
        write_port_file(settings.port_file, port, others)
    status = 0

    def retire(code: int) -> None:  # called from a worker or the watchdog's thread
        nonlocal status
        status = status or code  # the first cause is the one the exit status says
        loop.call_soon_threadsafe(stop.set)

    server.core.on_device_failure = lambda: retire(EXIT_DEVICE_FAILED)
    server.core.on_runaway = lambda: retire(EXIT_RUNAWAY_KERNEL)
    await stop.wait()
    await server.drain()
    # The process ends here, the gRPC server still running: gRPC's own
    # shutdown (grpc.aio.Server.stop) ends every call that has reached the
    # server but not yet a handler with CANCELLED, never to be retried
    # (grpc/grpc#41785), and under load there always are some. Ending the
    # process closes the listening socket and every connection at once: a
    # call still on its way fails with UNAVAILABLE, and a new one cannot
    # connect (UNAVAILABLE too). Every call that started has finished (or had
    # its grace period); nothing else needs an orderly stop (the store is
    # written at Register).
    log.info("exiting with status %d", status)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def serve(settings: Settings, security: Security | None = None, process: int | None = None) -> NoReturn:
    """Runs until SIGTERM or SIGINT (exit status 0), until the device fails
    (EXIT_DEVICE_FAILED), or until a kernel runs on past its call's limit and
    --overrun-grace-seconds (EXIT_RUNAWAY_KERNEL), then drains and ends the
    process with that exit status: it never returns (see `_serve`). SIGHUP rereads the TLS files and
    the tokens file, when there are any.

    `security`: TLS and tokens as `Security.load(settings)` reads them (done
    here when not given; a caller that loads it first can report a bad file
    before anything starts). `process`: this server's index under a supervisor (see
    `Server`; `fuseport serve --processes N` starts it through server/supervisor.py)."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=("" if process is None else f"[{process}] ") + "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.keep_host_memory and not keep_host_memory(settings.keep_host_memory_bytes):
        log.warning("could not set glibc's malloc options; large messages will page-fault")
    _leave_a_core_to_the_loop(settings)
    with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
        runner.run(_serve(settings, security, process))


def _leave_a_core_to_the_loop(settings: Settings) -> None:
    """On a CPU server, kernels run on one intra-op thread fewer than torch's default
    (one per core), so that one long kernel leaves a core to the event loop, and with it
    to everyone else's calls: with every core busy in one caller's kernel, other callers'
    small calls had a p99 of 4.5x their idle one, 2.4x with one core left (2-core machine,
    scripts/isolation_p99.py, docs/perf.md). OMP_NUM_THREADS, when set, decides instead.
    A CUDA server's kernels run on the device: nothing to leave."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    from fuseport.server.devices import resolve_device

    if resolve_device(settings.device).type != "cpu":
        return
    threads = torch.get_num_threads()
    if threads > 1:
        # Before anything runs an op: torch gives each thread the count it finds at its
        # first parallel op. Said at debug level: `fuseport serve` on a port in use says
        # so in one line and nothing before it.
        torch.set_num_threads(threads - 1)
        log.debug("kernels run on %d of %d intra-op threads: one core is left to serving", threads - 1, threads)


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop unless told otherwise. grpc.aio drives its calls through
    asyncio callbacks, and on asyncio's own loop that machinery is most of a
    small call's server CPU: a 1 KiB echo measured 433-487 us of server CPU a
    call on it, 373-397 us on uvloop, 347-370 us for a sync grpc.server
    (2-core CPU machine; scripts/call_stages.py measures fuseport's)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        log.info("uvloop is not installed: serving on asyncio's own event loop")
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]
