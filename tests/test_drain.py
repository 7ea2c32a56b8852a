"""SIGTERM under load: every call ends OK or UNAVAILABLE (safe to retry), never CANCELLED.

gRPC's own shutdown ends calls that reached the server but no handler yet with
CANCELLED (grpc/grpc#41785); with four callers in tight loops there are always
some, so a server that relies on it fails this test on nearly every run.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from fuseport.client import Client, capture
from fuseport.server import Settings, create_server
from fuseport.wire import codec

from .conftest import start_server

_METHOD = "/fuseport.v1.KernelService/{}"


def _double(x):
    return x * 2


@pytest.mark.compat  # gRPC's shutdown behaviour is what differs between versions
def test_sigterm_under_load_ends_every_call_ok_or_unavailable(tmp_path: Path) -> None:
    with ThreadPoolExecutor(1) as pool:
        capturing = pool.submit(capture, _double, [torch.randn(16)])  # the first capture takes seconds
        # Compiling is beside the point here, and on a small machine it would
        # take the cores the callers and the server need.
        server = start_server(tmp_path, None, "--compile-mode", "off")
        graph = capturing.result()
    codes: collections.Counter[grpc.StatusCode] = collections.Counter()
    odd: list[str] = []  # what the calls that were neither OK nor UNAVAILABLE said
    ok_before = 0
    progress = threading.Condition()
    signalled = threading.Event()
    exited = threading.Event()

    def caller(method: str, request: bytes) -> None:
        nonlocal ok_before
        with grpc.insecure_channel(server.target) as channel:  # no retries: the status as the server sent it
            call = channel.unary_unary(_METHOD.format(method))
            while True:
                last = exited.is_set()  # this call starts after the process is gone
                try:
                    call(request, timeout=30)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    code = e.code()
                    if code is not grpc.StatusCode.UNAVAILABLE:
                        odd.append(f"{method}: {code.name}: {e.details()}")
                with progress:
                    codes[code] += 1
                    if code is grpc.StatusCode.OK and not signalled.is_set():
                        ok_before += 1
                        progress.notify_all()
                if last:
                    return

    try:
        with Client(server.target, timeout=60) as c:
            key = c.register(graph)
        # Small calls to a quick kernel run on the server's event loop, the
        # busier it is the more calls wait in gRPC for a handler.
        request = codec.encode_execute_request(key, [torch.randn(16)])
        threads = [
            threading.Thread(target=caller, args=(method, request), daemon=True)
            for method in ("Execute", "Fallback", "Execute", "Fallback")
        ]
        for t in threads:
            t.start()
        with progress:
            assert progress.wait_for(lambda: ok_before >= 200, timeout=60), f"no progress: {dict(codes)}"
            signalled.set()
            server.proc.send_signal(signal.SIGTERM)
        returncode = server.proc.wait(timeout=60)
    finally:
        exited.set()  # each caller makes one more call, to a server that is gone, and returns
        server.stop(signal.SIGKILL)
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a caller hung"

    assert returncode == 0, server.log()[-3000:]
    assert ok_before >= 200
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, (
        f"{ {c.name: n for c, n in codes.items()} }: {odd[:10]}"
    )
    # Every caller's last call found the server gone.
    assert codes[grpc.StatusCode.UNAVAILABLE] >= len(threads)


def test_calls_refused_while_draining_are_counted_with_their_code(tmp_path: Path) -> None:
    """The gate answers UNAVAILABLE before any handler runs: metrics count those
    calls too, or a draining replica's refusals would be invisible."""
    def refused(url: str) -> float:
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "fuseport_requests_total" and s.labels["code"] == "UNAVAILABLE"
            and s.labels["method"] == "Execute"
        )

    async def run() -> tuple[float, float, grpc.StatusCode]:
        settings = Settings(host="127.0.0.1", port=0, store_dir=tmp_path, device="cpu", compile_mode="off",
                            metrics_port=0)  # fmt: skip
        server, port = await create_server(settings)
        await server.start()
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        try:
            before = await asyncio.to_thread(refused, url)
            await server.drain(0)
            # A plain channel: no retries, one call, one refusal.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    await channel.unary_unary(_METHOD.format("Execute"))(b"", timeout=30)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    code = e.code()
            return before, await asyncio.to_thread(refused, url), code
        finally:
            await server.stop(0)

    before, after, code = asyncio.run(run())
    assert code is grpc.StatusCode.UNAVAILABLE
    assert (before, after) == (0, 1)
