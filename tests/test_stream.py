"""Streamed Execute/Fallback (ExecuteStream/FallbackStream): hostile streams first, then round trips.

The hostile streams are written with the generated protobuf classes alone, as
a client in another language would write them, and sent on a raw channel to a
real server, which must answer each with a clear error naming what is wrong
and keep serving."""

from __future__ import annotations

import asyncio
import gc
import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crc32c
import grpc
import pytest
import torch

from fuseport.client import AsyncClient, Client
from fuseport.server.core import Core
from fuseport.server.resident import NO_OWNER, Owner
from fuseport.server.settings import Settings
from fuseport.server.streams import StreamBuffers
from fuseport.wire import _pb
from fuseport.wire.errors import (
    ERROR_METADATA_KEY,
    InvalidStack,
    ResourceExhausted,
    ResultTooLarge,
    SharedMemoryUnavailable,
)
from fuseport.wire.hostmem import PagePool
from fuseport.wire.stream import Writer

from .conftest import ServerProcess, start_server

KEEP = 64 << 20  # the server's --keep-host-memory-bytes: past it, freed memory goes back to the OS
SERVICE = "/fuseport.v1.KernelService/"
STREAM_LIMIT = 2 << 30


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(
        tmp_path_factory.mktemp("stream"),
        None,
        "--compile-mode", "off",
        "--keep-host-memory-bytes", str(KEEP),
        "--max-stream-bytes", str(STREAM_LIMIT),
        # This module is about the network path; next to the server, clients
        # would take shared memory (tests/test_shm.py).
        "--shared-memory", "off",
    )  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(scope="module")
def key(server: ServerProcess) -> int:
    with Client(server.target) as c:
        return c.register(_double, [torch.ones(4)])


# --------------------------------------------------------------------------- building streams by hand


def header(key: int, tensors: list[tuple[int, list[int]]], sizes: list[int] | None = None) -> bytes:
    """A request header whose stack is the given (dtype enum, shape) tensors."""
    stack = [_pb.values.Value(tensor=_pb.values.Tensor(dtype=d, shape=s)) for d, s in tensors]
    if sizes is None:
        sizes = [math.prod(s) * 4 for _, s in tensors]  # float32 unless told
    return _pb.service.StackChunk(
        request=_pb.service.StreamRequestHeader(key=key, stack=stack, sizes=sizes)
    ).SerializeToString()


def data(tensor: int, offset: int, payload: bytes, crc: int | None = None) -> bytes:
    return _pb.service.StackChunk(
        data=_pb.service.StreamData(
            tensor=tensor, offset=offset, data=payload, crc32c=crc32c.crc32c(payload) if crc is None else crc
        )
    ).SerializeToString()


def end(chunks: int, nbytes: int) -> bytes:
    return _pb.service.StackChunk(end=_pb.service.StreamEnd(chunks=chunks, bytes=nbytes)).SerializeToString()


F32 = _pb.values.DTYPE_FLOAT32


def call(server: ServerProcess, messages: list[bytes], method: str = "ExecuteStream") -> list[bytes]:
    """The response messages of one raw streamed call."""
    with grpc.insecure_channel(server.target) as ch:
        return list(ch.stream_stream(SERVICE + method)(iter(messages), timeout=60))


def refused(server: ServerProcess, messages: list[bytes], code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(server, messages)
    e: Any = info.value
    assert e.code() == code, e.details()
    for w in words:
        assert w in e.details(), f"{w!r} not in {e.details()!r}"
    names = dict(e.trailing_metadata() or ())
    assert ERROR_METADATA_KEY in names
    return str(e.details())


def still_serves(server: ServerProcess, key: int) -> None:
    x = torch.randn(8)
    with Client(server.target, stream_above=0) as c:
        r = c.execute_detailed(key, [x])
    assert r.transport == "stream" and torch.equal(r.stack[0], x * 2 + 1)


# --------------------------------------------------------------------------- hostile streams


def test_stream_that_stops_before_all_bytes_is_refused_as_truncated(server: ServerProcess, key: int) -> None:
    payload = torch.ones(1024).numpy().tobytes()
    msgs = [header(key, [(F32, [1024])]), data(0, 0, payload[:1000])]
    refused(server, msgs, grpc.StatusCode.INVALID_ARGUMENT, "stack[0] incomplete", "1000 of its 4096")
    still_serves(server, key)


def test_end_that_arrives_with_bytes_missing_is_refused(server: ServerProcess, key: int) -> None:
    payload = bytes(4096)
    msgs = [header(key, [(F32, [1024])]), data(0, 0, payload[:1000]), end(1, 1000)]
    refused(server, msgs, grpc.StatusCode.INVALID_ARGUMENT, "the end arrived", "1000 of its 4096")


def test_end_whose_counts_disagree_is_refused(server: ServerProcess, key: int) -> None:
    payload = bytes(4096)
    msgs = [header(key, [(F32, [1024])]), data(0, 0, payload), end(2, 4096)]
    refused(server, msgs, grpc.StatusCode.INVALID_ARGUMENT, "the end says 2 chunks")


def test_corrupted_chunk_fails_its_crc32c(server: ServerProcess, key: int) -> None:
    payload = bytearray(torch.arange(1024, dtype=torch.float32).numpy().tobytes())
    good_crc = crc32c.crc32c(bytes(payload))
    payload[77] ^= 0x10  # one bit flipped on the way
    msgs = [header(key, [(F32, [1024])]), data(0, 0, bytes(payload), crc=good_crc), end(1, 4096)]
    refused(server, msgs, grpc.StatusCode.INVALID_ARGUMENT, "CRC-32C", "corrupted", "chunk 0")
    still_serves(server, key)


def test_chunk_for_a_tensor_the_header_does_not_declare_is_refused(server: ServerProcess, key: int) -> None:
    msgs = [header(key, [(F32, [4])]), data(3, 0, bytes(16)), end(1, 16)]
    refused(server, msgs, grpc.StatusCode.INVALID_ARGUMENT, "tensor 3", "declares 1 tensors")


@pytest.mark.parametrize(
    ("chunks", "words"),
    [
        ([(0, 8), (4, 8)], ("offset 4, expected 8", "without gaps or overlaps")),  # overlap
        ([(0, 8), (12, 4)], ("offset 12, expected 8",)),  # gap
        ([(8, 8)], ("offset 8, expected 0",)),  # out of order
        ([(0, 8), (8, 12)], ("runs to byte 20", "declared size of 16")),  # beyond the declared size
    ],
    ids=["overlapping", "gap", "out-of-order", "beyond-declared-size"],
)
def test_chunk_at_a_wrong_offset_is_refused(
    server: ServerProcess, key: int, chunks: list[tuple[int, int]], words: tuple[str, ...]
) -> None:
    msgs = (
        [header(key, [(F32, [4])])] + [data(0, off, bytes(n)) for off, n in chunks] + [end(len(chunks), 16)]
    )
    refused(server, msgs, grpc.StatusCode.INVALID_ARGUMENT, *words)


def test_header_lying_about_a_size_is_refused(server: ServerProcess, key: int) -> None:
    msgs = [header(key, [(F32, [1024])], sizes=[100]), data(0, 0, bytes(100)), end(1, 100)]
    refused(server, msgs, grpc.StatusCode.INVALID_ARGUMENT, "needs 4096 bytes", "declared size is 100")


def test_header_with_a_size_missing_is_refused(server: ServerProcess, key: int) -> None:
    msgs = [header(key, [(F32, [4]), (F32, [4])], sizes=[16]), end(0, 0)]
    refused(server, msgs, grpc.StatusCode.INVALID_ARGUMENT, "1 sizes for 2 tensors")


def test_header_tensor_carrying_bytes_is_refused(server: ServerProcess, key: int) -> None:
    stack = [_pb.values.Value(tensor=_pb.values.Tensor(dtype=F32, shape=[1], data=bytes(4)))]
    msg = _pb.service.StackChunk(request=_pb.service.StreamRequestHeader(key=key, stack=stack, sizes=[4]))
    refused(server, [msg.SerializeToString(), end(0, 0)], grpc.StatusCode.INVALID_ARGUMENT, "carries data")


def test_data_before_the_header_is_refused(server: ServerProcess, key: int) -> None:
    msgs = [data(0, 0, bytes(16)), header(key, [(F32, [4])]), end(1, 16)]
    refused(server, msgs, grpc.StatusCode.INVALID_ARGUMENT, "before the header")


def test_second_header_is_refused(server: ServerProcess, key: int) -> None:
    h = header(key, [(F32, [4])])
    refused(
        server, [h, h, data(0, 0, bytes(16)), end(1, 16)], grpc.StatusCode.INVALID_ARGUMENT, "a second header"
    )


def test_response_header_in_a_request_is_refused(server: ServerProcess, key: int) -> None:
    msg = _pb.service.StackChunk(response=_pb.service.StreamResponseHeader()).SerializeToString()
    refused(server, [msg, end(0, 0)], grpc.StatusCode.INVALID_ARGUMENT, "expected a request header")


def test_message_after_the_end_is_refused(server: ServerProcess, key: int) -> None:
    msgs = [header(key, [(F32, [4])]), data(0, 0, bytes(16)), end(1, 16), data(0, 16, bytes(4))]
    refused(server, msgs, grpc.StatusCode.INVALID_ARGUMENT, "after the end")


def test_empty_stream_is_refused(server: ServerProcess, key: int) -> None:
    refused(server, [], grpc.StatusCode.INVALID_ARGUMENT, "ended before its header")


def test_huge_declared_size_is_refused_before_allocation_naming_the_limit(
    server: ServerProcess, key: int
) -> None:
    before = server.rss()
    shape = [1 << 20, 1 << 20, 1 << 20]  # 4 EiB of float32
    msgs = [header(key, [(F32, shape)]), data(0, 0, bytes(16))]
    refused(
        server, msgs, grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-stream-bytes", "refused before allocating"
    )
    assert server.rss() - before < 64 << 20
    still_serves(server, key)


def test_stream_over_the_call_budget_is_refused_from_its_header(tmp_path: Path) -> None:
    core = Core(Settings(store_dir=tmp_path, compile_mode="off", max_call_bytes=1 << 30))
    with pytest.raises(ResourceExhausted, match="--max-call-bytes"):
        core.check_stream([1 << 29, (1 << 29) + 1])
    core.check_stream([1 << 29, 1 << 29])  # exactly the budget


def test_stream_buffers_count_headers_in_total_and_per_token_and_an_ended_stream_takes_nothing() -> None:
    buffers = StreamBuffers(limit=100, per_token=60)
    token_a, token_b = Owner(b"", False, b"a"), Owner(b"", False, b"b")
    first = buffers.hold(token_a)
    first.take(50)
    with pytest.raises(ResourceExhausted, match="--max-stream-buffer-bytes-per-token"):
        buffers.hold(token_a).take(11)
    anonymous = buffers.hold(NO_OWNER)  # no token: the total alone bounds it
    anonymous.take(50)
    with pytest.raises(ResourceExhausted, match=r"\(--max-stream-buffer-bytes\)"):
        buffers.hold(token_b).take(1)
    first.release()
    first.release()  # once only
    assert buffers.held == 50
    # A header checked on a worker after its stream ended (idle, cancelled) must not hold for good.
    late = buffers.hold(token_b)
    late.release()
    with pytest.raises(InvalidStack):
        late.take(10)
    anonymous.release()
    assert buffers.held == 0
    buffers.hold(token_a).take(60)  # the token's whole share again: nothing of the first is left


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.expand(n, -1) * 1


def test_result_over_the_stream_limit_is_refused_before_running(server: ServerProcess, key: int) -> None:
    x = torch.ones(1 << 20, dtype=torch.uint8)
    with Client(server.target, stream_above=0) as c:
        k = c.register(_rows, [x, 8])
        assert c.execute_detailed(k, [x, 3]).transport == "stream"
        with pytest.raises(ResourceExhausted, match="--max-stream-bytes"):
            c.execute(k, [x, (STREAM_LIMIT >> 20) + 1])  # 1 MiB in, 2 GiB + 1 MiB out
    still_serves(server, key)


def test_a_result_whose_size_overflows_64_bits_is_refused_as_too_large_before_running(
    server: ServerProcess, key: int
) -> None:
    """2**59 rows of 4 floats are 2**63 bytes, one byte past what torch counts in an
    int64 (its meta run raises "Storage size calculation overflowed"); 2**61 rows
    overflow the element count itself. Either is a size no device holds:
    RESOURCE_EXHAUSTED before anything runs, on every path, not ExecutionFailed."""
    x = torch.ones(4)
    with Client(server.target) as unary, Client(server.target, stream_above=0) as streamed:
        k = unary.register(_rows, [x, 8])
        for n in (1 << 59, 1 << 61):
            for run in (unary.execute, unary.fallback, streamed.execute):
                with pytest.raises(ResourceExhausted, match="refused before running") as info:
                    run(k, [x, n])
                assert not isinstance(info.value, ResultTooLarge)  # no stream is sent again for it
                assert f"more than {2**63 - 1} bytes" in str(info.value), str(info.value)
                assert "aten::" in str(info.value)  # the op that makes it
        assert torch.equal(unary.execute(k, [x, 3])[0], torch.ones(3, 4))
    still_serves(server, key)


_KILLED_CLIENT = r"""
import sys, time, grpc, crc32c
from fuseport.wire import _pb
target, key, total, sent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
chunk = bytes(range(256)) * (4 << 12)  # 4 MiB
crc = crc32c.crc32c(chunk)

def messages():
    t = _pb.values.Tensor(dtype=_pb.values.DTYPE_UINT8, shape=[total])
    yield _pb.service.StackChunk(request=_pb.service.StreamRequestHeader(
        key=key, stack=[_pb.values.Value(tensor=t)], sizes=[total])).SerializeToString()
    for off in range(0, sent, len(chunk)):
        yield _pb.service.StackChunk(data=_pb.service.StreamData(
            tensor=0, offset=off, crc32c=crc, data=chunk)).SerializeToString()
    print("sent", flush=True)
    while True:  # never ends the stream: the parent kills this process
        time.sleep(60)

with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
    list(ch.stream_stream("/fuseport.v1.KernelService/ExecuteStream")(messages()))
"""


def test_client_killed_mid_stream_frees_the_calls_memory_and_the_server_keeps_serving(
    server: ServerProcess, key: int
) -> None:
    still_serves(server, key)
    before = server.rss()
    total, sent = 1 << 30, 512 << 20
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CLIENT, server.target, str(key), str(total), str(sent)],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"sent"
        # The chunks are in the server's memory (gRPC may still be delivering the last ones).
        deadline = time.monotonic() + 60
        while server.rss() - before < 400 << 20:
            assert time.monotonic() < deadline, f"server grew only {(server.rss() - before) >> 20} MiB"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 60
    while (grown := server.rss() - before) > KEEP + (32 << 20) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert grown <= KEEP + (32 << 20), f"the server still holds {grown >> 20} MiB of a dead client's call"
    still_serves(server, key)


# --------------------------------------------------------------------------- stalled streams

IDLE_SECONDS = 1  # --stream-idle-seconds of the idle server below
IDLE_BUFFER = 96 << 20  # its --max-stream-buffer-bytes
U8 = _pb.values.DTYPE_UINT8


def register_header(nbytes: int) -> bytes:
    """A RegisterStream header declaring one uint8 constant of `nbytes`, to come in chunks."""
    graph = _pb.graph.Graph()
    graph.constants.add(dtype=U8, shape=[nbytes])
    request = _pb.service.RegisterRequest(graph=graph)
    return _pb.service.StackChunk(
        register=_pb.service.StreamRegisterHeader(request=request, sizes=[nbytes])
    ).SerializeToString()


class Stalled:
    """A raw streamed call (ExecuteStream; with `register`, RegisterStream) that sends
    its header, declaring one uint8 tensor (or constant) of `nbytes`, and a first chunk,
    then nothing until closed: what a client that stopped mid-stack looks like to the server."""

    def __init__(
        self,
        server: ServerProcess,
        nbytes: int,
        key: int = 0,
        metadata: tuple[tuple[str, str], ...] = (),
        register: bool = False,
    ) -> None:
        self._closed = threading.Event()
        self._register = register
        self.channel = grpc.insecure_channel(server.target)

        def messages() -> Iterator[bytes]:
            yield register_header(nbytes) if register else header(key, [(U8, [nbytes])], [nbytes])
            yield data(0, 0, bytes(min(1 << 20, nbytes)))
            self._closed.wait()

        if register:
            self.call = self.channel.stream_unary(SERVICE + "RegisterStream").future(
                messages(), metadata=metadata
            )
        else:
            self.call = self.channel.stream_stream(SERVICE + "ExecuteStream")(messages(), metadata=metadata)
        self._ended: dict[str, Any] = {}
        self._done = threading.Event()
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        try:
            if self._register:
                self.call.result()
            else:
                list(self.call)
            self._ended["code"], self._ended["details"] = grpc.StatusCode.OK, ""
        except grpc.FutureCancelledError:  # closed (cancelled) by the test before the server ended it
            self._ended["code"], self._ended["details"] = grpc.StatusCode.CANCELLED, "cancelled by the test"
        except grpc.RpcError as e:
            self._ended["code"], self._ended["details"] = e.code(), e.details()  # type: ignore[attr-defined]
        self._done.set()

    def outcome(self, timeout: float) -> tuple[grpc.StatusCode, str]:
        """How the server ended the call; fails if it has not within `timeout` seconds."""
        assert self._done.wait(timeout), f"the server did not end the stalled stream within {timeout:g} s"
        return self._ended["code"], self._ended["details"]

    def close(self) -> None:
        self.call.cancel()
        self._closed.set()
        self.channel.close()


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(
        tmp_path_factory.mktemp("stream-idle"),
        None,
        "--compile-mode", "off",
        "--shared-memory", "off",
        "--stream-idle-seconds", str(IDLE_SECONDS),
        "--max-stream-buffer-bytes", str(IDLE_BUFFER),
        "--metrics-port", "0",
    )  # fmt: skip
    yield s
    s.stop()


def _wait_until_nothing_held(server: ServerProcess) -> None:
    """Until the server's streams hold no reserved bytes (an ended stream gives its back)."""
    held = "fuseport_stream_buffer_bytes"
    deadline = time.monotonic() + 30
    while server.metric(held) != 0:
        assert time.monotonic() < deadline, f"{held} still {server.metric(held)}"
        time.sleep(0.05)


def test_a_stream_that_stops_sending_is_ended_after_stream_idle_seconds_and_what_it_held_is_freed(
    idle_server: ServerProcess,
) -> None:
    """A client that sends a header (the server allocates the stack it declares) and
    a chunk, then nothing, used to keep that memory for as long as it kept the call
    open. Past --stream-idle-seconds without a message the server ends the call,
    DEADLINE_EXCEEDED naming the flag, and gives the reservation back."""
    with Client(idle_server.target) as c:
        key = c.register(_double, [torch.ones(4)])
    stalled = Stalled(idle_server, 32 << 20, key)
    try:
        code, details = stalled.outcome(timeout=60)
    finally:
        stalled.close()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
    assert "--stream-idle-seconds" in details and f"nothing for {IDLE_SECONDS} s" in details, details
    _wait_until_nothing_held(idle_server)
    assert idle_server.metric("fuseport_stream_idle_ends_total") == 1
    # Streams that keep sending are served as ever, through the real client.
    still_serves(idle_server, key)
    assert idle_server.metric("fuseport_stream_idle_ends_total") == 1


def test_a_register_stream_that_stops_sending_is_ended_after_stream_idle_seconds_and_its_constants_counted(
    idle_server: ServerProcess,
) -> None:
    """RegisterStream's constants are allocated whole from its header, as a streamed
    stack is: its header takes their bytes from --max-stream-buffer-bytes before
    anything is allocated (past it: RESOURCE_EXHAUSTED naming the flag), and a client
    that stops sending is ended after --stream-idle-seconds, what it held given back."""
    ends = idle_server.metric("fuseport_stream_idle_ends_total")
    over = Stalled(idle_server, IDLE_BUFFER + 1, register=True)
    try:
        code, details = over.outcome(timeout=60)
    finally:
        over.close()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "(--max-stream-buffer-bytes)" in details and "refused before allocating" in details, details
    stalled = Stalled(idle_server, 32 << 20, register=True)
    try:
        code, details = stalled.outcome(timeout=60)
    finally:
        stalled.close()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
    assert "--stream-idle-seconds" in details and f"nothing for {IDLE_SECONDS} s" in details, details
    _wait_until_nothing_held(idle_server)
    assert idle_server.metric("fuseport_stream_idle_ends_total") == ends + 1
    with Client(idle_server.target, stream_above=0) as c:  # RegisterStream that keeps sending: served
        key = c.register(_double, [torch.ones(4)])
        assert torch.equal(c.execute(key, [torch.ones(4)])[0], torch.full((4,), 3.0))


# --------------------------------------------------------------------------- round trips


def _values() -> list[Any]:
    """A stack of every kind of value, passed through beneath the kernel's input."""
    return [
        torch.randn(3, 5).to(torch.bfloat16),
        torch.randn(257, 3, dtype=torch.float16).t(),  # travels with a dim order
        torch.arange(-7, 1000, dtype=torch.int64),
        torch.tensor([True, False, True]),
        torch.randint(0, 255, (1 << 20,), dtype=torch.uint8),
        torch.randn(5, dtype=torch.complex64),
        torch.empty(0, 3),  # no bytes at all
        torch.tensor(2.5, dtype=torch.float64),  # 0-dim
        [torch.ones(2, dtype=torch.int32), None, [7, "s", 1.5, True]],
        "text",
    ]


@pytest.mark.parametrize("method", ["execute", "fallback"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stream_matches_unary_and_eager_bit_for_bit(
    server: ServerProcess, method: str, dtype: torch.dtype
) -> None:
    x = (torch.randn(1 << 18) * 100).to(dtype)  # 0.5-1 MiB: several chunks of 64 KiB, one partial
    below = _values()
    with Client(server.target, stream_above=0, stream_chunk_bytes=(64 << 10) + 3) as streamed:
        k = streamed.register(_double, [x])  # the kernel for this dtype
        s = getattr(streamed, f"{method}_detailed")(k, [*below, x])
    with Client(server.target, stream_above=None) as unary:
        u = getattr(unary, f"{method}_detailed")(k, [*below, x])
    assert (s.transport, u.transport) == ("stream", "unary")
    assert s.path == u.path and s.variant == u.variant
    _same(s.stack, u.stack)
    _same(s.stack, [*below, _double(x)])
    assert s.timings.total_us > 0


def _same(a: Any, b: Any) -> None:
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(_bits(a), _bits(b)), "tensors differ in their bits"
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b and type(a) is type(b)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_client_streams_from_the_threshold_on(server: ServerProcess, key: int) -> None:
    with Client(server.target, stream_above=1 << 20) as c:
        small = c.execute_detailed(key, [torch.ones((1 << 18) - 1)])  # 4 bytes under 1 MiB
        large = c.execute_detailed(key, [torch.ones(1 << 18)])
    assert (small.transport, large.transport) == ("unary", "stream")
    assert torch.equal(large.stack[0], torch.full((1 << 18,), 3.0))


def test_async_client_streams_too(server: ServerProcess, key: int) -> None:
    x = torch.randn(1 << 16)

    async def run() -> Any:
        async with AsyncClient(server.target, stream_above=0) as c:
            return await c.execute_detailed(key, [x]), await c.fallback_detailed(key, [x])

    e, f = asyncio.run(run())
    assert (e.transport, f.transport, f.reason) == ("stream", "stream", "requested")
    assert torch.equal(e.stack[0], _double(x)) and torch.equal(f.stack[0], _double(x))


def test_page_pool_reuses_a_buffer_only_once_every_tensor_over_it_died() -> None:
    pool = PagePool(keep=1, min_bytes=1 << 20)
    a = pool.tensor(4 << 20)
    a.fill_(3)
    where = a.data_ptr()
    view = a[10:20]  # a view keeps the buffer as the tensor does
    b = pool.tensor(4 << 20)
    assert b.data_ptr() != where
    del a
    c = pool.tensor(4 << 20)
    assert c.data_ptr() != where and pool.reused == 0 and torch.equal(view, torch.full((10,), 3, dtype=torch.uint8))
    del view
    e = pool.tensor(1 << 20)
    assert e.data_ptr() != where  # 4 MiB would waste over half of itself on 1 MiB
    d = pool.tensor(3 << 20)
    assert d.data_ptr() == where and d.numel() == 3 << 20 and pool.reused == 1
    del b, c, d, e  # one buffer waits (keep=1), the others are unmapped
    assert len(pool._waiting) == 1
    small = pool.tensor((1 << 20) - 1)  # under min_bytes: glibc's heap, not the pool
    assert small.numel() == (1 << 20) - 1 and len(pool._waiting) == 1


def test_a_streamed_result_reuses_the_pages_of_a_result_dropped_and_never_of_one_kept(
    server: ServerProcess, key: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's streamed results come from its page pool (wire.hostmem.PagePool): a result
    the caller keeps is never written again by a later one; a dropped one's pages are reused,
    at once. With the collector off: the first call's result was held by a reference cycle (an
    exception kept beside the frame its traceback holds, when the server offers no shared
    memory) until the collector ran."""
    from fuseport.client.client import _RESULT_PAGES

    monkeypatch.setattr(_RESULT_PAGES, "min_bytes", 1 << 20)
    _RESULT_PAGES.clear()
    n = 1 << 19  # 2 MiB of float32
    gc.collect()
    gc.disable()
    try:
        _reuse_after_drop(server, key, n, _RESULT_PAGES)
    finally:
        gc.enable()
        _RESULT_PAGES.clear()


def _reuse_after_drop(server: ServerProcess, key: int, n: int, pages: PagePool) -> None:
    with Client(server.target, stream_above=0) as c:
        first = c.execute(key, [torch.full((n,), 1.0)])[0]
        second = c.execute(key, [torch.full((n,), 2.0)])[0]
        assert first.data_ptr() != second.data_ptr()
        assert torch.equal(first, torch.full((n,), 3.0)) and torch.equal(second, torch.full((n,), 5.0))
        where, reused = first.data_ptr(), pages.reused
        del first
        third = c.execute(key, [torch.full((n,), 4.0)])[0]
        assert third.data_ptr() == where and pages.reused == reused + 1
        assert torch.equal(third, torch.full((n,), 9.0)) and torch.equal(second, torch.full((n,), 5.0))


def _triple(x: torch.Tensor) -> torch.Tensor:
    return x * 3


def test_streamed_call_heals_a_server_that_lost_the_kernel(server: ServerProcess) -> None:
    x = torch.randn(1 << 16)
    with Client(server.target, stream_above=0) as a, Client(server.target) as b:
        k = a.register(_triple, [x])
        assert b.unregister(k)  # as a restart without its store would
        r = a.execute_detailed(k, [x])  # NOT_FOUND: registers again, streams again
    assert r.transport == "stream" and torch.equal(r.stack[0], x * 3)


def test_generated_classes_alone_speak_the_stream(server: ServerProcess, key: int) -> None:
    """What a client in another language does: the documented messages, nothing else."""
    x = torch.arange(3000, dtype=torch.float32)
    raw = x.numpy().tobytes()
    msgs = [header(key, [(F32, [3000])])]
    msgs += [data(0, off, raw[off : off + 5000]) for off in range(0, len(raw), 5000)]
    msgs.append(end(len(msgs) - 1, len(raw)))
    out = [_pb.service.StackChunk.FromString(m) for m in call(server, msgs, "FallbackStream")]
    assert out[0].WhichOneof("kind") == "response" and out[-1].WhichOneof("kind") == "end"
    head = out[0].response
    assert head.reason == _pb.service.FALLBACK_REASON_REQUESTED and list(head.sizes) == [len(raw)]
    got = bytearray(head.sizes[0])
    for m in out[1:-1]:
        assert m.data.tensor == 0 and crc32c.crc32c(m.data.data) == m.data.crc32c
        got[m.data.offset : m.data.offset + len(m.data.data)] = m.data.data
    assert out[-1].end.bytes == len(raw) and out[-1].end.chunks == len(out) - 2
    assert torch.equal(torch.frombuffer(got, dtype=torch.float32), _double(x))


def test_a_server_with_shared_memory_off_says_so_and_the_client_uses_the_network(
    server: ServerProcess, key: int
) -> None:
    """This module's server runs with --shared-memory off (tests/test_shm.py has one with it on)."""
    x = torch.randn(1 << 20)  # 4 MiB: over the client's shared-memory threshold
    with Client(server.target) as c:
        r = c.execute_detailed(key, [x])
        assert r.transport == "unary" and torch.equal(r.stack[0], _double(x))
        with pytest.raises(SharedMemoryUnavailable, match="--shared-memory off"):
            c._call("OpenSharedMemory", b"", 10)


def test_an_async_client_to_a_server_with_shared_memory_off_uses_the_network_and_asks_again_later(
    server: ServerProcess, key: int
) -> None:
    x = torch.randn(1 << 20)

    async def main() -> tuple[list[str], list[float]]:
        async with AsyncClient(server.target) as c:
            transports, retry_at = [], []
            for _ in range(2):
                r = await c.execute_detailed(key, [x])
                assert torch.equal(r.stack[0], _double(x))
                transports.append(r.transport)
                assert c._shared is None
                retry_at.append(c._shared_retry_at)
            return transports, retry_at

    started = time.monotonic()
    transports, retry_at = asyncio.run(main())
    assert transports == ["unary", "unary"]
    # Refused once, and not asked again at the next call: a minute later.
    assert retry_at[0] == retry_at[1] >= started + 59


def test_writer_names_a_value_that_cannot_travel() -> None:
    with pytest.raises(Exception, match=r"stack\[1\]"):
        Writer([torch.ones(1), object()])


@pytest.mark.slow
def test_3_gib_stack_round_trips_bit_exact_with_bounded_server_memory(tmp_path: Path) -> None:
    """Past protobuf's 2 GiB message ceiling; the server holds about the payload once."""
    s = start_server(
        tmp_path, None, "--compile-mode", "off", "--max-stream-bytes", str(4 << 30), "--shared-memory", "off"
    )
    try:
        with Client(s.target, timeout=600) as c:
            k = c.register(_double, [torch.ones(4)])
            x = torch.randn(8)
            assert c.execute(k, [x])[0].equal(_double(x))
            base = s.rss()
            big = torch.empty(3 << 30, dtype=torch.uint8)
            big.view(torch.int64).random_()  # in place: no second 3 GiB
            peak = [0]
            stop = False

            def watch() -> None:
                while not stop:
                    peak[0] = max(peak[0], s.rss())
                    time.sleep(0.01)

            t = threading.Thread(target=watch)
            t.start()
            try:
                r = c.execute_detailed(k, [big, x])
            finally:
                stop = True
                t.join()
            assert r.transport == "stream"
            assert torch.equal(r.stack[0], big) and torch.equal(r.stack[1], _double(x))
        ratio = (peak[0] - base) / big.numel()
        print(
            f"3 GiB round trip: server RSS {base >> 20} MiB before, peak {peak[0] >> 20} MiB: {ratio:.2f}x the payload"
        )
        assert peak[0] <= 1.5 * big.numel(), f"server peaked at {peak[0] >> 20} MiB for a 3 GiB stack"
    finally:
        s.stop()


# --------------------------------------------------------------------------- CUDA (scripts/gpu_check.sh)


@pytest.mark.gpu
def test_device_sink_assembles_chunks_through_pinned_staging_bit_exact() -> None:
    """Many chunks of uneven sizes through the two staging buffers: each reuse
    waits for the copy before it, so no chunk is overwritten in flight."""
    from fuseport.server.devices import DeviceSink

    src = torch.randint(0, 256, ((48 << 20) + 5,), dtype=torch.uint8)
    sink = DeviceSink(torch.device("cuda", 0), src.numel())
    offset, step = 0, (3 << 20) + 1
    while offset < src.numel():
        n = min(step, src.numel() - offset)
        sink.write(offset, src.data_ptr() + offset, n)
        offset += n
    out = sink.result()
    assert out.is_cuda and torch.equal(out.cpu(), src)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_execute_and_fallback_on_cuda_match_unary_bit_for_bit(
    cuda_server: ServerProcess, dtype: torch.dtype
) -> None:
    x = torch.randn((40 << 20) // 4 + 3).to(dtype)  # many chunks, the last one partial
    below = [torch.randint(0, 255, ((8 << 20) + 1,), dtype=torch.uint8), "below"]
    with Client(
        cuda_server.target, timeout=300, stream_above=0, stream_chunk_bytes=(1 << 20) + 7, shared_memory=False
    ) as c:
        k = c.register(_double, [x[:8]])
        s = c.execute_detailed(k, [*below, x], wait=True)
        f = c.fallback_detailed(k, [*below, x])
    with Client(cuda_server.target, timeout=300, stream_above=None, shared_memory=False) as u:
        unary = u.execute_detailed(k, [*below, x], wait=True)
    assert (s.transport, f.transport, unary.transport) == ("stream", "stream", "unary")
    assert s.path == unary.path == "fused", (s.reason, s.detail)
    _same(s.stack, unary.stack)
    _same(f.stack[:2], below)
    torch.testing.assert_close(f.stack[2], s.stack[2])
