"""The transport floor: a raw gRPC echo server and client that move the same bytes as fuseport.

The server is a plain synchronous `grpc.server` (a thread pool), what a
user of gRPC writes first, built with the same message limits as fuseport's
(`fuseport.server.app.Server`: 1 GiB message limits, no SO_REUSEPORT), whose
methods take and return raw bytes: no deserializer, no serializer. Whatever
fuseport's Execute costs above this is fuseport's own, the choice of
grpc.aio included. Issue 19: the floor was a grpc.aio server, and
scripts/echo_floor_probe.py measured a 1 KiB aio echo at 1.13x the sync
echo's p50 on the 2-core CPU machine (629 against 553 us with everything
else as the bench had it, 641 against 568 us plain); `--kind aio` keeps the
aio server for comparison.

Run it as a process of its own, so that it has a GIL of its own, like the
fuseport server it stands beside:

    python -m fuseport.bench.echo --port-file F [--host 127.0.0.1] [--port 0] [--kind sync|aio]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from fuseport.wire._local import read_port_file, stop_process, write_port_file
from fuseport.wire.hostmem import keep_host_memory

__all__ = [
    "ECHO_METHOD",
    "ECHO_STREAM_METHOD",
    "echo_channel",
    "echo_server",
    "echo_stream_stub",
    "echo_stream_whole_stub",
    "echo_stub",
    "main",
]

log = logging.getLogger(__name__)

ECHO_METHOD = "/fuseport.bench.Echo/Echo"
# The streaming floor: every message of the request stream comes straight back.
ECHO_STREAM_METHOD = "/fuseport.bench.Echo/EchoStream"
# The same, store and forward: the messages come back once the whole request stream is in,
# as a call's results can only start once all its inputs are (a kernel needs all of them).
ECHO_STREAM_WHOLE_METHOD = "/fuseport.bench.Echo/EchoStreamWhole"
MAX_MESSAGE_BYTES = 1 << 30
# Threads of the sync server's pool: one per call in flight (the concurrency
# section runs up to 16 client processes; a stream holds its thread while it
# lasts). The pool starts threads only as calls need them.
SYNC_WORKERS = 64
KINDS = ("sync", "aio")


def _server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    # The same list as fuseport.server.app.Server: a floor built any other way
    # would measure a different transport.
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


def _echo_sync(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _echo_stream_sync(requests: Any, context: grpc.ServicerContext) -> Any:
    yield from requests


def _echo_stream_whole_sync(requests: Any, context: grpc.ServicerContext) -> Any:
    yield from list(requests)


def _handlers(echo: Any, echo_stream: Any, echo_stream_whole: Any) -> tuple[grpc.GenericRpcHandler, ...]:
    return (
        grpc.method_handlers_generic_handler(
            "fuseport.bench.Echo",
            {
                "Echo": grpc.unary_unary_rpc_method_handler(echo),
                "EchoStream": grpc.stream_stream_rpc_method_handler(echo_stream),
                "EchoStreamWhole": grpc.stream_stream_rpc_method_handler(echo_stream_whole),
            },
        ),
    )


def _serve_sync(host: str, port: int, port_file: Path | None, max_message_bytes: int) -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=SYNC_WORKERS), options=_server_options(max_message_bytes)
    )
    server.add_generic_rpc_handlers(_handlers(_echo_sync, _echo_stream_sync, _echo_stream_whole_sync))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    # A list, not a threading.Event: a handler that takes a lock (Event.set) deadlocks when
    # Python runs it while the main thread holds that lock (inside Event.wait) or inside
    # another handler (see server/supervisor.py's _Signals). The loop looks every 0.1 s.
    stopped: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopped.append(signum))
    server.start()
    if port_file is not None:
        write_port_file(port_file, bound)
    log.info("echo server (sync) on %s:%d", host, bound)
    while not stopped:
        time.sleep(0.1)
    server.stop(1.0).wait()


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _echo_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    async for message in requests:
        yield message


async def _echo_stream_whole(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    for message in [m async for m in requests]:
        yield message


async def _serve(host: str, port: int, port_file: Path | None, max_message_bytes: int) -> None:
    server = grpc.aio.server(options=_server_options(max_message_bytes))
    server.add_generic_rpc_handlers(_handlers(_echo, _echo_stream, _echo_stream_whole))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    if port_file is not None:
        write_port_file(port_file, bound)
    log.info("echo server (aio) on %s:%d", host, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuseport.bench.echo", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", type=Path, default=None)
    p.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES)
    p.add_argument("--kind", choices=KINDS, default="sync", help="sync grpc.server (default) or grpc.aio")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The floor gets the host-memory setting fuseport's server has by default, so
    # the comparison is of the protocol work, not of allocator settings.
    keep_host_memory()
    if args.kind == "sync":
        _serve_sync(args.host, args.port, args.port_file, args.max_message_bytes)
    else:
        asyncio.run(_serve(args.host, args.port, args.port_file, args.max_message_bytes))
    return 0


def echo_channel(target: str) -> grpc.Channel:
    """A channel with exactly the options fuseport's Client gives its own."""
    from fuseport.client.client import DEFAULT_MAX_MESSAGE_BYTES, _channel_options

    return grpc.insecure_channel(target, options=_channel_options(DEFAULT_MAX_MESSAGE_BYTES, ()))


def echo_stub(channel: grpc.Channel) -> Callable[..., bytes]:
    """The echo method, bytes in and bytes out (no serializers: identity)."""
    return channel.unary_unary(ECHO_METHOD)  # type: ignore[no-any-return]


def echo_stream_stub(channel: grpc.Channel) -> Callable[..., Any]:
    """The streaming echo: an iterator of bytes in, an iterator of the same bytes out."""
    return channel.stream_stream(ECHO_STREAM_METHOD)


def echo_stream_whole_stub(channel: grpc.Channel) -> Callable[..., Any]:
    """The streaming echo, store and forward: nothing comes back until all went."""
    return channel.stream_stream(ECHO_STREAM_WHOLE_METHOD)


@contextlib.contextmanager
def echo_server(timeout: float = 60.0, kind: str = "sync") -> Iterator[tuple[str, int]]:
    """An echo server process on 127.0.0.1 and a free port: yields (target, pid).
    `kind`: "sync" (grpc.server, the floor) or "aio" (grpc.aio, as fuseport's server)."""
    if kind not in KINDS:
        raise ValueError(f"echo server kind {kind!r}: choose from {', '.join(KINDS)}")
    with tempfile.TemporaryDirectory(prefix="fuseport-echo-") as tmp:
        port_file = Path(tmp) / "port"
        log_path = Path(tmp) / "echo.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fuseport.bench.echo", "--port-file", str(port_file), "--kind", kind],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            port = read_port_file(
                proc, port_file, "the echo server", timeout, lambda: log_path.read_text(errors="replace")
            )
            target = f"127.0.0.1:{port}"
            with grpc.insecure_channel(target) as ch:
                # One call with wait_for_ready: the port file is written after start.
                echo_stub(ch)(b"x", timeout=timeout, wait_for_ready=True)
            yield target, proc.pid
        finally:
            stop_process(proc, timeout=10)


if __name__ == "__main__":
    sys.exit(main())
