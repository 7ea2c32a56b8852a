"""Pins the stack codec: exact round trips, protobuf compatibility, in-place decoding,
and that no malformed message gets past the decoder as anything but InvalidStack."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import re
import struct
import sys
import tracemalloc
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuseport.wire import _pb, codec, dtypes
from fuseport.wire.codec import (
    MAX_DEPTH,
    MAX_RANK,
    SMALL_MESSAGE,
    decode_execute_request,
    decode_execute_response,
    decode_stack,
    encode_execute_request,
    encode_execute_response,
    encode_stack,
    tensor_from_proto,
    tensor_to_proto,
    value_from_proto,
    value_to_proto,
)
from fuseport.wire.errors import InvalidStack, ResourceExhausted

service = _pb.service
values_pb2 = _pb.values

# torch warns once per process when it first allocates a complex32 tensor (the
# encoder's contiguous copy, an empty decoded one); that is torch's notice, not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning"),
    pytest.mark.compat,  # the wire format at the lowest and newest protobuf
]

WIRE_DTYPES: list[torch.dtype] = [
    dt for dt in (dtypes.dtype_for(code) for code in sorted(dtypes.DTYPE_NAMES)) if dt is not None
]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Where CPython keeps the payload of a bytes object (32 on 64-bit builds).
BYTES_PAYLOAD = bytes.__basicsize__ - 1
MEMORY_LIMIT = 64 * 2**20

SLOW_SETTINGS = settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


# --------------------------------------------------------------------------- helpers


def random_tensor(dtype: torch.dtype, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A tensor with random bits (0/1 for bool), so every dtype is made the same way."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 2 if dtype == torch.bool else 256, (n,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(tuple(shape))


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The row-major element bytes of `t`, as the wire carries them."""
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    t = t.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    # Size-1 dims may keep any stride in a "contiguous" tensor; the memory is dense.
    return t.as_strided(t.shape, (1,)).view(torch.uint8)


def assert_same(expected: Any, got: Any, where: str = "stack") -> None:
    """Bit-exact equality of stacks; tuples travel as lists, floats compare by bits."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {got!r} is not a tensor"
        assert got.device.type == "cpu", where
        assert (got.dtype, tuple(got.shape)) == (expected.dtype, tuple(expected.shape)), where
        assert torch.equal(raw_bytes(got), raw_bytes(expected)), f"{where}: bytes differ"
    elif isinstance(expected, (list, tuple)):
        assert type(got) is list, f"{where}: {got!r} is not a list"
        assert len(got) == len(expected), where
        for i, (e, g) in enumerate(zip(expected, got)):
            assert_same(e, g, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert type(got) is float, f"{where}: {got!r} is not a float"
        assert struct.pack("<d", got) == struct.pack("<d", expected), f"{where}: {got!r} != {expected!r}"
    else:
        assert type(got) is type(expected) and got == expected, f"{where}: {got!r} != {expected!r}"


TIMINGS = dict(decode_us=11, queue_us=22, run_us=33, encode_us=44)


def roundtrips(stack: Sequence[Any]) -> dict[str, list[Any]]:
    """The stack decoded back through each of the three framings."""
    out = {"stack": decode_stack(encode_stack(stack))}
    req = decode_execute_request(encode_execute_request(INT64_MIN, stack, wait_for_compile=True))
    assert (req.key, req.wait_for_compile) == (INT64_MIN, True)
    out["request"] = req.stack
    resp = decode_execute_response(
        encode_execute_response(
            stack,
            service.PATH_FALLBACK,
            service.FALLBACK_REASON_COMPILING,
            "still compiling: ünïcode",
            service.Timings(**TIMINGS),
        )
    )
    assert (resp.path, resp.reason, resp.detail) == (
        service.PATH_FALLBACK,
        service.FALLBACK_REASON_COMPILING,
        "still compiling: ünïcode",
    )
    assert resp.timings == service.Timings(**TIMINGS)
    out["response"] = resp.stack
    return out


def assert_roundtrips(stack: Sequence[Any]) -> None:
    for framing, got in roundtrips(stack).items():
        assert_same(stack, got, f"{framing}:stack")


# Independent of the codec: values <-> generated classes, field by field.


def from_generated(v: values_pb2.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "tensor":
        dtype = dtypes.dtype_for(v.tensor.dtype)
        data = bytearray(v.tensor.data)
        flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        shape, order = list(v.tensor.shape), list(v.tensor.dim_order)
        if not order:
            return flat.view(dtype).reshape(shape)
        # The data is the tensor permuted by dim_order, row-major.
        memory = flat.view(dtype).reshape([shape[d] for d in order])
        return memory.permute([order.index(d) for d in range(len(order))])
    if kind == "list_value":
        return [from_generated(x) for x in v.list_value.items]
    if kind == "none_value":
        return None
    return getattr(v, kind)


def to_generated(x: Any) -> values_pb2.Value:
    if isinstance(x, torch.Tensor):
        code = dtypes.code_for(x.dtype)
        return values_pb2.Value(
            tensor=values_pb2.Tensor(
                dtype=code, shape=list(x.shape), data=bytes(raw_bytes(x).tolist()) if x.numel() else b""
            )
        )
    if x is None:
        return values_pb2.Value(none_value=values_pb2.NoneValue())
    if isinstance(x, bool):
        return values_pb2.Value(bool_value=x)
    if isinstance(x, int):
        return values_pb2.Value(int_value=x)
    if isinstance(x, float):
        return values_pb2.Value(float_value=x)
    if isinstance(x, str):
        return values_pb2.Value(string_value=x)
    return values_pb2.Value(list_value=values_pb2.ValueList(items=[to_generated(i) for i in x]))


# Hand-built protobuf, to say what no encoder of ours would write.


def varint(n: int) -> bytes:
    n &= 2**64 - 1
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def ld(field: int, payload: bytes) -> bytes:
    return tag(field, 2) + varint(len(payload)) + payload


def vi(field: int, n: int) -> bytes:
    return tag(field, 0) + varint(n)


def tensor_body(dtype: int, shape: Sequence[int], data: bytes | None, packed: bool = True) -> bytes:
    out = vi(1, dtype)
    if packed:
        if shape:
            out += ld(2, b"".join(varint(d) for d in shape))
    else:
        out += b"".join(vi(2, d) for d in shape)
    if data is not None:
        out += ld(4, data)
    return out


def v_tensor(dtype: int, shape: Sequence[int], data: bytes | None, packed: bool = True) -> bytes:
    return ld(1, tensor_body(dtype, shape, data, packed))


def v_int(n: int) -> bytes:
    return vi(2, n)


def v_str(s: str | bytes) -> bytes:
    return ld(5, s.encode() if isinstance(s, str) else s)


def v_none() -> bytes:
    return ld(6, b"")


def v_list(*items: bytes) -> bytes:
    return ld(7, b"".join(ld(1, i) for i in items))


STACK_FIELD = {"stack": 1, "request": 3, "response": 4}
DECODERS: dict[str, Callable[[bytes], list[Any]]] = {
    "stack": decode_stack,
    "request": lambda b: decode_execute_request(b).stack,
    "response": lambda b: decode_execute_response(b).stack,
}


def frame(framing: str, values: Sequence[bytes]) -> bytes:
    """Value messages as the stack of a Stack, ExecuteRequest or ExecuteResponse."""
    head = {"stack": b"", "request": vi(1, 7), "response": vi(1, 1) + ld(3, b"detail")}[framing]
    return head + b"".join(ld(STACK_FIELD[framing], v) for v in values)


F32 = dtypes.code_for(torch.float32)
BOOL = dtypes.code_for(torch.bool)
UINT8 = dtypes.code_for(torch.uint8)


def _kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


@contextlib.contextmanager
def bounded_memory(limit: int = MEMORY_LIMIT) -> Iterator[None]:
    """Fails if the block's peak memory grows by `limit`: Python allocations through
    tracemalloc, and everything else (torch's allocator) through the peak RSS, which
    Linux lets a process reset by writing 5 to /proc/self/clear_refs."""
    base = _kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm = _kib("VmHWM")
        rss_checked = base is not None and hwm is not None and hwm - base < 4096
    except OSError:
        rss_checked = False
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"{peak} bytes of Python memory at peak"
    if rss_checked:
        grown = (_kib("VmHWM") - base) * 1024  # type: ignore[operator]
        assert grown < limit, f"peak RSS grew by {grown} bytes"


def decode_or_error(framing: str, buf: bytes) -> list[Any] | InvalidStack:
    """Decodes, returning the InvalidStack raised; any other exception fails the test."""
    try:
        return DECODERS[framing](buf)
    except InvalidStack as e:
        return e


# --------------------------------------------------------------------------- strategies


@st.composite
def tensors(draw: st.DrawFn, max_rank: int = 4, max_side: int = 4) -> torch.Tensor:
    dtype = draw(st.sampled_from(WIRE_DTYPES))
    shape = draw(st.lists(st.integers(0, max_side), max_size=max_rank))
    seed = draw(st.integers(0, 2**32 - 1))
    layout = draw(st.sampled_from(["contiguous", "permuted", "strided"]))
    if layout == "permuted" and len(shape) >= 2:
        return random_tensor(dtype, shape[::-1], seed).permute(*reversed(range(len(shape))))
    if layout == "strided" and shape:
        return random_tensor(dtype, [*shape[:-1], 2 * shape[-1]], seed)[..., ::2]
    return random_tensor(dtype, shape, seed)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(INT64_MIN, INT64_MAX),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)


def stack_values(max_side: int = 4) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.one_of(scalars, tensors(max_side=max_side)),
        lambda kids: st.lists(kids, max_size=4),
        max_leaves=10,
    )


stacks = st.lists(stack_values(), max_size=6)
small_stacks = st.lists(stack_values(max_side=2), min_size=1, max_size=5)
framings = st.sampled_from(sorted(DECODERS))


def encode_as(framing: str, stack: Sequence[Any]) -> bytes:
    if framing == "stack":
        return encode_stack(stack)
    if framing == "request":
        return encode_execute_request(-3, stack, wait_for_compile=True)
    return encode_execute_response(stack, 1, 0, "ok", service.Timings(**TIMINGS))


# --------------------------------------------------------------------------- round trips


def test_this_torch_has_every_wire_dtype() -> None:
    assert len(WIRE_DTYPES) == len(dtypes.DTYPE_NAMES)
    for code, dt in zip(sorted(dtypes.DTYPE_NAMES), WIRE_DTYPES):
        assert dtypes.code_for(dt) == code
        assert dtypes.itemsize_for(code) == dt.itemsize


@pytest.mark.parametrize("dtype", WIRE_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exact(dtype: torch.dtype) -> None:
    base = random_tensor(dtype, (6, 5), seed=dtypes.code_for(dtype))  # type: ignore[arg-type]
    stack = [
        random_tensor(dtype, (), seed=1),  # 0-dim
        random_tensor(dtype, (7,), seed=2),
        base,
        base.t(),  # transposed
        base[:, ::2],  # strided
        base[1:],  # storage offset
        base[2:3, 1:].expand(4, 4),  # zero strides
        random_tensor(dtype, (0, 3)),
        random_tensor(dtype, (5, 0, 2)),
        [base[0], [random_tensor(dtype, (2, 1, 2), seed=3)]],  # tensors inside lists
    ]
    if dtype.is_complex:
        stack += [base.conj(), base.conj().t()]  # lazily conjugated views
    assert_roundtrips(stack)


def test_zero_element_tensors_round_trip_with_shape() -> None:
    stack = [random_tensor(dt, shape) for dt in WIRE_DTYPES for shape in [(0,), (0, 3), (5, 0, 2)]]
    assert_roundtrips(stack)


def test_negated_view_round_trips_as_its_values() -> None:
    t = torch.randn(4, 3)
    neg = torch._neg_view(t)
    assert neg.is_neg()
    for got in roundtrips([neg]).values():
        assert torch.equal(got[0], -t)


def test_tensor_over_4_mib_round_trips_and_decodes_in_place() -> None:
    big = random_tensor(torch.float32, (2**20 + 3,), seed=5)  # 4 MiB + 12 bytes
    assert big.nbytes > 4 * 2**20
    assert_roundtrips([1, big, "after"])
    buf = encode_execute_request(1, [big])
    got = decode_execute_request(buf).stack[0]
    start = id(buf) + BYTES_PAYLOAD
    assert start <= got.data_ptr() and got.data_ptr() + got.nbytes <= start + len(buf)


SPECIAL_FLOATS = [
    0.0,
    -0.0,
    1.5,
    -2.25e-300,
    5e-324,  # smallest subnormal
    sys.float_info.max,
    math.inf,
    -math.inf,
    math.nan,
    -math.nan,
    struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0],  # NaN with a payload
]


def test_scalars_round_trip_exactly() -> None:
    stack = [
        INT64_MIN,
        INT64_MAX,
        0,
        -1,
        2**31,
        True,
        False,
        *SPECIAL_FLOATS,
        "",
        "ascii",
        "ünïcödé",
        "日本語",
        "🚀 emoji",
        "nul\x00inside",
        "\u2028line separator",
        None,
    ]
    assert_roundtrips(stack)


def test_bool_and_int_keep_their_types() -> None:
    for got in roundtrips([True, 1, False, 0]).values():
        assert [type(x) for x in got] == [bool, int, bool, int]


def test_nested_lists_and_none_round_trip() -> None:
    t = random_tensor(torch.bfloat16, (2, 3))
    stack = [[], [[]], [1, [2.5, None, "x", [t, [True]]]], [None, None], ["a", ["b", ["c"]]]]
    assert_roundtrips(stack)


def test_tuples_travel_as_lists() -> None:
    for got in roundtrips([(1, (2.0, "x"))]).values():
        assert got == [[1, [2.0, "x"]]]


def test_empty_stack_round_trips() -> None:
    assert_roundtrips([])


def nested(levels: int, leaf: Any = None) -> Any:
    """`levels` lists, one inside the other, the innermost holding `leaf`."""
    x = [leaf]
    for _ in range(levels - 1):
        x = [x]
    return x


def test_lists_nested_max_depth_levels_round_trip() -> None:
    assert_roundtrips([nested(MAX_DEPTH, 7)])


def test_encode_rejects_lists_nested_deeper_than_max_depth() -> None:
    with pytest.raises(InvalidStack, match=r"^stack\[1\]\[0\]"):
        encode_stack([1, nested(MAX_DEPTH + 1)])


@given(stack=stacks)
@SLOW_SETTINGS
def test_random_stacks_round_trip_exactly(stack: list[Any]) -> None:
    assert_roundtrips(stack)


# --------------------------------------------------------------------------- encoding errors


@pytest.mark.parametrize("n", [2**63, INT64_MIN - 1, 2**64])
def test_encode_rejects_int_outside_int64(n: int) -> None:
    with pytest.raises(InvalidStack, match=rf"^stack\[1\]: int {n} does not fit in int64"):
        encode_stack([0, n])


@pytest.mark.parametrize(
    "value, message",
    [
        ({"a": 1}, "a dict cannot travel"),
        (b"raw", "a bytes cannot travel"),
        (torch.zeros(2).to_sparse(), "only strided tensors"),
        (torch.empty(2, dtype=torch.uint4), "dtype torch.uint4 cannot travel on the wire"),
        (torch.empty(2, dtype=torch.bits4x2), "dtype torch.bits4x2 cannot travel on the wire"),
    ],
    ids=["dict", "bytes", "sparse", "uint4", "bits4x2"],
)
def test_encode_rejects_values_that_cannot_travel(value: Any, message: str) -> None:
    for encode in (encode_stack, lambda s: encode_execute_request(1, s)):
        with pytest.raises(InvalidStack, match=r"^stack\[1\]") as e:
            encode([1, value])
        assert message in str(e.value)
    with pytest.raises(InvalidStack, match=r"^stack\[0\]\[1\]"):
        encode_stack([[1, value]])


def test_encode_execute_response_over_limit_raises_resource_exhausted() -> None:
    stack = [torch.zeros(1000)]
    full = encode_execute_response(stack, 1, 0, "", service.Timings(**TIMINGS))
    for limit in (10, 4000, len(full) - 1):  # below the stack, inside it, inside the timings
        with pytest.raises(ResourceExhausted, match=f"limit of {limit} bytes"):
            encode_execute_response(stack, 1, 0, "", service.Timings(**TIMINGS), limit=limit)
    assert encode_execute_response(stack, 1, 0, "", service.Timings(**TIMINGS), limit=len(full)) == full


def test_encode_execute_request_over_limit_raises_resource_exhausted() -> None:
    full = encode_execute_request(5, [torch.zeros(1000)])
    with pytest.raises(ResourceExhausted, match=f"over the limit of {len(full) - 1} bytes"):
        encode_execute_request(5, [torch.zeros(1000)], limit=len(full) - 1)
    assert encode_execute_request(5, [torch.zeros(1000)], limit=len(full)) == full


def test_encode_execute_response_writes_encode_time_from_clock() -> None:
    ticks = iter([1_000_000, 3_500_000])
    timings = service.Timings(decode_us=1, queue_us=2, run_us=3)
    buf = encode_execute_response([1.0], 1, 0, "", timings, clock=lambda: next(ticks))
    got = decode_execute_response(buf).timings
    assert got == service.Timings(decode_us=1, queue_us=2, run_us=3, encode_us=2500)


# --------------------------------------------------------------------------- protobuf compatibility


def sample_stack() -> list[Any]:
    base = random_tensor(torch.float32, (3, 4), seed=9)
    return [
        base,
        base.t(),
        random_tensor(torch.bool, (5,), seed=1),
        random_tensor(torch.bfloat16, ()),
        random_tensor(torch.float8_e5m2, (2, 2)),
        random_tensor(torch.int64, (0, 3)),
        [1, "é", None, [2.5, True, random_tensor(torch.complex64, (2,), seed=2)]],
        INT64_MIN,
        -0.0,
        "tail ✓",
    ]


def test_encoded_request_parses_with_generated_class() -> None:
    stack = sample_stack()
    msg = service.ExecuteRequest.FromString(encode_execute_request(INT64_MAX, stack, True))
    assert msg.key == INT64_MAX and msg.options.wait_for_compile
    assert_same(stack, [from_generated(v) for v in msg.stack])
    t = msg.stack[0].tensor
    assert (t.dtype, list(t.shape)) == (values_pb2.DTYPE_FLOAT32, [3, 4])


def test_encoded_response_and_stack_parse_with_generated_classes() -> None:
    stack = sample_stack()
    buf = encode_execute_response(stack, 2, 4, "why", service.Timings(**TIMINGS))
    msg = service.ExecuteResponse.FromString(buf)
    assert (msg.path, msg.reason, msg.detail) == (2, 4, "why")
    assert msg.timings == service.Timings(**TIMINGS)
    assert_same(stack, [from_generated(v) for v in msg.stack])
    msg2 = values_pb2.Stack.FromString(encode_stack(stack))
    assert_same(stack, [from_generated(v) for v in msg2.values])


def test_generated_class_bytes_decode_to_same_values() -> None:
    stack = sample_stack()
    gen = [to_generated(v) for v in stack]
    req = service.ExecuteRequest(key=-9, stack=gen)
    req.options.wait_for_compile = True
    got = decode_execute_request(req.SerializeToString())
    assert (got.key, got.wait_for_compile) == (-9, True)
    assert_same(stack, got.stack)
    resp = service.ExecuteResponse(path=1, reason=0, detail="d", stack=gen, timings=service.Timings(run_us=5))
    got_resp = decode_execute_response(resp.SerializeToString())
    assert (got_resp.path, got_resp.detail, got_resp.timings.run_us) == (1, "d", 5)
    assert_same(stack, got_resp.stack)
    assert_same(stack, decode_stack(values_pb2.Stack(values=gen).SerializeToString()))


@given(stack=stacks)
@SLOW_SETTINGS
def test_random_stacks_agree_with_generated_classes(stack: list[Any]) -> None:
    msg = service.ExecuteRequest.FromString(encode_execute_request(1, stack))
    assert_same(stack, [from_generated(v) for v in msg.stack])
    gen = service.ExecuteRequest(key=1, stack=[to_generated(v) for v in stack]).SerializeToString()
    assert_same(stack, decode_execute_request(gen).stack)


@given(stack=stacks, variant=st.integers(INT64_MIN, INT64_MAX), detail=st.text(max_size=8))
@SLOW_SETTINGS
def test_small_messages_are_byte_for_byte_what_protobuf_writes(
    stack: list[Any], variant: int, detail: str
) -> None:
    """The small path writes Execute messages by hand (no generated classes on the hot
    path): protobuf, parsing and writing them again, gives the very same bytes."""
    graph = service.RegisterRequest(alias="g").graph  # an empty Graph: a field 30 to place
    requests = [
        encode_execute_request(-3, stack),
        encode_execute_request(
            7, stack, wait_for_compile=True, variants=[1, -2], keep_outputs=True, free_handles=["a.b"],
            no_batching=True, shm_session="s", shm_slot=2, shm_fresh_output=True, graphs=[graph], alias="x",
        ),
    ]  # fmt: skip
    for buf in requests:
        assert service.ExecuteRequest.FromString(buf).SerializeToString() == buf
    head = codec.execute_request_head(7, wait_for_compile=True, variants=[5])
    assert encode_execute_request(0, stack, head=head) == encode_execute_request(
        7, stack, wait_for_compile=True, variants=[5]
    )
    for path, reason, registered in ((1, 0, 0), (2, 6, 3)):
        buf = encode_execute_response(
            stack, path, reason, detail, service.Timings(**TIMINGS), variant=variant, registered=registered
        )
        assert service.ExecuteResponse.FromString(buf).SerializeToString() == buf


def test_decoder_reads_unpacked_shape_and_fields_in_any_order() -> None:
    t = random_tensor(torch.int16, (2, 3, 1), seed=4)
    data = bytes(raw_bytes(t).tolist())
    # data first, then alignment filler, unpacked dims, dtype last; an unknown field.
    tensor = ld(4, data) + ld(3, b"\x00" * 5) + vi(2, 2) + vi(99, 1) + vi(2, 3) + vi(2, 1)
    tensor += vi(1, dtypes.code_for(torch.int16))  # type: ignore[arg-type]
    # Value: an unknown field before and after the kind.
    value = vi(98, 1) + ld(1, tensor) + ld(99, b"zz")
    # Stack fields before, between and after the key and options.
    req = ld(3, value) + vi(1, 42) + ld(3, v_str("s")) + ld(2, vi(1, 1)) + ld(3, v_int(-5)) + vi(77, 3)
    expected = [t, "s", -5]
    got = decode_execute_request(req)
    assert (got.key, got.wait_for_compile) == (42, True)
    assert_same(expected, got.stack)
    msg = service.ExecuteRequest.FromString(req)
    assert (msg.key, msg.options.wait_for_compile) == (42, True)
    assert_same(expected, [from_generated(v) for v in msg.stack])
    # A response with the timings first and the detail between stack fields.
    resp = ld(5, vi(3, 7)) + ld(4, value) + ld(3, b"late detail") + vi(1, 2) + ld(4, v_none())
    got_resp = decode_execute_response(resp)
    assert (got_resp.path, got_resp.detail, got_resp.timings.run_us) == (2, "late detail", 7)
    assert_same([t, None], got_resp.stack)


def test_decoder_follows_protobuf_last_field_wins() -> None:
    value = v_int(1) + v_str("later")  # a oneof set twice: the last one counts
    tensor = tensor_body(F32, [1], bytes(4)) + ld(4, struct.pack("<f", 2.5))  # data twice
    buf = frame("request", [value, ld(1, tensor)]) + vi(1, 8)  # key set twice
    got = decode_execute_request(buf)
    msg = service.ExecuteRequest.FromString(buf)
    assert got.key == msg.key == 8
    assert_same(["later", torch.tensor([2.5])], got.stack)
    assert_same(["later", torch.tensor([2.5])], [from_generated(v) for v in msg.stack])


# --------------------------------------------------------------------------- decoded tensors


def test_decoded_tensors_are_writable_without_warnings() -> None:
    stack = [torch.arange(6.0).view(2, 3), [torch.arange(4)], random_tensor(torch.bool, (3,))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for got in roundtrips(stack).values():
            got[0].add_(1)
            got[1][0].mul_(2)
            got[2].logical_not_()
            assert got[0].tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
            assert got[1][0].tolist() == [0, 2, 4, 6]
        t = tensor_from_proto(tensor_to_proto(torch.ones(3)))
        t.add_(1)
        v = value_from_proto(value_to_proto([torch.ones(3)]))
        v[0].add_(1)  # type: ignore[index]
        assert t.tolist() == v[0].tolist() == [2.0, 2.0, 2.0]  # type: ignore[index]


def test_decoded_tensors_outlive_the_message() -> None:
    stack = [random_tensor(torch.float64, (50, 7), seed=6), [random_tensor(torch.int8, (33,), seed=7)]]
    expected = [stack[0].clone(), [stack[1][0].clone()]]
    for framing in DECODERS:
        buf = encode_as(framing, stack)
        got = DECODERS[framing](buf)
        del buf
        gc.collect()
        junk = [bytes([i % 256]) * 4096 for i in range(256)]  # reuse freed memory
        assert_same(expected, got)
        del junk
    msg = tensor_to_proto(stack[0])
    t = tensor_from_proto(msg)
    del msg
    gc.collect()
    assert_same(expected[0], t)
    ba = bytearray(encode_stack(stack))
    got = decode_stack(ba)
    del ba
    gc.collect()
    assert_same(expected, got)


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="CPython object layout")
@pytest.mark.parametrize("framing", sorted(DECODERS))
def test_decoded_tensors_alias_the_message_bytes_without_copy(framing: str) -> None:
    # Past SMALL_MESSAGE (smaller Execute messages are parsed whole by protobuf, and copied).
    rows = SMALL_MESSAGE // 5 + 1
    stack = [random_tensor(dt, (rows, 5), seed=i) for i, dt in enumerate(WIRE_DTYPES)]
    stack.append([random_tensor(torch.float32, (9,))])
    buf = encode_as(framing, stack)
    start, end = id(buf) + BYTES_PAYLOAD, id(buf) + BYTES_PAYLOAD + len(buf)
    got = DECODERS[framing](buf)
    for t in [*got[:-1], got[-1][0]]:
        assert start <= t.data_ptr() and t.data_ptr() + t.nbytes <= end, t.dtype
    got[0].view(torch.uint8)[0] = 0xAB  # a view, so the write shows in the message itself
    assert buf[got[0].data_ptr() - start] == 0xAB


def test_decoded_tensors_alias_a_bytearray_without_copy() -> None:
    ba = bytearray(encode_stack([torch.arange(10, dtype=torch.int32)]))
    addr = ctypes.addressof(ctypes.c_char.from_buffer(ba))
    t = decode_stack(ba)[0]
    assert addr <= t.data_ptr() and t.data_ptr() + t.nbytes <= addr + len(ba)
    t[0] = 0x01020304
    assert ba[t.data_ptr() - addr : t.data_ptr() - addr + 4] == b"\x04\x03\x02\x01"


def assert_top_level_tensors_aligned(buf: bytes, decode: Callable[[bytes], list[Any]]) -> None:
    start = id(buf) + BYTES_PAYLOAD
    for i, v in enumerate(decode(buf)):
        if isinstance(v, torch.Tensor) and v.nbytes:
            assert start % 16 == 0  # CPython's allocators align bytes payloads to 16
            assert (v.data_ptr() - start) % 16 == 0, f"stack[{i}] at offset {v.data_ptr() - start}"
            assert v.data_ptr() % 16 == 0


def test_top_level_tensors_decode_16_byte_aligned() -> None:
    # Every tensor byte size near the varint boundaries, after every prefix length.
    sizes = [1, 2, 3, 15, 16, 17, 100, 127, 128, 129, 16383, 16384, 16385]
    for key in (0, 1, 300, INT64_MIN):
        for pad in range(0, 40, 3):
            stack: list[Any] = ["x" * pad]
            stack += [random_tensor(torch.uint8, (n,)) for n in sizes]
            stack += [random_tensor(torch.float64, (2, 3)).t(), random_tensor(torch.bool, ())]
            assert_top_level_tensors_aligned(encode_execute_request(key, stack), DECODERS["request"])
            assert_top_level_tensors_aligned(
                encode_execute_response(stack, 1, 0, "d" * pad, service.Timings()),
                DECODERS["response"],
            )
            assert_top_level_tensors_aligned(
                encode_stack(stack[1:] + ["y" * pad] + stack[1:]), DECODERS["stack"]
            )


@given(stack=stacks, key=st.integers(INT64_MIN, INT64_MAX), detail=st.text(max_size=40))
@SLOW_SETTINGS
def test_random_top_level_tensors_decode_16_byte_aligned(stack: list[Any], key: int, detail: str) -> None:
    assert_top_level_tensors_aligned(encode_execute_request(key, stack), DECODERS["request"])
    response = encode_execute_response(stack, 1, 0, detail, service.Timings(run_us=key % 2**64))
    assert_top_level_tensors_aligned(response, DECODERS["response"])
    assert_top_level_tensors_aligned(encode_stack([detail, *stack]), DECODERS["stack"])


# --------------------------------------------------------------------------- generated-class helpers


@pytest.mark.parametrize("dtype", WIRE_DTYPES, ids=str)
def test_tensor_to_proto_and_back_round_trips(dtype: torch.dtype) -> None:
    for t in (
        random_tensor(dtype, (3, 4), seed=8),
        random_tensor(dtype, (3, 4), seed=8).t(),
        random_tensor(dtype, ()),
        random_tensor(dtype, (0, 3)),
    ):
        msg = tensor_to_proto(t)
        assert (msg.dtype, list(msg.shape)) == (dtypes.code_for(dtype), list(t.shape))
        assert_same(t, tensor_from_proto(msg))
        assert_same(t, tensor_from_proto(values_pb2.Tensor.FromString(msg.SerializeToString())))


def test_value_to_proto_and_back_round_trips() -> None:
    for v in [*sample_stack(), *SPECIAL_FLOATS, INT64_MAX, True, None, "ü", [[], [None]]]:
        msg = value_to_proto(v)
        assert isinstance(msg, values_pb2.Value)
        assert_same(v, value_from_proto(msg))
        assert_same(v, from_generated(msg))


def test_tensor_from_proto_rejects_wrong_data_length() -> None:
    msg = values_pb2.Tensor(dtype=F32, shape=[4, 4], data=bytes(60))
    with pytest.raises(InvalidStack) as e:
        tensor_from_proto(msg, where="graph.constants[3]")
    assert str(e.value) == "graph.constants[3]: float32 tensor of shape [4, 4] needs 64 bytes, got 60"
    items = [values_pb2.Value(int_value=1), values_pb2.Value(tensor=values_pb2.Tensor())]
    with pytest.raises(InvalidStack, match=r"^value\[1\]: unknown dtype enum 0$"):
        value_from_proto(values_pb2.Value(list_value=values_pb2.ValueList(items=items)))


def test_tensor_from_proto_never_aliases_shared_one_byte_bytes() -> None:
    # CPython shares every 1-byte bytes object; a writable tensor over one would let
    # a write change b"a" everywhere in the process.
    shared = bytes([97])
    t = tensor_from_proto(values_pb2.Tensor(dtype=UINT8, data=shared))
    assert t.data_ptr() != id(shared) + BYTES_PAYLOAD
    t.fill_(ord("z"))
    assert bytes([97]) == b"a"
    t0 = tensor_from_proto(values_pb2.Tensor(dtype=BOOL, shape=[1, 1], data=b"\x01"))
    assert t0.tolist() == [[True]]


# --------------------------------------------------------------------------- malformed messages


def test_decode_rejects_wrong_data_length_with_exact_message() -> None:
    bad = v_tensor(F32, [4, 4], bytes(60))
    for framing in DECODERS:
        err = decode_or_error(framing, frame(framing, [v_int(1), v_str("x"), bad]))
        assert isinstance(err, InvalidStack)
        assert str(err) == "stack[2]: float32 tensor of shape [4, 4] needs 64 bytes, got 60"
    err = decode_or_error("stack", frame("stack", [v_list(v_int(1), bad)]))
    assert str(err) == "stack[0][1]: float32 tensor of shape [4, 4] needs 64 bytes, got 60"


def test_decode_rejects_shape_product_overflow() -> None:
    with bounded_memory():
        for shape in ([2**62, 2**62], [INT64_MAX] * 3, [2**32, 2**32, 2**32, 16]):
            err = decode_or_error("stack", frame("stack", [v_tensor(F32, shape, bytes(16))]))
            assert isinstance(err, InvalidStack)
            need = math.prod(shape) * 4
            assert str(err) == f"stack[0]: float32 tensor of shape {shape} needs {need} bytes, got 16"


def test_decode_rejects_empty_shape_whose_strides_overflow() -> None:
    # No elements, so the byte count matches, but torch cannot represent the strides.
    with bounded_memory():
        for shape in ([0, 2**62, 2**62], [2**62, 2**62, 0]):
            for framing in DECODERS:
                err = decode_or_error(framing, frame(framing, [v_tensor(F32, shape, None)]))
                assert isinstance(err, InvalidStack)
                assert str(err) == f"stack[0]: shape {shape} is too large"
    assert decode_stack(frame("stack", [v_tensor(F32, [0, INT64_MAX], None)]))[0].shape == (0, INT64_MAX)


@pytest.mark.parametrize("code", [0, 25, 1000, 2**40, 2**64 - 1])
def test_decode_rejects_unknown_dtype_enums(code: int) -> None:
    for framing in DECODERS:
        err = decode_or_error(framing, frame(framing, [v_int(0), v_tensor(code, [1], b"\x00")]))
        assert isinstance(err, InvalidStack)
        # An enum is an int32 on the wire: protobuf (and so every framing) reads the low 32 bits, signed.
        as_int32 = (code & 0xFFFF_FFFF) - ((code & 0x8000_0000) << 1)
        assert str(err) == f"stack[1]: unknown dtype enum {as_int32}"


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_decode_rejects_negative_dims(packed: bool) -> None:
    for shape in ([-1, 4], [3, -(2**63)]):
        err = decode_or_error("request", frame("request", [v_tensor(F32, shape, bytes(48), packed)]))
        assert isinstance(err, InvalidStack)
        assert re.fullmatch(rf"stack\[0\]: dim \d of shape \[{shape[0]}, {shape[1]}\] is negative", str(err))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_decode_rejects_rank_over_max_rank(packed: bool) -> None:
    ok = decode_stack(frame("stack", [v_tensor(F32, [1] * MAX_RANK, bytes(4), packed)]))
    assert ok[0].dim() == MAX_RANK
    for framing in DECODERS:
        bad = v_tensor(F32, [1] * (MAX_RANK + 1), bytes(4), packed)
        err = decode_or_error(framing, frame(framing, [bad]))
        assert str(err) == f"stack[0]: rank over {MAX_RANK}"


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_decode_rejects_a_million_dims_without_growing_memory(packed: bool) -> None:
    # Dims of 1000 (two bytes each) are not interned small ints: building a list of
    # them would cost ~15x the message. The decoder must stop at MAX_RANK + 1.
    n = 1_000_000
    if packed:  # one packed field per dim, each within the rank limit on its own
        body = vi(1, F32) + ld(2, varint(1000)) * n
    else:
        body = vi(1, F32) + vi(2, 1000) * n
    buf = frame("stack", [ld(1, body)])
    with bounded_memory(limit=8 * 2**20):
        err = decode_or_error("stack", buf)
    assert str(err) == f"stack[0]: rank over {MAX_RANK}"


def nested_list_value(levels: int) -> bytes:
    v = v_none()
    for _ in range(levels):
        v = ld(7, ld(1, v))
    return v


def test_decode_accepts_lists_nested_max_depth_levels() -> None:
    got = decode_stack(frame("stack", [nested_list_value(MAX_DEPTH)]))
    assert_same([nested(MAX_DEPTH)], got)


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 5000])
def test_decode_rejects_nesting_deeper_than_max_depth(levels: int) -> None:
    with bounded_memory():
        for framing in DECODERS:
            err = decode_or_error(framing, frame(framing, [v_int(1), nested_list_value(levels)]))
            assert isinstance(err, InvalidStack)
            where = "stack[1]" + "[0]" * MAX_DEPTH
            assert str(err) == f"{where}: lists nest deeper than {MAX_DEPTH} levels"


# Value messages that are wrong in one way each, and what the error must say.
BAD_VALUES: dict[str, tuple[bytes, str]] = {
    "data_too_long": (v_tensor(F32, [2], bytes(12)), "float32 tensor of shape [2] needs 8 bytes, got 12"),
    "data_missing": (v_tensor(F32, [2], None), "float32 tensor of shape [2] needs 8 bytes, got 0"),
    "0_dim_without_data": (v_tensor(F32, [], None), "float32 tensor of shape [] needs 4 bytes, got 0"),
    "data_for_zero_elements": (
        v_tensor(F32, [0, 3], bytes(4)),
        "float32 tensor of shape [0, 3] needs 0 bytes, got 4",
    ),
    "dtype_unspecified": (v_tensor(0, [1], b"\x00"), "unknown dtype enum 0"),
    "no_dtype": (ld(1, ld(2, b"\x01") + ld(4, b"\x00")), "unknown dtype enum 0"),
    "bool_byte_not_0_or_1": (
        v_tensor(BOOL, [3], b"\x00\x01\x02"),
        "bool tensor holds bytes other than 0 and 1",
    ),
    "string_not_utf8": (v_str(b"\xff\xfe"), "string is not valid UTF-8"),
    "no_kind": (b"", "value has no kind set"),
    "only_unknown_fields": (vi(99, 1) + ld(100, b"x"), "value has no kind set"),
    "int_as_len": (ld(2, b"\x01"), "value field 2 has wire type 2, expected 0"),
    "float_as_varint": (vi(3, 1), "value field 3 has wire type 0, expected 1"),
    "tensor_as_varint": (vi(1, 1), "value field 1 has wire type 0, expected 2"),
    "list_as_i32": (tag(7, 5) + bytes(4), "value field 7 has wire type 5, expected 2"),
    "dtype_as_len": (ld(1, ld(1, b"\x09")), "tensor field 1 has wire type 2"),
    "shape_as_i64": (ld(1, vi(1, F32) + tag(2, 1) + bytes(8)), "tensor field 2 has wire type 1"),
    "data_as_varint": (ld(1, vi(1, F32) + vi(4, 0)), "tensor field 4 has wire type 0"),
    "list_item_as_varint": (ld(7, vi(1, 5)), "list item has wire type 0"),
    "group_start": (tag(9, 3), "unsupported wire type 3 (field 9)"),
    "wire_type_7": (tag(2, 7), "unsupported wire type 7 (field 2)"),
    "field_number_0": (vi(0, 1), "field number 0 is invalid"),
    "varint_over_10_bytes": (tag(2, 0) + b"\xff" * 10 + b"\x01", "varint longer than 10 bytes"),
    "varint_cut_short": (tag(2, 0) + b"\xff\xff", "message ends inside a varint"),
    "length_past_end": (tag(5, 2) + varint(2**63) + b"abc", "field 5 runs past the end of the message"),
    "double_cut_short": (tag(3, 1) + bytes(4), "field 3 runs past the end of the message"),
    "shape_varint_cut_short": (ld(1, vi(1, F32) + ld(2, b"\x80")), "message ends inside a varint"),
}


@pytest.mark.parametrize("nest", [False, True], ids=["top", "in_list"])
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_decode_rejects_malformed_value(case: str, nest: bool) -> None:
    value, message = BAD_VALUES[case]
    where = "stack[2][1]" if nest else "stack[2]"
    bad = v_list(v_int(1), value) if nest else value
    with bounded_memory():
        for framing in DECODERS:
            err = decode_or_error(framing, frame(framing, [v_int(0), v_tensor(F32, [1], bytes(4)), bad]))
            assert isinstance(err, InvalidStack), f"{framing} accepted it"
            assert str(err) == f"{where}: {message}", framing


@pytest.mark.parametrize(
    "tail, message",
    [
        (lambda f: vi(f, 1), "stack[1]: wire type 0, expected a message"),
        (lambda f: tag(f, 1) + bytes(8), "stack[1]: wire type 1, expected a message"),
        (lambda f: ld(f, b"")[:-1], "stack[1]: message ends inside a varint"),
        (
            lambda f: tag(f, 2) + varint(50) + bytes(10),
            "stack[1]: field {f} runs past the end of the message",
        ),
        (lambda f: tag(f, 2) + b"\xff" * 11, "stack[1]: varint longer than 10 bytes"),
        (lambda f: tag(f, 4), "stack[1]: unsupported wire type 4 (field {f})"),
        (lambda f: b"\x00", "stack[1]: field number 0 is invalid"),
    ],
    ids=["varint", "i64", "cut_in_length", "length_past_end", "long_varint", "group_end", "field_0"],
)
def test_decode_rejects_malformed_stack_field_naming_its_index(
    tail: Callable[[int], bytes], message: str
) -> None:
    for framing in DECODERS:
        f = STACK_FIELD[framing]
        err = decode_or_error(framing, frame(framing, [v_int(1)]) + tail(f))
        assert isinstance(err, InvalidStack)
        assert str(err) == message.format(f=f), framing


def test_decode_of_head_fields_that_protobuf_rejects_raises_invalid_stack() -> None:
    # Framing is fine, the stack is fine, but detail is not UTF-8.
    err = decode_or_error("response", ld(3, b"\xff") + ld(4, v_int(1)))
    assert isinstance(err, InvalidStack)
    assert str(err).startswith("response: cannot parse")


def truncation_bounds(framing: str, stack: Sequence[Any]) -> tuple[bytes, list[int]]:
    """The message, and the offset at which each prefix stack[:k] of it ends (its
    head for k = 0). Only a response has fields after its stack: the timings."""
    full = encode_as(framing, stack)
    tail = len(ld(5, service.Timings(**TIMINGS).SerializeToString())) if framing == "response" else 0
    return full, [len(encode_as(framing, stack[:k])) - tail for k in range(len(stack) + 1)]


def check_truncation(framing: str, stack: Sequence[Any], full: bytes, bounds: list[int], cut: int) -> None:
    got = decode_or_error(framing, full[:cut])
    complete = sum(b <= cut for b in bounds[1:])  # values wholly before the cut
    if isinstance(got, InvalidStack):
        assert str(got).startswith(f"stack[{complete}]: "), (cut, str(got))
    else:
        assert cut <= bounds[0] or cut in bounds or cut == len(full), cut
        assert_same(list(stack[:complete]), got)


def test_truncated_message_error_names_stack_index() -> None:
    stack = sample_stack()
    for framing in DECODERS:
        full, bounds = truncation_bounds(framing, stack)
        for cut in range(len(full)):
            check_truncation(framing, stack, full, bounds, cut)
    buf = encode_stack([1, torch.zeros(8), "x"])
    with pytest.raises(InvalidStack, match=r"^stack\[1\]: field 1 runs past the end"):
        decode_stack(buf[: len(buf) - 10])


@given(stack=small_stacks, framing=framings, data=st.data())
@SLOW_SETTINGS
def _truncations(stack: list[Any], framing: str, data: st.DataObject) -> None:
    full, bounds = truncation_bounds(framing, stack)
    cut = data.draw(st.integers(0, len(full) - 1), label="cut")
    check_truncation(framing, stack, full, bounds, cut)


def test_decode_of_truncated_message_succeeds_or_raises_invalid_stack() -> None:
    with bounded_memory():
        _truncations()


# (where in the message as a fraction, a byte or a bit number, flip the bit or replace)
edits = st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.booleans()),
    min_size=1,
    max_size=6,
)


@given(stack=small_stacks, framing=framings, edits=edits)
@SLOW_SETTINGS
def _corruptions(stack: list[Any], framing: str, edits: list[tuple[float, int, bool]]) -> None:
    buf = bytearray(encode_as(framing, stack))
    for where, byte, flip in edits:
        i = int(where * len(buf))
        buf[i] = buf[i] ^ (1 << byte % 8) if flip else byte
    got = decode_or_error(framing, bytes(buf))
    if isinstance(got, InvalidStack):
        assert re.match(r"(stack\[\d+\]|request|response)", str(got)), str(got)


def test_decode_of_corrupted_bytes_succeeds_or_raises_invalid_stack() -> None:
    with bounded_memory():
        _corruptions()


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", WIRE_DTYPES, ids=str)
def test_cuda_tensor_encodes_like_its_cpu_copy(dtype: torch.dtype) -> None:
    cpu = random_tensor(dtype, (4, 6), seed=3)
    gpu = cpu.to("cuda")
    stack = [gpu, gpu.t(), [gpu[1]], gpu[:, 1:]]
    expected = [cpu, cpu.t(), [cpu[1]], cpu[:, 1:]]
    assert encode_stack(stack) == encode_stack(expected)
    assert_roundtrips(expected)
    for got in roundtrips(stack).values():
        assert_same(expected, got)


def test_transposed_tensor_travels_uncopied_with_its_dim_order() -> None:
    base = torch.randn(3, 5)
    t = base.T  # memory order [1, 0]
    msg = codec.tensor_to_proto(t)
    assert list(msg.shape) == [5, 3] and list(msg.dim_order) == [1, 0]
    assert msg.data == bytes(codec._memory_of(base))  # the memory as it is, not a copy of t
    for back in (codec.tensor_from_proto(msg), codec.decode_stack(codec.encode_stack([t]))[0]):
        assert torch.equal(back, t)
        assert back.stride() == t.stride()


def test_channels_last_keeps_its_layout() -> None:
    t = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    back = codec.decode_stack(codec.encode_stack([t]))[0]
    assert torch.equal(back, t) and back.is_contiguous(memory_format=torch.channels_last)


def test_decode_rejects_dim_order_that_is_not_a_permutation() -> None:
    bad = values_pb2.Stack(
        values=[
            values_pb2.Value(
                tensor=values_pb2.Tensor(
                    dtype=values_pb2.DTYPE_UINT8, shape=[2, 2], dim_order=[0, 0], data=bytes(4)
                )
            )
        ]
    ).SerializeToString()
    with pytest.raises(InvalidStack, match=r"stack\[0\]: dim_order \[0, 0\] is not a permutation"):
        codec.decode_stack(bad)


def test_decode_rejects_more_than_max_values() -> None:
    many = codec.encode_stack([[None] * codec.MAX_VALUES])
    with pytest.raises(InvalidStack, match=f"at most {codec.MAX_VALUES} values"):
        codec.decode_stack(many)


def test_message_aliases_use_power_of_two_ctypes_lengths() -> None:
    # ctypes caches every array type forever; a type per message length would
    # leak in a long-running server, so alias lengths are rounded up.
    sizes = range(1, 5000, 7)
    lengths = {len(codec._WritableAlias(bytes(n))._buf) for n in sizes}
    assert all(length & (length - 1) == 0 for length in lengths)
    assert len(lengths) <= 13 < len(sizes)
    assert all(len(codec._WritableAlias(bytes(n))._buf) >= n for n in sizes)


@pytest.mark.parametrize("n", [(16 << 10) // 4 + 1, (24 << 10) // 4, (32 << 10) // 4 - 16])
def test_a_small_request_with_a_tensor_over_16_kib_encodes_and_round_trips(n: int) -> None:
    """Was TypeError: the small-message encoder put a memoryview into protobuf's bytes field
    for a tensor of 16-32 KiB (over _memory_of's copy threshold, under the small message's)."""
    x = torch.arange(n, dtype=torch.float32)
    req = codec.decode_execute_request(codec.encode_execute_request(7, [x, 3]))
    assert req.key == 7 and torch.equal(req.stack[0], x) and req.stack[1] == 3
    resp = codec.decode_execute_response(codec.encode_execute_response([x], 1, 0, "", _pb.service.Timings()))
    assert torch.equal(resp.stack[0], x)


def test_a_device_region_shared_tensor_round_trips_and_a_wrong_uuid_is_invalid() -> None:
    """A response's SharedTensor in the server's device output region (cuda_device, no
    handle) comes back as it went; one whose device UUID is not 16 bytes is refused."""
    uuid = bytes(range(16))
    value = codec.Shared(3, 128, torch.float32, (2, 4), 32, b"", uuid)
    for framing, got in roundtrips([value, 7]).items():
        assert got == [value, 7], framing
    req = decode_execute_request(encode_execute_request(1, [value], shm_session="s", shm_slot=2, shm_cuda_outputs=True))
    assert (req.shm_slot, req.shm_cuda_outputs) == (2, True)
    with pytest.raises(InvalidStack, match="16-byte cuda_device"):
        decode_stack(encode_stack([codec.Shared(3, 0, torch.float32, (4,), 16, b"", b"abc")]))
