"""Every path takes every size its own limits allow: each boundary from both sides.

One server with small limits (a 1 MiB message, 4 MiB of shared memory a session,
8 MiB a stream, 20 MiB a call), so that every boundary is a few MiB away. Each
path is tested for inputs and for results (a small input with a large result
too), through Client and AsyncClient alike (one flow in client/client.py, two
drivers); an error names the limit of the path the call took. Past a path's
limit the client goes to the next path by itself: one message -> a stream,
shared memory -> a stream (a stack over the session, or results over the
session's room and over one message)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from fuseport.client import AsyncClient, Client, ExecuteResult
from fuseport.wire.codec import message_room
from fuseport.wire.errors import ResourceExhausted, ResultTooLarge

from .conftest import ServerProcess, start_server

MESSAGE = 1 << 20  # --max-message-bytes (the clients' max_message_bytes too)
SHM = 4 << 20  # --shared-memory-max-bytes
STREAM = 8 << 20  # --max-stream-bytes
CALL = 20 << 20  # --max-call-bytes
ROOM = message_room(MESSAGE)  # tensor bytes one message carries (983040)
I32 = 4

UNARY = {"shared_memory": False, "stream_above": None}  # one message unless a stack is too large for it
STREAMED = {"shared_memory": False, "stream_above": 0}  # every stack streams
SHARED = {"shared_above": 0}  # every stack through shared memory (a fresh session per client)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(
        tmp_path_factory.mktemp("limits"), None, "--compile-mode", "off",
        "--max-message-bytes", str(MESSAGE), "--shared-memory-max-bytes", str(SHM),
        "--max-stream-bytes", str(STREAM), "--max-call-bytes", str(CALL),
    )  # fmt: skip
    yield s
    s.stop()


def _same(x: torch.Tensor) -> torch.Tensor:
    return x + 0


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[:, None] * b[None, :]


def _outer_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[:, None] * b[None, :]).sum()


@pytest.fixture(scope="module")
def keys(server: ServerProcess) -> dict[str, int]:
    one = torch.ones(4, dtype=torch.int32)
    with Client(server.target, max_message_bytes=MESSAGE) as c:
        return {
            "same": c.register(_same, [one]),
            "outer": c.register(_outer, [one, torch.ones(5, dtype=torch.int32)]),
            "outer_sum": c.register(_outer_sum, [one, torch.ones(5, dtype=torch.int32)]),
        }


def call(kind: str, server: ServerProcess, key: int, stack: list[Any], **options: Any) -> ExecuteResult:
    """One Execute through a fresh client of `kind` ("sync" or "async")."""
    options = {"max_message_bytes": MESSAGE, "timeout": 60, **options}
    if kind == "sync":
        with Client(server.target, **options) as c:
            return c.execute_detailed(key, stack)

    async def run() -> ExecuteResult:
        async with AsyncClient(server.target, **options) as c:
            return await c.execute_detailed(key, stack)

    return asyncio.run(run())


def ints(nbytes: int) -> torch.Tensor:
    return torch.arange(nbytes // I32, dtype=torch.int32)


def outer_of(result_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Small inputs whose outer product is `result_bytes` (a multiple of 4 KiB)."""
    n = result_bytes // I32 // 1024
    return torch.arange(n, dtype=torch.int32), torch.arange(1024, dtype=torch.int32)


CLIENTS = pytest.mark.parametrize("kind", ["sync", "async"])


@CLIENTS
def test_one_message_takes_stacks_and_results_up_to_the_message_and_streams_past_it(
    server: ServerProcess, keys: dict[str, int], kind: str
) -> None:
    for size, transport in ((ROOM, "unary"), (ROOM + I32, "stream")):  # the input, and the result with it
        x = ints(size)
        r = call(kind, server, keys["same"], [x], **UNARY)
        assert (r.transport, torch.equal(r.stack[0], x)) == (transport, True), size
    # A small input with a result at the message's room, and one past it: sent
    # again as a stream by the client (the server refused it before running).
    a, b = outer_of(240 * 4096)
    assert 240 * 4096 == ROOM
    r = call(kind, server, keys["outer"], [a, b], **UNARY)
    assert r.transport == "unary" and torch.equal(r.stack[0], _outer(a, b))
    b = torch.arange(1025, dtype=torch.int32)  # 960 bytes past the room
    r = call(kind, server, keys["outer"], [a, b], **UNARY)
    assert r.transport == "stream" and torch.equal(r.stack[0], _outer(a, b))


@CLIENTS
def test_values_below_the_inputs_count_toward_the_response_and_a_stream_carries_them(
    server: ServerProcess, keys: dict[str, int], kind: str
) -> None:
    # They come back with the results: a response over one message with them is refused
    # before running (it was refused only once encoded, after the kernel ran), and the
    # client sends the call again as a stream, which carries them.
    below = ints(ROOM // 2)
    a, b = outer_of(180 * 4096)  # the request fits one message, the response does not
    r = call(kind, server, keys["outer"], [below, a, b], **UNARY)
    assert r.transport == "stream"
    assert torch.equal(r.stack[0], below) and torch.equal(r.stack[1], _outer(a, b))
    a, b = outer_of(100 * 4096)  # both fit
    r = call(kind, server, keys["outer"], [below, a, b], **UNARY)
    assert r.transport == "unary" and torch.equal(r.stack[0], below) and torch.equal(r.stack[1], _outer(a, b))
    # Not only tensors' bytes: a string, and the framing of many small tensors, count too.
    a, b = outer_of(180 * 4096)
    text = "x" * (ROOM // 2)
    r = call(kind, server, keys["outer"], [text, a, b], **UNARY)
    assert (r.transport, r.stack[0]) == ("stream", text) and torch.equal(r.stack[1], _outer(a, b))
    small = [torch.full((1,), i % 256, dtype=torch.uint8) for i in range(20_000)]  # ~320 KB framed, 20 KB of bytes
    r = call(kind, server, keys["outer"], [small, a, b], **UNARY)
    assert r.transport == "stream" and torch.equal(r.stack[1], _outer(a, b))
    assert all(torch.equal(x, y) for x, y in zip(r.stack[0], small, strict=True))


@CLIENTS
def test_a_stream_takes_stacks_and_results_up_to_max_stream_bytes_and_names_it_past_them(
    server: ServerProcess, keys: dict[str, int], kind: str
) -> None:
    x = ints(STREAM)
    r = call(kind, server, keys["same"], [x], **STREAMED)
    assert r.transport == "stream" and torch.equal(r.stack[0], x)
    with pytest.raises(ResourceExhausted, match=r"--max-stream-bytes\); refused before allocating") as e:
        call(kind, server, keys["same"], [ints(STREAM + I32)], **STREAMED)
    assert not isinstance(e.value, ResultTooLarge)
    a, b = outer_of(STREAM)  # a small input, the largest result a stream returns
    r = call(kind, server, keys["outer"], [a, b], **STREAMED)
    assert r.transport == "stream" and torch.equal(r.stack[0], _outer(a, b))
    with pytest.raises(ResourceExhausted, match=r"over the streamed result limit .*--max-stream-bytes") as e:
        call(kind, server, keys["outer"], [a, torch.arange(1025, dtype=torch.int32)], **STREAMED)
    assert not isinstance(e.value, ResultTooLarge)
    # A unary call whose result is past the stream's limit too: the error names the stream's.
    with pytest.raises(ResourceExhausted, match="--max-stream-bytes"):
        call(kind, server, keys["outer"], [a, torch.arange(1025, dtype=torch.int32)], **UNARY)


@CLIENTS
def test_shared_memory_takes_a_stack_up_to_the_sessions_budget_and_streams_past_it(
    server: ServerProcess, keys: dict[str, int], kind: str
) -> None:
    two = torch.ones(2, dtype=torch.int32)  # its region takes 64 bytes (tensors start on cache lines)
    x = ints(SHM - 64)  # with `two`, the whole budget; the result (a sum) comes back as bytes
    r = call(kind, server, keys["outer_sum"], [x, two], **SHARED)
    assert r.transport == "shm" and r.stack[0].item() == 2 * x.sum().item()
    x = ints(SHM)  # over what the session may map: the network, as a stream (over one message)
    r = call(kind, server, keys["outer_sum"], [x, two], **SHARED)
    assert r.transport == "stream" and r.stack[0].item() == 2 * x.sum().item()


@CLIENTS
def test_shared_memory_takes_results_up_to_the_sessions_room_and_streams_past_it(
    server: ServerProcess, keys: dict[str, int], kind: str
) -> None:
    # The inputs' region takes 1 MiB of the session's 4: results get 3.
    a, b = outer_of(SHM - (1 << 20))
    r = call(kind, server, keys["outer"], [a, b], **SHARED)
    assert r.transport == "shm" and torch.equal(r.stack[0], _outer(a, b))
    b = torch.arange(1025, dtype=torch.int32)  # 3 KiB past the room, and over one message
    r = call(kind, server, keys["outer"], [a, b], **SHARED)
    assert r.transport == "stream" and torch.equal(r.stack[0], _outer(a, b))
    # A huge result from a small input: over the stream's limit too, named as such.
    with pytest.raises(ResourceExhausted, match="--max-stream-bytes"):
        call(kind, server, keys["outer"], [torch.arange(4096, dtype=torch.int32), b], **SHARED)


@CLIENTS
@pytest.mark.parametrize("path", ["unary", "stream", "shm"])
def test_every_path_refuses_a_call_over_max_call_bytes_naming_it(
    server: ServerProcess, keys: dict[str, int], kind: str, path: str
) -> None:
    options = {"unary": UNARY, "stream": STREAMED, "shm": SHARED}[path]
    a, b = outer_of(16 << 20)  # a 16 MiB intermediate: within the call's 20
    r = call(kind, server, keys["outer_sum"], [a, b], **options)
    assert r.transport == path and r.stack[0].item() == _outer_sum(a, b).item()
    a, b = outer_of(24 << 20)
    with pytest.raises(ResourceExhausted, match=r"--max-call-bytes\); refused before running"):
        call(kind, server, keys["outer_sum"], [a, b], **options)
