"""Building and running the gRPC server: health, reflection, limits, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from fuseport.server.core import Core
from fuseport.server.service import SERVICE_NAME, KernelService
from fuseport.server.settings import Settings
from fuseport.wire._local import write_port_file
from fuseport.wire.hostmem import keep_host_memory

__all__ = ["Server", "create_server", "serve"]

log = logging.getLogger(__name__)


class Server:
    """A started-or-not fuseport server: the grpc.aio server plus what it serves."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.core = Core(settings)
        self.service = KernelService(self.core, settings.workers, settings.max_message_bytes)
        self.health = HealthServicer()
        self.grpc = grpc.aio.server(
            options=[
                # Set explicitly: gRPC's 4 MB default is found in production otherwise.
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        self.grpc.add_generic_rpc_handlers((self.service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc,
        )
        self.port = self.grpc.add_insecure_port(settings.address)
        if self.port == 0:
            raise OSError(f"cannot bind {settings.address}")

    async def start(self) -> None:
        await self.grpc.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "fuseport serving on %s:%d (device %s, store %s)",
            self.settings.host,
            self.port,
            self.core.device,
            self.settings.store_dir,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING first (load balancers stop sending), then refuse new
        calls and give in-flight ones `grace` seconds."""
        grace = self.settings.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        log.info("shutting down: finishing in-flight calls (grace %.1f s)", grace)
        await self.grpc.stop(grace)
        self.service.close()
        self.core.close()


async def create_server(settings: Settings) -> tuple[Server, int]:
    """A server bound to its port, not yet started: `await server.start()`."""
    server = Server(settings)
    return server, server.port


# Exit status when the device failed (a CUDA error that poisons the context):
# the supervisor should start a fresh process.
EXIT_DEVICE_FAILED = 3


async def _serve(settings: Settings) -> int:
    server, port = await create_server(settings)
    await server.start()
    if settings.port_file is not None:
        write_port_file(settings.port_file, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    failed = False

    def device_failed() -> None:  # called from a worker thread
        nonlocal failed
        failed = True
        loop.call_soon_threadsafe(stop.set)

    server.core.on_device_failure = device_failed
    await stop.wait()
    await server.stop()
    return EXIT_DEVICE_FAILED if failed else 0


def serve(settings: Settings) -> int:
    """Runs until SIGTERM or SIGINT (exit status 0), or until the device fails
    (EXIT_DEVICE_FAILED). Returns the exit status."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.keep_host_memory and not keep_host_memory():
        log.warning("could not set glibc's malloc options; large messages will page-fault")
    return asyncio.run(_serve(settings))
