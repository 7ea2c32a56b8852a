"""AsyncClient and device-resident values: the blocking client's behaviour, as coroutines."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from fuseport.client import AsyncClient, Client, HandleNotFound, RemoteTensor
from fuseport.client.resident import CLIENT_ID_KEY
from fuseport.wire import _pb, codec
from fuseport.wire.errors import ERROR_METADATA_KEY, error_from_status

from .conftest import ServerProcess, start_server

# Short, so that the expiry tests wait seconds; long enough that a handle used
# right after it is made never expires first (as in test_resident.py).
LEASE = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Compile mode off: handles are not about compiling."""
    tmp = tmp_path_factory.mktemp("async_resident")
    s = start_server(tmp, None, "--compile-mode", "off", "--handle-lease-seconds", str(LEASE))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def kernels(server: ServerProcess) -> dict[str, int]:
    x = torch.ones(4)
    with Client(server.target, timeout=60) as c:
        return {
            "affine": c.register(lambda t: t * 2 + 1, [x]),
            "square": c.register(lambda t: t * t, [x]),
            "sub": c.register(lambda a, b: a - b, [x, torch.zeros(4)]),
        }


def call(server: ServerProcess, method: str, request: bytes, client_id: str) -> bytes:
    """A KernelService call with exactly this client id (no client's own thread or lease)."""
    with grpc.insecure_channel(server.target) as channel:
        try:
            return channel.unary_unary(f"/fuseport.v1.KernelService/{method}")(  # type: ignore[no-any-return]
                request, timeout=60, metadata=((CLIENT_ID_KEY, client_id),)
            )
        except grpc.RpcError as e:
            name = dict(e.trailing_metadata() or ()).get(ERROR_METADATA_KEY)
            raise error_from_status(e.code(), e.details() or "", name) from e


def held(server: ServerProcess, client_id: str) -> int:
    """How many handles the server holds for a client (List renews nothing)."""
    return _pb.service.ListResponse.FromString(call(server, "List", b"", client_id)).resident.caller.handles


def execute_raw(server: ServerProcess, key: int, stack: list, client_id: str, keep: bool = False) -> list:
    raw = call(server, "Execute", codec.encode_execute_request(key, stack, keep_outputs=keep), client_id)
    return codec.decode_execute_response(raw).stack


async def wait_until_held(server: ServerProcess, client_id: str, handles: int) -> None:
    """Polls the server off the event loop (the loop keeps serving the client's lease)."""
    deadline = time.monotonic() + 120
    while await asyncio.to_thread(held, server, client_id) != handles:
        assert time.monotonic() < deadline, f"client {client_id[:8]} never came to hold {handles} handles"
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- positive


def test_keep_then_fetch_equals_eager(server: ServerProcess, kernels: dict[str, int]) -> None:
    x = torch.randn(1000)

    async def main() -> None:
        async with AsyncClient(server.target, timeout=60) as c:
            (a,) = await c.execute(kernels["affine"], [x], keep=True)
            assert isinstance(a, RemoteTensor)
            assert (a.dtype, a.shape, a.device, a.nbytes) == (torch.float32, torch.Size([1000]), "cpu", 4000)
            res = await c.fallback_detailed(kernels["affine"], ["below", x], keep=True)
            assert (
                res.path == "fallback" and res.stack[0] == "below" and isinstance(res.stack[1], RemoteTensor)
            )
            (f,) = await c.fallback(kernels["square"], [x], keep=True)
            assert held(server, c.client_id) == 3
            assert (await c.renew_lease()).handles == 3
            info = await c.resident()
            assert info.caller.handles == 3 and info.caller.bytes == 3 * 4000
            values = await c.fetch([a, res.stack[1], f])
            assert torch.equal(values[0], x * 2 + 1) and torch.equal(values[1], x * 2 + 1)
            assert torch.equal(values[2], x * x)
            assert not a.freed and held(server, c.client_id) == 3  # fetch without free keeps them
            assert torch.equal((await c.fetch([a], free=True))[0], x * 2 + 1)
            assert a.freed and held(server, c.client_id) == 2
            assert await c.free([res.stack[1], f]) == 2
            assert held(server, c.client_id) == 0

    asyncio.run(main())


def test_chain_of_two_calls_on_handles(server: ServerProcess, kernels: dict[str, int]) -> None:
    x = torch.randn(257)

    async def main() -> None:
        async with AsyncClient(server.target, timeout=60) as c:
            (a,) = await c.execute(kernels["affine"], [x], keep=True)
            (b,) = await c.execute(kernels["square"], [a], keep=True)  # no bytes move
            out = (await c.execute(kernels["sub"], [b, a]))[0]  # handles in, bytes out
            assert torch.equal(out, (x * 2 + 1) * (x * 2 + 1) - (x * 2 + 1))
            mixed = (await c.execute(kernels["sub"], [b, x]))[0]  # a handle and a tensor
            assert torch.equal(mixed, (x * 2 + 1) * (x * 2 + 1) - x)
            assert await c.free([a, b]) == 2

    asyncio.run(main())


# --------------------------------------------------------------------------- refusals


def test_freed_handle_is_refused(server: ServerProcess, kernels: dict[str, int]) -> None:
    async def main() -> None:
        async with AsyncClient(server.target, timeout=60) as c:
            (h,) = await c.execute(kernels["affine"], [torch.ones(3)], keep=True)
            hid = h.id
            assert await c.free([h]) == 1
            assert h.freed and await c.free([h]) == 0  # a second free does nothing
            with pytest.raises(HandleNotFound, match="was freed"):
                await c.execute(kernels["affine"], [h])
            with pytest.raises(HandleNotFound, match="was freed"):
                await c.fetch([h])
            # The server's own refusal, for the id sent as a bare handle.
            with pytest.raises(HandleNotFound, match="no live handle"):
                await c.execute(kernels["affine"], [codec.Handle(hid)])
            # ... and the client still serves.
            assert torch.equal(
                (await c.execute(kernels["affine"], [torch.ones(2)]))[0], torch.full((2,), 3.0)
            )

    asyncio.run(main())


def test_handle_of_another_client_is_refused_both_ways(
    server: ServerProcess, kernels: dict[str, int]
) -> None:
    key = kernels["affine"]
    with Client(server.target, timeout=60) as blocking:
        (theirs,) = blocking.execute(key, [torch.ones(2)], keep=True)

        async def main() -> RemoteTensor:
            async with (
                AsyncClient(server.target, timeout=60) as c,
                AsyncClient(server.target, timeout=60) as d,
            ):
                with pytest.raises(HandleNotFound, match="another Client"):
                    await c.execute(key, [theirs])
                (ours,) = await c.execute(key, [torch.ones(2)], keep=True)
                with pytest.raises(HandleNotFound, match="another Client"):
                    await d.execute(key, [ours])  # another AsyncClient's
                # Fetching another's handle: the server does not know it for this client.
                with pytest.raises(HandleNotFound):
                    await d.fetch([ours])
                assert held(server, c.client_id) == 1
                return ours

        ours = asyncio.run(main())
        with pytest.raises(HandleNotFound, match="another Client"):
            blocking.execute(key, [ours])
        assert torch.equal(theirs.fetch(free=True), torch.full((2,), 3.0))  # untouched by all this


def test_blocking_methods_of_an_async_handle(server: ServerProcess, kernels: dict[str, int]) -> None:
    """On the event loop's thread they would wait for the loop they block: a
    TypeError names the coroutine, and the handle is left as it was. From
    another thread they work, through the client's loop."""

    async def main() -> None:
        async with AsyncClient(server.target, timeout=60) as c:
            (h,) = await c.execute(kernels["affine"], [torch.ones(3)], keep=True)
            with pytest.raises(TypeError, match=r"await client\.fetch\(\[tensor\]\)"):
                h.fetch()
            with pytest.raises(TypeError, match=r"await client\.free\(\[tensor\]\)"):
                h.free()
            with pytest.raises(TypeError, match=r"await client\.free\(\[tensor\]\)"):
                with h:
                    pass
            assert not h.freed and held(server, c.client_id) == 1
            assert torch.equal(await asyncio.to_thread(h.fetch), torch.full((3,), 3.0))
            await asyncio.to_thread(h.free)
            assert h.freed and held(server, c.client_id) == 0
            (g,) = await c.execute(kernels["affine"], [torch.ones(2)], keep=True)
            assert torch.equal(await asyncio.to_thread(g.fetch, free=True), torch.full((2,), 3.0))
            assert g.freed and held(server, c.client_id) == 0

    asyncio.run(main())


# --------------------------------------------------------------------------- lifetime


def test_close_frees_the_handles(server: ServerProcess, kernels: dict[str, int]) -> None:
    async def main() -> tuple[str, RemoteTensor]:
        c = AsyncClient(server.target, timeout=60)
        (a,) = await c.execute(kernels["affine"], [torch.ones(8)], keep=True)
        await c.execute(kernels["square"], [torch.ones(8)], keep=True)
        assert held(server, c.client_id) == 2
        await c.close()
        assert held(server, c.client_id) == 0
        with pytest.raises(HandleNotFound, match="closed client"):
            await c.fetch([a])
        return c.client_id, a

    client_id, a = asyncio.run(main())
    assert held(server, client_id) == 0
    with pytest.raises(HandleNotFound, match="closed client"):
        a.fetch()


def test_dropped_remote_tensors_are_freed(server: ServerProcess, kernels: dict[str, int]) -> None:
    """The lease thread frees them, through the client's event loop."""

    async def main() -> None:
        async with AsyncClient(server.target, timeout=60) as c:
            (kept,) = await c.execute(kernels["affine"], [torch.ones(2)], keep=True)
            dropped = [(await c.execute(kernels["affine"], [torch.ones(2)], keep=True))[0] for _ in range(3)]
            assert held(server, c.client_id) == 4
            del dropped
            gc.collect()
            await wait_until_held(server, c.client_id, 1)
            assert torch.equal((await c.fetch([kept]))[0], torch.full((2,), 3.0))

    asyncio.run(main())


def test_handles_are_renewed_while_the_client_lives(server: ServerProcess, kernels: dict[str, int]) -> None:
    """A client that never renews loses its handle after the lease; the
    AsyncClient's, made before it, outlives it: its lease is renewed."""
    key = kernels["affine"]

    async def main() -> None:
        async with AsyncClient(server.target, timeout=60) as c:
            (alive,) = await c.execute(key, [torch.ones(2)], keep=True)
            silent = secrets.token_urlsafe(24)
            await asyncio.to_thread(execute_raw, server, key, [torch.ones(4)], silent, True)
            await wait_until_held(server, silent, 0)  # a whole lease has passed
            assert torch.equal((await c.execute(key, [alive]))[0], torch.full((2,), 7.0))
            assert (await c.renew_lease()).handles == 1

    asyncio.run(main())


def test_handles_expire_when_the_client_is_gone(
    server: ServerProcess, kernels: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    """An AsyncClient never closed, whose event loop ended: its lease thread
    says so and ends, nothing renews the lease any more, and the server frees
    its handles once it runs out."""

    async def main() -> tuple[str, RemoteTensor]:
        c = AsyncClient(server.target, timeout=60)
        (h,) = await c.execute(kernels["affine"], [torch.ones(2)], keep=True)
        return c.client_id, h

    caplog.set_level(logging.WARNING, logger="fuseport.client")
    client_id, h = asyncio.run(main())
    assert held(server, client_id) == 1
    deadline = time.monotonic() + 120
    while not any("event loop ended before close()" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the lease thread never noticed that the loop had ended"
        time.sleep(0.05)
    with pytest.raises(HandleNotFound, match="closed client"):
        h.fetch()
    while held(server, client_id):
        assert time.monotonic() < deadline, "handles of a client whose loop ended never expired"
        time.sleep(0.2)
    with pytest.raises(HandleNotFound, match="no live handle"):
        execute_raw(server, kernels["affine"], [codec.Handle(h.id)], client_id)


def test_a_kept_call_its_caller_cancels_keeps_nothing(server: ServerProcess) -> None:
    # The kernel runs on (a worker is not interrupted), and its outputs were kept for a
    # caller that never hears their ids; the lease thread renewed them with the client's
    # other handles for as long as the client lived (found by an adversarial probe).
    async def main() -> None:
        async with AsyncClient(server.target, timeout=120) as c:
            key = await c.register(lambda x: x @ x @ x @ x, [torch.randn(8, 8)])
            (h,) = await c.execute(key, [torch.randn(1000, 1000)], keep=True)  # a worker's call, not the loop's
            for _ in range(3):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(c.execute(key, [h], keep=True), 0.02)
            deadline = time.monotonic() + 60
            while (held := (await c.resident()).caller.handles) != 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the cancelled calls' kernels end, then what they kept goes
            assert held == 1

    asyncio.run(main())
