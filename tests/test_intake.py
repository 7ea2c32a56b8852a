"""Register's intake (issue 20, finding 6): no copies of a graph's constants beyond those it keeps,
and graphs that can only fail are refused at Register, planned on meta tensors.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crc32c
import grpc
import pytest
import torch

from fuseport.client import AsyncClient, Client, InvalidArgument, InvalidGraph, ResourceExhausted, capture
from fuseport.server.intake import Intake
from fuseport.server.registry import Registry
from fuseport.wire import _pb, codec
from fuseport.wire.errors import ERROR_METADATA_KEY
from fuseport.wire.graph import build_module
from fuseport.wire.keys import canonical_bytes, key_for

from ._graphs import one_op
from .conftest import ServerProcess, start_server

MiB = 1 << 20


def _graph_with_constants() -> _pb.graph.Graph:
    c = torch.randn(3, 5)
    graph = capture(lambda x, n: (x + c.t()[0, 0]).expand(n, -1) * c.sum(), [torch.ones(3), 4])
    first = graph.constants[0]
    first.alignment = b"\0" * 7  # filler: in the stored bytes, not in the key
    graph.constants.add(dtype=first.dtype, shape=[0])  # no data: protobuf writes no data field
    graph.constants.add(dtype=first.dtype, shape=[2, 2], data=bytes(range(16)), dim_order=[1, 0])
    assert graph.inputs[0].name != "i0", "value names as captured: the key's renaming is exercised"
    return graph


def test_the_pieces_are_exactly_what_protobuf_writes_and_hash_to_the_key() -> None:
    graph = _graph_with_constants()
    intake = Intake.of(graph)
    assert intake.datas is not None, "a graph without unknown fields takes the piecewise way"
    assert intake.key == key_for(graph)
    assert intake.size == graph.ByteSize() != len(canonical_bytes(graph))
    assert b"".join(bytes(p) for p in intake.serialized()) == graph.SerializeToString(deterministic=True)


def test_a_registered_variant_keeps_one_copy_of_its_constants_and_serialises_whole(tmp_path: Path) -> None:
    """The module's constants alias the bytes read once; the graph kept beside them is
    a skeleton, and the whole graph (what a compile worker builds from) is made from both."""
    graph = _graph_with_constants()
    registry = Registry(tmp_path, torch.device("cpu"), capacity=1 << 40)
    key, created, _ = registry.register(graph)
    (variant,) = registry.get(key).variants
    assert created and variant.datas is not None
    assert all(not c.data for c in variant.graph.constants)
    assert variant.serialized() == graph.SerializeToString(deterministic=True)
    assert (tmp_path / f"{key & (2**64 - 1):016x}.pb").read_bytes() == variant.serialized()
    stored = Registry(tmp_path, torch.device("cpu"))
    stored.load()
    (again,) = stored.get(key).variants  # built from the store: the same graph, the same way
    assert again.serialized() == variant.serialized() and again.datas is not None
    x = torch.ones(3)
    torch.testing.assert_close(again.fallback(x, 4), variant.module(x, 4))


def test_a_graph_with_unknown_fields_keeps_them_in_its_key() -> None:
    graph = _graph_with_constants()
    # Field 99, varint 1: a field of a newer client that this server does not know.
    odd = _pb.graph.Graph.FromString(graph.SerializeToString() + b"\x98\x06\x01")
    intake = Intake.of(odd)
    assert intake.datas is None and intake.key == key_for(odd) != key_for(graph)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(
        tmp_path_factory.mktemp("intake"), None, "--compile-mode", "off", "--keep-host-memory", "false"
    )
    yield s
    s.stop()


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _small_graph() -> _pb.graph.Graph:
    small = torch.randn(1024)
    return capture(lambda x: x * small[:4].sum() + small[-1], [torch.ones(4)])


@pytest.mark.parametrize(
    ("client", "limit"),
    [({"stream_above": None}, 3.1), ({}, 2.1)],
    ids=["unary", "streamed_by_default"],
)
def test_register_peak_memory_is_the_graph_and_a_chunk_when_streamed(
    server: ServerProcess, client: dict[str, Any], limit: float
) -> None:
    """Register's own work adds no copy of a graph's constants: they stay in the request's
    bytes (unary) or in the buffers the chunks were written into (RegisterStream).

    Unary: what remains of the peak is gRPC's receive of one message, its byte buffer,
    the bytearray grpcio reads it into and the bytes made from that, 3.0 times the message
    (measured with a bare grpc.aio server); 2.96-2.97 here, 3.2-3.9 before the views.

    Streamed (the client's default for a graph of 16 MiB or more): the graph and the chunk
    in flight, 1.1-1.3 times the graph; issue 20's target is 2. Only the stream can meet
    it, so the default client's ratio also says that it took the stream."""
    big = torch.randn(128 * MiB // 4)
    graph = capture(lambda x: x * big[:4].sum() + big[-1], [torch.ones(4)])
    size = graph.ByteSize()
    assert size > 128 * MiB
    with Client(server.target, timeout=300, **client) as c:
        # A first Register of each kind warms what any first one does (lazy imports, the
        # planner's first meta run, the stream's handler): not this graph's cost.
        for stream_above in (None, 0):
            with Client(server.target, stream_above=stream_above) as warm:
                warm.register(_small_graph())
        pid = server.proc.pid
        before = _status(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
        key = c.register(graph)
        peak = _status(pid, "VmHWM")
        torch.testing.assert_close(
            c.fallback(key, [torch.ones(4)])[0], torch.ones(4) * big[:4].sum() + big[-1]
        )
        assert c.unregister(key)  # the next run registers the same graph anew
    ratio = (peak - before) / size
    assert ratio <= limit, f"Register raised the peak by {ratio:.2f}x the graph"


def _address_range(buf: bytes) -> range:
    start = id(buf) + bytes.__basicsize__ - 1  # CPython: a bytes object's payload
    return range(start, start + len(buf))


def test_a_register_requests_constants_stay_in_its_bytes(tmp_path: Path) -> None:
    """decode_register_request leaves each constant's data in the request (a writable
    view), and the registered module's constants are those bytes: no copy."""
    graph = _graph_with_constants()
    request = _pb.service.RegisterRequest(graph=graph, alias="abc", variant_of=7).SerializeToString()
    req, datas = codec.decode_register_request(request)
    assert datas is not None and req.alias == "abc" and req.variant_of == 7
    assert all(not c.data for c in req.graph.constants), "protobuf parsed no constant's data"
    assert [bytes(d) for d in datas] == [c.data for c in graph.constants]
    inside = _address_range(request)
    assert all(torch.frombuffer(d, dtype=torch.uint8).data_ptr() in inside for d in datas if len(d))
    registry = Registry(tmp_path, torch.device("cpu"), capacity=1 << 40)
    key, created, _ = registry.register(req.graph, None, None, datas)
    (variant,) = registry.get(key).variants
    assert created and key == key_for(graph)
    constants = [t for name, t in variant.module.named_buffers() if t.numel() > 1]
    assert constants and all(t.data_ptr() in inside for t in constants)
    assert (tmp_path / f"{key & (2**64 - 1):016x}.pb").read_bytes() == graph.SerializeToString(
        deterministic=True
    )
    x = torch.ones(3)
    torch.testing.assert_close(variant.fallback(x, 4), build_module(graph, torch.device("cpu"))(x, 4))


@pytest.mark.parametrize(
    "tail",
    [
        # graph again: protobuf merges it (one more constant, with data)
        _pb.service.RegisterRequest(
            graph=_pb.graph.Graph(constants=[_pb.values.Tensor(dtype=1, shape=[1], data=b"\1\2\3\4")])
        ).SerializeToString(),
        b"\x98\x06\x01",  # an unknown field of the request: ignored, as before
    ],
    ids=["graph_twice", "unknown_request_field"],
)
def test_a_register_request_walked_otherwise_reads_as_protobuf_reads_it(tail: bytes) -> None:
    request = _pb.service.RegisterRequest(graph=_graph_with_constants()).SerializeToString() + tail
    req, datas = codec.decode_register_request(request)
    whole = _pb.service.RegisterRequest.FromString(request)
    if datas is None:
        assert req == whole
    else:
        assert [bytes(d) for d in datas] == [c.data for c in whole.graph.constants]
        assert Intake.of(req.graph, datas).key == key_for(whole.graph)


def test_a_constant_with_its_data_twice_or_unknown_fields_is_parsed_whole() -> None:
    """Protobuf keeps the last of a bytes field given twice, and a graph with unknown
    fields is keyed over everything it carries: both go to protobuf whole, as does a
    message that does not parse (the same error as before)."""
    graph = _graph_with_constants()
    c = graph.constants[0]
    # The constant's data given again (field 4, 2 bytes) after its own.
    constant = (
        _pb.values.Tensor(dtype=c.dtype, shape=c.shape, data=c.data).SerializeToString() + b"\x22\x02ab"
    )
    body = b"\x12" + bytes([len(constant)]) + constant  # Graph.constants
    request = b"\x0a" + bytes([len(body)]) + body  # RegisterRequest.graph
    req, datas = codec.decode_register_request(request)
    assert datas is None and req.graph.constants[0].data == b"ab"
    odd = _pb.graph.Graph.FromString(graph.SerializeToString() + b"\x98\x06\x01")  # field 99 of Graph
    req, datas = codec.decode_register_request(_pb.service.RegisterRequest(graph=odd).SerializeToString())
    assert datas is None and req.graph == odd and key_for(req.graph) != key_for(graph)
    whole = _pb.service.RegisterRequest(graph=graph).SerializeToString()
    with pytest.raises(InvalidArgument, match="malformed RegisterRequest"):
        codec.decode_register_request(whole[:-3])


@pytest.mark.parametrize(
    ("op", "args", "error", "match"),
    [
        ("aten::full.default", [[-5], 1.0], InvalidGraph, "fails whatever its inputs"),
        # 2**64 bytes: a size no device holds (torch's int64 count overflows), not an invalid graph.
        ("aten::full.default", [[2**62], 1.0], ResourceExhausted, "more memory than cpu has.*overflowed"),
        ("aten::full.default", [[2**40], 1.0], ResourceExhausted, "more memory than cpu has"),
        ("aten::expand.default", [torch.ones(1), [2**42]], ResourceExhausted, "more memory than cpu has"),
        (
            "aten::add.Tensor",
            [torch.ones(2), "oops"],
            InvalidGraph,
            "fails whatever its inputs.*aten::add.Tensor",
        ),
    ],
    ids=["negative_size", "2**62_elements", "2**40_elements", "2**42_expand", "string_for_a_tensor"],
)
def test_a_graph_that_can_only_fail_is_refused_at_register(
    server: ServerProcess, op: str, args: list, error: type[Exception], match: str
) -> None:
    graph, _ = one_op(op, args)
    with Client(server.target, timeout=120) as c:
        with pytest.raises(error, match=match):
            c.register(graph)
        assert key_for(graph) not in {k.key for k in c.list()}, "nothing was registered"
        # A graph that fails only for some sizes is not refused: x.view(4, -1) runs at 4, 8, ...
        ok, _ = one_op("aten::view.default", [torch.ones(8), [4, -1]])
        assert c.register(ok) == key_for(ok)


def test_a_mangled_register_request_reads_as_protobuf_reads_it() -> None:
    """Bytes changed, cut or added anywhere: decode_register_request refuses exactly what
    protobuf refuses, and what it takes is protobuf's message, the data put back."""
    rng = random.Random(20)
    good = _pb.service.RegisterRequest(graph=_graph_with_constants(), alias="abc").SerializeToString()
    for _ in range(2000):
        buf = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            what, at = rng.randrange(3), rng.randrange(len(buf))
            if what == 0:
                buf[at] = rng.randrange(256)
            elif what == 1:
                del buf[at : at + rng.randint(1, 8)]
            else:
                buf[at:at] = rng.randbytes(rng.randint(1, 4))
        request = bytes(buf)
        try:
            whole = _pb.service.RegisterRequest.FromString(request)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
            with pytest.raises(InvalidArgument, match="malformed RegisterRequest"):
                codec.decode_register_request(request)
            continue
        req, datas = codec.decode_register_request(request)
        if datas is not None:
            for c, d in zip(req.graph.constants, datas):
                c.data = bytes(d)
        assert req == whole


# --------------------------------------------------------------------------- RegisterStream

REGISTER_STREAM = "/fuseport.v1.KernelService/RegisterStream"


def _large_graph(n: int = 3 * MiB // 4) -> _pb.graph.Graph:
    """A graph with a large constant (streamed in chunks) beside small ones (in the header)."""
    big = torch.randn(n)
    # Summed in float64: every byte of the constant counts, and no order of the sum's terms (the
    # server runs fewer intra-op threads than this process) moves the float32 result. In float32
    # two orders differed by 1.6e-6 relative (CI), over assert_close's 1.3e-6.
    graph = capture(lambda x: (x + big[:3]) * big.double().sum(), [torch.ones(3)])
    graph.constants.add(dtype=_pb.values.DTYPE_FLOAT32, shape=[2, 2], data=bytes(range(16)), dim_order=[1, 0])
    graph.constants.add(dtype=_pb.values.DTYPE_FLOAT32, shape=[0])  # no data at all
    return graph


def _register_stream(
    graph: _pb.graph.Graph, chunk: int = 1 * MiB, alias: str | None = None
) -> tuple[list[bytes], list[int]]:
    """RegisterStream's messages for `graph`, written with the generated classes alone (as a
    client in another language would): constants of 64 KiB or more in chunks, the rest in the
    header. Also the sizes it declares."""
    header = _pb.graph.Graph()
    header.CopyFrom(graph)
    sizes = [len(c.data) if len(c.data) >= 64 << 10 else 0 for c in graph.constants]
    for c, n in zip(header.constants, sizes):
        if n:
            c.ClearField("data")
    request = (
        _pb.service.RegisterRequest(graph=header, alias=alias)
        if alias
        else _pb.service.RegisterRequest(graph=header)
    )
    messages = [
        _pb.service.StackChunk(
            register=_pb.service.StreamRegisterHeader(request=request, sizes=sizes)
        ).SerializeToString()
    ]
    count = total = 0
    for i, n in enumerate(sizes):
        data = graph.constants[i].data
        for offset in range(0, n, chunk):
            piece = data[offset : offset + chunk]
            messages.append(_chunk(i, offset, piece))
            count, total = count + 1, total + len(piece)
    messages.append(_end(count, total))
    return messages, sizes


def _chunk(index: int, offset: int, payload: bytes, crc: int | None = None) -> bytes:
    crc = crc32c.crc32c(payload) if crc is None else crc
    data = _pb.service.StreamData(tensor=index, offset=offset, data=payload, crc32c=crc)
    return _pb.service.StackChunk(data=data).SerializeToString()


def _end(chunks: int, nbytes: int) -> bytes:
    return _pb.service.StackChunk(end=_pb.service.StreamEnd(chunks=chunks, bytes=nbytes)).SerializeToString()


def _send(server: ServerProcess, messages: list[bytes]) -> _pb.service.RegisterResponse:
    with grpc.insecure_channel(server.target) as ch:
        raw = ch.stream_unary(REGISTER_STREAM)(iter(messages), timeout=60)
    return _pb.service.RegisterResponse.FromString(raw)


def _stored(server: ServerProcess, key: int) -> bytes:
    return (server.store_dir / f"{key & (2**64 - 1):016x}.pb").read_bytes()


def test_a_graph_written_with_the_generated_classes_registers_by_stream_as_by_unary(
    server: ServerProcess,
) -> None:
    """The stream's graph is the one its chunks complete: the same key, the same stored bytes
    (the whole graph as protobuf writes it), the same results, whatever the chunk sizes."""
    graph = _large_graph()
    messages, sizes = _register_stream(graph, chunk=1 * MiB - 3, alias="streamed-one")
    assert sizes[0] > 0 and sizes.count(0) == len(sizes) - 1, "one streamed constant, the rest in the header"
    resp = _send(server, messages)
    assert resp.created and resp.key == resp.variant == key_for(graph)
    assert _stored(server, resp.key) == graph.SerializeToString(deterministic=True)
    with Client(server.target, stream_above=None) as c:
        assert c.describe(resp.key).alias == "streamed-one"
        x = torch.randn(3)
        want = build_module(graph, torch.device("cpu"))(x)
        torch.testing.assert_close(c.fallback(resp.key, [x])[0], want[0] if isinstance(want, tuple) else want)
        # Unary Register of the same graph: the same kernel, nothing new.
        assert c.register(graph) == resp.key
        assert c.unregister(resp.key)
    again = _send(server, messages)
    assert again.created and again.key == resp.key  # registered anew after the unregister
    with Client(server.target) as c:
        assert c.unregister(again.key)


def test_client_and_async_client_stream_a_large_graph_with_the_unary_key_and_results(
    server: ServerProcess,
) -> None:
    """A graph over the client's own message limit registers at all only through the stream."""
    graph = _large_graph(6 * MiB // 4)
    x = torch.randn(3)
    with Client(server.target, stream_above=None) as unary:
        key = unary.register(graph)
        expected = unary.fallback(key, [x])[0]
        assert unary.unregister(key)
    with Client(server.target, max_message_bytes=4 * MiB) as c:  # 6 MiB: over one message
        assert c.register(graph) == key
        torch.testing.assert_close(c.fallback(key, [x])[0], expected, rtol=0, atol=0)
        assert _stored(server, key) == graph.SerializeToString(deterministic=True)
        assert c.unregister(key)

    async def main() -> int:
        async with AsyncClient(server.target, stream_above=0) as ac:
            k = await ac.register(graph)
            torch.testing.assert_close((await ac.fallback(k, [x]))[0], expected, rtol=0, atol=0)
            assert await ac.unregister(k)
            return k

    assert asyncio.run(main()) == key


def test_a_constant_whose_bytes_do_not_fit_its_shape_is_the_same_error_streamed_or_not(
    server: ServerProcess,
) -> None:
    graph = _large_graph()
    graph.constants[0].data = graph.constants[0].data[:-4]  # one float short
    with Client(server.target, stream_above=None) as unary, pytest.raises(InvalidGraph) as by_unary:
        unary.register(graph)
    with Client(server.target, stream_above=0) as streamed, pytest.raises(InvalidGraph) as by_stream:
        streamed.register(graph)
    assert str(by_stream.value) == str(by_unary.value) and "constants[0]" in str(by_unary.value)


def _hostile(graph: _pb.graph.Graph) -> dict[str, list[bytes]]:
    messages, sizes = _register_stream(graph, chunk=64 << 10)
    head, chunks, end = messages[0], messages[1:-1], messages[-1]
    payload = graph.constants[0].data
    flipped = bytearray(payload[: 64 << 10])
    flipped[100] ^= 1
    both = _pb.service.StackChunk.FromString(head)
    both.register.request.graph.constants[0].data = b"\0" * 8
    fewer = _pb.service.StackChunk.FromString(head)
    del fewer.register.sizes[-1]
    execute = _pb.service.StackChunk(request=_pb.service.StreamRequestHeader(key=1)).SerializeToString()
    return {
        "truncated": [head, *chunks[:2]],
        "end_with_bytes_missing": [head, *chunks[:2], _end(2, 128 << 10)],
        "end_counts_disagree": [head, *chunks, _end(len(chunks) + 1, sizes[0])],
        "corrupted_chunk": [
            head,
            _chunk(0, 0, bytes(flipped), crc32c.crc32c(payload[: 64 << 10])),
            *chunks[1:],
            end,
        ],
        "chunk_for_no_constant": [head, _chunk(9, 0, b"abcd"), end],
        "chunk_for_a_header_constant": [head, _chunk(1, 0, b"abcd"), end],
        "gap": [head, chunks[0], *chunks[2:], end],
        "data_before_the_header": [chunks[0], head, end],
        "data_in_header_and_chunks": [both.SerializeToString(), *chunks, end],
        "a_size_missing": [fewer.SerializeToString(), end],
        "an_execute_header": [execute, end],
        "empty": [],
    }


_HOSTILE_WORDS = {
    "truncated": ("graph.constants[0] incomplete", "stopped before its end"),
    "end_with_bytes_missing": ("the end arrived",),
    "end_counts_disagree": ("the end says",),
    "corrupted_chunk": ("CRC-32C", "corrupted", "graph.constants[0]"),
    "chunk_for_no_constant": ("constant 9", "declares 3 constants"),
    "chunk_for_a_header_constant": ("graph.constants[1]", "declared size of 0"),
    "gap": ("expected 65536", "without gaps"),
    "data_before_the_header": ("before the header",),
    "data_in_header_and_chunks": ("graph.constants[0] carries data", "not both"),
    "a_size_missing": ("2 sizes for 3 constants",),
    "an_execute_header": ("expected a register header first",),
    "empty": ("ended before its header",),
}


@pytest.fixture(scope="module")
def one_mib_graph() -> _pb.graph.Graph:
    return _large_graph(1 * MiB // 4)


@pytest.mark.parametrize("case", list(_HOSTILE_WORDS))
def test_a_malformed_register_stream_is_refused_naming_what_is_wrong_and_the_server_keeps_serving(
    server: ServerProcess, one_mib_graph: _pb.graph.Graph, case: str
) -> None:
    graph = one_mib_graph
    with pytest.raises(grpc.RpcError) as info:
        _send(server, _hostile(graph)[case])
    e: Any = info.value
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert dict(e.trailing_metadata())[ERROR_METADATA_KEY] == "InvalidStack"
    for word in _HOSTILE_WORDS[case]:
        assert word in e.details(), f"{word!r} not in {e.details()!r}"
    with Client(server.target, stream_above=0) as c:
        assert key_for(graph) not in {k.key for k in c.list()}, "nothing was registered"
        assert c.register(graph) == key_for(graph)  # the same graph, streamed whole
        assert c.unregister(key_for(graph))


def test_a_register_stream_declaring_more_than_max_graph_bytes_is_refused_before_allocating(
    server: ServerProcess, one_mib_graph: _pb.graph.Graph
) -> None:
    graph = one_mib_graph
    head = _pb.service.StackChunk.FromString(_register_stream(graph)[0][0])
    head.register.request.graph.constants[0].shape[:] = [1 << 38]
    head.register.sizes[0] = 1 << 40  # a TiB of float32
    before = server.rss()
    with pytest.raises(grpc.RpcError) as info:
        _send(server, [head.SerializeToString(), _chunk(0, 0, bytes(1024))])
    e: Any = info.value
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
    assert "--max-graph-bytes" in e.details() and "refused before allocating" in e.details()
    assert server.rss() - before < 64 * MiB
    with Client(server.target, stream_above=0) as c:
        assert c.register(graph) == key_for(graph)
        assert c.unregister(key_for(graph))


def test_a_client_facing_a_server_without_register_stream_registers_the_graph_as_one_message(
    server: ServerProcess, one_mib_graph: _pb.graph.Graph
) -> None:
    """An older server answers RegisterStream with UNIMPLEMENTED (here: a method name this
    server does not have, in its place): the client sends the same Register unary."""
    graph = one_mib_graph
    missing = "/fuseport.v1.KernelService/RegisterStreamOfTheFuture"
    with Client(server.target, stream_above=0) as c:
        c._pool.first.register_stream = c.channel.stream_unary(missing)
        assert c.register(graph) == key_for(graph)
        assert c.unregister(key_for(graph))

    async def main() -> int:
        async with AsyncClient(server.target, stream_above=0) as ac:
            ac._pool.first.register_stream = ac.channel.stream_unary(missing)
            k = await ac.register(graph)
            assert await ac.unregister(k)
            return k

    assert asyncio.run(main()) == key_for(graph)
