"""The stack codec: torch values <-> the protobuf wire format of values.proto.

Two ways in and out, one set of rules:

* Execute and Fallback messages are framed here by hand (`encode_execute_*`,
  `decode_execute_*`). The bytes are ordinary protobuf for service.proto, so
  clients in other languages use their generated stubs; but Python's protobuf
  copies every `bytes` field on construct, serialize and parse (3-4x the cost
  of the raw bytes at 1 MiB and above), so tensors are written straight from
  tensor memory into the one output buffer, and read back in place: a decoded
  tensor is a view into the received message, with no copy.
* Everything else (graph constants, small messages) goes through the generated
  classes with `tensor_to_proto` / `tensor_from_proto`.

Both paths validate through `_make_tensor`: a known dtype, dims >= 0, a rank
of at most 64, and product(shape) * itemsize == len(data) (Python integers, so
a shape of [2**62, 2**62] is an error, never an allocation). Errors are
`InvalidStack` and name the position: ``stack[2]: float32 tensor of shape
[4, 4] needs 64 bytes, got 60``.

Writers align the data of top-level tensors to 16 bytes inside the message
(with the Tensor.alignment filler field) so that decoded tensors are aligned
wherever the message buffer is (CPython's bytes payloads are 16-aligned).
"""

from __future__ import annotations

import ctypes
import math
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from google.protobuf.unknown_fields import UnknownFieldSet

from fuseport.wire import _pb, dtypes
from fuseport.wire.errors import InvalidArgument, InvalidStack, ResourceExhausted

__all__ = [
    "ExecuteRequest",
    "Handle",
    "Shared",
    "ExecuteResponse",
    "MAX_DEPTH",
    "MAX_RANK",
    "MAX_VALUES",
    "SMALL_MESSAGE",
    "StackValue",
    "carries_graphs",
    "message_room",
    "decode_execute_request",
    "decode_register_request",
    "has_unknown_fields",
    "decode_execute_response",
    "decode_stack",
    "encode_execute_request",
    "execute_request_head",
    "encode_execute_response",
    "encode_stack",
    "tensor_from_bytes",
    "tensor_from_proto",
    "tensor_to_proto",
    "value_from_proto",
    "value_to_proto",
]

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("fuseport's codec assumes a little-endian host")


@dataclass(frozen=True)
class Handle:
    """A TensorHandle on a stack: a tensor the server keeps on its device, by
    reference. Only `id` means anything to a server that receives one; the
    rest describes the tensor (None/empty where a sender left it out)."""

    id: str
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()
    device: str = ""
    nbytes: int = 0
    server: str = ""


@dataclass(frozen=True)
class Shared:
    """A SharedTensor on a stack: a tensor whose bytes lie in a shared-memory
    region (wire/shm.py), or with `cuda_handle`, in a client's CUDA allocation
    (wire/cuda_ipc.py), or with `cuda_device` alone, in a server's device output
    region; checked as a Tensor header is (dtype, rank, dims)."""

    region: int
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    cuda_handle: bytes = b""
    cuda_device: bytes = b""


StackValue = Union[torch.Tensor, int, float, bool, str, None, list, Handle, Shared]  # noqa: UP007

MAX_DEPTH = 32
MAX_RANK = 64
# Values per stack, lists included: a decoded value costs far more memory than
# its bytes (200k empty tensors in 1.7 MB of message took 76 MB), so the count
# is bounded, not only the message size.
MAX_VALUES = 65536
_ALIGN = 16

Buffer = Union[bytes, bytearray, memoryview]  # noqa: UP007

# Wire types of the protobuf encoding.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# Field numbers, as in values.proto and service.proto.
_V_TENSOR, _V_INT, _V_FLOAT, _V_BOOL, _V_STRING, _V_NONE, _V_LIST = 1, 2, 3, 4, 5, 6, 7
_V_HANDLE = 50
_V_SHARED = 60
# A CUDA IPC memory handle and a device UUID (wire/cuda_ipc.py; sizes fixed by CUDA).
CUDA_HANDLE_BYTES = 64
CUDA_UUID_BYTES = 16
# Longest handle id a reader accepts (servers make ~60 characters).
MAX_HANDLE_ID = 256
_T_DTYPE, _T_SHAPE, _T_ALIGN, _T_DATA, _T_ORDER = 1, 2, 3, 4, 5
_REQ_STACK = 3
_REQ_GRAPHS = 30
_RESP_STACK, _RESP_TIMINGS = 4, 5


# --------------------------------------------------------------------------- writing


def message_room(limit: int) -> int:
    """Tensor bytes a stack may hold to travel in one message of at most `limit`
    bytes: the limit less room for everything else the message carries (tags,
    shapes, scalars, timings): 1 MiB, or a sixteenth of a limit under 16 MiB.
    Past it, a stack or a result goes as a stream: client and server decide
    with the same number."""
    return limit - min(1 << 20, limit // 16)


def _varint(n: int) -> bytes:
    if 0 <= n < 128:
        return _ONE_BYTE[n]  # tags, dtypes, small dims and lengths: most varints a small call writes
    if 0 < n < 16384:
        return bytes(((n & 0x7F) | 0x80, n >> 7))  # a small tensor's length, its message's
    n &= 0xFFFF_FFFF_FFFF_FFFF  # int64 on the wire is two's complement
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_ONE_BYTE = [bytes([i]) for i in range(128)]


def _varint_len(n: int) -> int:
    n &= 0xFFFF_FFFF_FFFF_FFFF
    return max(1, (n.bit_length() + 6) // 7)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


_DOUBLE = struct.Struct("<d")
# Tensor bytes up to this many are copied into a message rather than viewed.
_SMALL_COPY = 16 << 10


def _tensor_bytes(t: torch.Tensor) -> tuple[int, torch.Tensor, tuple[int, ...]]:
    """The dtype code, a contiguous CPU tensor whose memory is the wire bytes,
    and the dim order (empty for row-major). A dense tensor in another memory
    order (a transpose, channels-last) travels as its memory, uncopied, with
    the order of its dims, so the server sees the layout the caller has."""
    code = dtypes.code_for(t.dtype)
    if code is None:
        raise InvalidStack(f"dtype {t.dtype} cannot travel on the wire")
    if t.layout != torch.strided:
        raise InvalidStack(f"only strided tensors can travel, not {t.layout}")
    if t.requires_grad:
        t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_cpu:
        t = t.cpu()
    if t.is_contiguous():
        return code, t, ()
    # Dense in some memory order exactly when its dims, sorted by stride,
    # form a contiguous tensor.
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))
    memory = t.permute(order)
    if memory.is_contiguous():
        return code, memory, order
    return code, t.contiguous(), ()


def _memory_of(t: torch.Tensor) -> memoryview | bytes:
    """The bytes of a dense CPU tensor, without copying (caller keeps `t` alive);
    a small one as a copy, which costs less than the view (one C call)."""
    n = t.nbytes
    if n == 0:
        return memoryview(b"")
    if n <= _SMALL_COPY:
        return ctypes.string_at(t.data_ptr(), n)
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


class _Writer:
    """Collects chunks of one message; tensor memory is joined only once, at the end."""

    def __init__(self) -> None:
        self.chunks: list[bytes | memoryview] = []
        self.size = 0
        self._keep: list[torch.Tensor] = []  # tensors whose memory is in `chunks`

    def put(self, b: bytes | memoryview) -> None:
        self.chunks.append(b)
        self.size += len(b)

    def getvalue(self, limit: int | None = None) -> bytes:
        if limit is not None and self.size > limit:
            raise ResourceExhausted(f"message of {self.size} bytes is over the limit of {limit} bytes")
        out = b"".join(self.chunks)
        self._keep.clear()
        return out

    # Values -------------------------------------------------------------

    def value_field(self, field: int, value: Any, where: str, depth: int = 0) -> None:
        """Writes `value` as field `field` (a Value message), aligning tensor data."""
        if isinstance(value, torch.Tensor):
            self._tensor_value_field(field, value, where)
            return
        body = _value_body(value, where, depth)
        self.put(_tag(field, _LEN) + _varint(len(body)) + body)

    def _tensor_value_field(self, field: int, t: torch.Tensor, where: str) -> None:
        code, t, order = _tensor_bytes_checked(t, where)
        data = _memory_of(t)
        n = len(data)
        pre = _tensor_prefix(code, t, order)
        data_head = _tag(_T_DATA, _LEN) + _varint(n) if n else b""
        field_tag = _tag(field, _LEN)
        # Pick the filler so that the tensor bytes start at an aligned offset:
        # grow it by what is missing until the varint lengths it changes settle.
        fixed = len(pre) + len(data_head) + n
        size = 0
        for _ in range(8):
            tensor_len = fixed + size
            value_len = 1 + _varint_len(tensor_len) + tensor_len
            start = self.size + len(field_tag) + _varint_len(value_len) + 1 + _varint_len(tensor_len)
            missing = -(start + len(pre) + size + len(data_head)) % _ALIGN if n else 0
            if not missing:
                break
            size += missing + (_ALIGN if size + missing == 1 else 0)  # a filler field is >= 2 bytes
        filler = _tag(_T_ALIGN, _LEN) + bytes([size - 2]) + bytes(size - 2) if size else b""
        self.put(
            field_tag
            + _varint(value_len)
            + _tag(_V_TENSOR, _LEN)
            + _varint(tensor_len)
            + pre
            + filler
            + data_head
        )
        if n:
            self._keep.append(t)
            self.put(data)


def _tensor_bytes_checked(t: torch.Tensor, where: str) -> tuple[int, torch.Tensor, tuple[int, ...]]:
    try:
        return _tensor_bytes(t)
    except InvalidStack as e:
        raise InvalidStack(f"{where}: {e}") from None


def _tensor_prefix(code: int, memory: torch.Tensor, order: tuple[int, ...]) -> bytes:
    """dtype, the logical shape and (when not row-major) the dim order."""
    out = _tag(_T_DTYPE, _VARINT) + _varint(code)
    shape = [memory.shape[order.index(d)] for d in range(memory.dim())] if order else list(memory.shape)
    for field, items in ((_T_SHAPE, shape), (_T_ORDER, order)):
        if items:
            packed = b"".join(_varint(d) for d in items)
            out += _tag(field, _LEN) + _varint(len(packed)) + packed
    return out


def _value_body(value: Any, where: str, depth: int) -> bytes:
    """A Value message without alignment (used for scalars and inside lists)."""
    if isinstance(value, torch.Tensor):
        code, t, order = _tensor_bytes_checked(value, where)
        data = _memory_of(t)
        tensor = _tensor_prefix(code, t, order)
        if len(data):
            tensor += _tag(_T_DATA, _LEN) + _varint(len(data)) + bytes(data)
        return _tag(_V_TENSOR, _LEN) + _varint(len(tensor)) + tensor
    if value is None:
        return _tag(_V_NONE, _LEN) + b"\x00"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return _tag(_V_BOOL, _VARINT) + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidStack(f"{where}: int {value} does not fit in int64")
        return _tag(_V_INT, _VARINT) + _varint(value)
    if isinstance(value, float):
        return _tag(_V_FLOAT, _I64) + _DOUBLE.pack(value)
    if isinstance(value, str):
        raw = value.encode("utf-8")
        return _tag(_V_STRING, _LEN) + _varint(len(raw)) + raw
    if isinstance(value, Handle):
        return _handle_body(value, where)
    if isinstance(value, Shared):
        body = _pb.values.SharedTensor(
            region=value.region,
            offset=value.offset,
            dtype=dtypes.code_for(value.dtype),
            shape=list(value.shape),
            cuda_handle=value.cuda_handle,
            cuda_device=value.cuda_device,
        ).SerializeToString()
        return _tag(_V_SHARED, _LEN) + _varint(len(body)) + body
    if isinstance(value, (list, tuple)):
        if depth >= MAX_DEPTH:
            raise InvalidStack(f"{where}: lists nest deeper than {MAX_DEPTH} levels")
        items = b"".join(
            _tag(1, _LEN) + _varint(len(b)) + b
            for b in (_value_body(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
        )
        return _tag(_V_LIST, _LEN) + _varint(len(items)) + items
    raise InvalidStack(f"{where}: a {type(value).__name__} cannot travel on the wire")


def _handle_body(h: Handle, where: str) -> bytes:
    msg = _pb.values.TensorHandle(
        id=h.id, shape=list(h.shape), device=h.device, nbytes=h.nbytes, server=h.server
    )
    if h.dtype is not None:
        code = dtypes.code_for(h.dtype)
        if code is None:
            raise InvalidStack(f"{where}: dtype {h.dtype} cannot travel on the wire")
        msg.dtype = code  # type: ignore[assignment]
    body = msg.SerializeToString()
    return _tag(_V_HANDLE, _LEN) + _varint(len(body)) + body


def _handle_from(raw: bytes, where: str) -> Handle:
    try:
        msg = _pb.values.TensorHandle.FromString(raw)
    except Exception as e:  # protobuf's DecodeError and friends
        raise InvalidStack(f"{where}: malformed TensorHandle: {e}") from None
    return _handle_of(msg, where)


def _handle_of(msg: _pb.values.TensorHandle, where: str) -> Handle:
    if not msg.id:
        raise InvalidStack(f"{where}: TensorHandle without an id")
    if len(msg.id) > MAX_HANDLE_ID:
        raise InvalidStack(f"{where}: TensorHandle id longer than {MAX_HANDLE_ID} characters")
    if len(msg.shape) > MAX_RANK:
        raise InvalidStack(f"{where}: rank over {MAX_RANK}")
    # The description is the sender's word: a server reads only the id, a
    # client gets it from the server. An unknown dtype is left out, not refused.
    return Handle(
        id=msg.id,
        dtype=dtypes.dtype_for(msg.dtype) if msg.dtype else None,
        shape=tuple(msg.shape),
        device=msg.device,
        nbytes=msg.nbytes,
        server=msg.server,
    )


def _shared_from(raw: bytes, where: str) -> Shared:
    try:
        msg = _pb.values.SharedTensor.FromString(raw)
    except Exception as e:  # protobuf's DecodeError and friends
        raise InvalidStack(f"{where}: malformed SharedTensor: {e}") from None
    return _shared_of(msg, where)


def _shared_of(msg: _pb.values.SharedTensor, where: str) -> Shared:
    dtype = dtypes.dtype_for(msg.dtype)
    if dtype is None:
        raise InvalidStack(f"{where}: unknown dtype enum {msg.dtype}")
    shape = tuple(msg.shape)
    if len(shape) > MAX_RANK:
        raise InvalidStack(f"{where}: rank over {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise InvalidStack(f"{where}: shape {list(shape)} has a negative dim")
    itemsize = dtypes.itemsize_for(msg.dtype)
    nbytes = math.prod(shape) * itemsize
    if nbytes >= 1 << 62:
        raise InvalidStack(f"{where}: shape {list(shape)} is too large")
    if msg.offset % itemsize:
        raise InvalidStack(
            f"{where}: offset {msg.offset} is not a multiple of {dtypes.name_for(msg.dtype)}'s size"
        )
    if msg.cuda_device and not msg.cuda_handle and msg.region:
        # A server's device output region (a response's; a server refuses it in a request).
        if len(msg.cuda_device) != CUDA_UUID_BYTES:
            raise InvalidStack(
                f"{where}: a SharedTensor in a device region needs a {CUDA_UUID_BYTES}-byte cuda_device, "
                f"got {len(msg.cuda_device)}"
            )
    elif msg.cuda_handle or msg.cuda_device:
        if len(msg.cuda_handle) != CUDA_HANDLE_BYTES or len(msg.cuda_device) != CUDA_UUID_BYTES:
            raise InvalidStack(
                f"{where}: a CUDA IPC SharedTensor needs a {CUDA_HANDLE_BYTES}-byte cuda_handle and a "
                f"{CUDA_UUID_BYTES}-byte cuda_device, got {len(msg.cuda_handle)} and {len(msg.cuda_device)}"
            )
        if msg.region:
            raise InvalidStack(
                f"{where}: a SharedTensor names either a region or a CUDA IPC handle, not both"
            )
    return Shared(msg.region, msg.offset, dtype, shape, nbytes, msg.cuda_handle, msg.cuda_device)


def encode_stack(values: Sequence[StackValue], field: int = 1, limit: int | None = None) -> bytes:
    """A `Stack` message (or, with another field number, repeated Value fields)."""
    w = _Writer()
    for i, v in enumerate(values):
        w.value_field(field, v, f"stack[{i}]")
    return w.getvalue(limit)


# --------------------------------------------------------------------------- reading


class _WritableAlias:
    """A writable view of a received `bytes` message, so decoded tensors need no copy.

    gRPC hands each received message to us as a fresh `bytes` object that nothing
    else references. Tensors decoded from it alias its memory; making the alias
    writable (through ctypes, CPython's object layout) spares both a copy and
    torch's warning about read-only buffers, and is safe because no one else can
    see that object. Each tensor's storage holds the alias and the alias holds the
    message, so the memory lives as long as any tensor does.
    """

    _HEADER = bytes.__basicsize__ - 1  # offset of the payload in a PyBytesObject

    def __init__(self, buf: Buffer) -> None:
        self._buf: Any
        if isinstance(buf, bytes) and sys.implementation.name == "cpython":
            # ctypes caches every array type it makes, forever: one per message
            # length would leak in a long-running server. Lengths rounded up to a
            # power of two give at most 64 types; only the validated spans inside
            # the real message are ever read or written.
            nominal = 1 << (len(buf) - 1).bit_length() if buf else 1
            self._buf = (ctypes.c_char * nominal).from_address(id(buf) + self._HEADER)
            # torch.frombuffer keeps the ctypes array alive; the array keeps the message.
            self._buf.owner = buf
        elif isinstance(buf, bytearray) or (isinstance(buf, memoryview) and not buf.readonly):
            self._buf = buf
        else:  # elsewhere, a copy is the safe choice
            self._buf = bytearray(buf)

    def tensor(self, dtype: torch.dtype, shape: list[int], offset: int, nbytes: int) -> torch.Tensor:
        # Straight in the tensor's dtype: a uint8 view then two .view()s cost 4.7 us
        # a tensor against 1.3 us (a small call decodes one or two).
        flat = torch.frombuffer(self._buf, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
        return flat if len(shape) == 1 else flat.view(shape)


class _StackIndex:
    """The `where` of a message's top-level fields: the stack index of the value
    being read, so that a truncated message says ``stack[3]: ...``."""

    def __init__(self, values: list[Any]) -> None:
        self._values = values

    def __str__(self) -> str:
        return f"stack[{len(self._values)}]"


class _Reader:
    """A bounds-checked protobuf reader over one message buffer."""

    def __init__(self, buf: Buffer) -> None:
        self.buf = buf
        self.view = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
        self._alias: _WritableAlias | None = None
        self.count = 0  # values decoded so far, against MAX_VALUES

    @property
    def alias(self) -> _WritableAlias:
        if self._alias is None:
            self._alias = _WritableAlias(self.buf)
        return self._alias

    def varint(self, pos: int, end: int, where: str | _StackIndex) -> tuple[int, int]:
        result = shift = 0
        view = self.view
        while True:
            if pos >= end:
                raise InvalidStack(f"{where}: message ends inside a varint")
            b = view[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result & 0xFFFF_FFFF_FFFF_FFFF, pos
            shift += 7
            if shift >= 70:
                raise InvalidStack(f"{where}: varint longer than 10 bytes")

    def fields(self, pos: int, end: int, where: str | _StackIndex) -> Iterable[tuple[int, int, int, int]]:
        """Yields (field, wire_type, start, stop) of each field; for VARINT/I64/I32
        start is the value's position and stop its end; for LEN, the payload."""
        while pos < end:
            key, pos = self.varint(pos, end, where)
            field, wt = key >> 3, key & 7
            if field == 0:
                raise InvalidStack(f"{where}: field number 0 is invalid")
            if wt == _VARINT:
                _, stop = self.varint(pos, end, where)
            elif wt == _I64:
                stop = pos + 8
            elif wt == _I32:
                stop = pos + 4
            elif wt == _LEN:
                n, pos = self.varint(pos, end, where)
                stop = pos + n
            else:
                raise InvalidStack(f"{where}: unsupported wire type {wt} (field {field})")
            if stop > end:
                raise InvalidStack(f"{where}: field {field} runs past the end of the message")
            yield field, wt, pos, stop
            pos = stop

    def value(self, start: int, end: int, where: str, depth: int = 0) -> StackValue:
        self.count += 1
        if self.count > MAX_VALUES:
            raise InvalidStack(f"{where}: a stack may hold at most {MAX_VALUES} values")
        kind: tuple[str, Any] | None = None
        for field, wt, a, b in self.fields(start, end, where):
            expected = _VALUE_WIRE_TYPES.get(field)
            if expected is None:
                continue  # unknown field: ignored, as protobuf does
            if wt != expected:
                raise InvalidStack(f"{where}: value field {field} has wire type {wt}, expected {expected}")
            kind = (field, a, b)  # type: ignore[assignment]
        if kind is None:
            raise InvalidStack(f"{where}: value has no kind set")
        field, a, b = kind  # type: ignore[misc]
        if field == _V_TENSOR:
            return self.tensor(a, b, where)
        if field == _V_INT:
            n, _ = self.varint(a, b, where)
            return n - (1 << 64) if n >= 1 << 63 else n
        if field == _V_FLOAT:
            return _DOUBLE.unpack_from(self.view, a)[0]
        if field == _V_BOOL:
            n, _ = self.varint(a, b, where)
            return n != 0
        if field == _V_STRING:
            try:
                return bytes(self.view[a:b]).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidStack(f"{where}: string is not valid UTF-8") from None
        if field == _V_NONE:
            return None
        if field == _V_HANDLE:
            return _handle_from(bytes(self.view[a:b]), where)
        if field == _V_SHARED:
            return _shared_from(bytes(self.view[a:b]), where)
        # _V_LIST
        if depth >= MAX_DEPTH:
            raise InvalidStack(f"{where}: lists nest deeper than {MAX_DEPTH} levels")
        items: list[StackValue] = []
        for f, wt, ia, ib in self.fields(a, b, where):
            if f != 1:
                continue
            if wt != _LEN:
                raise InvalidStack(f"{where}: list item has wire type {wt}")
            items.append(self.value(ia, ib, f"{where}[{len(items)}]", depth + 1))
        return items

    def tensor(self, start: int, end: int, where: str) -> torch.Tensor:
        code = 0
        dims: dict[int, list[int]] = {_T_SHAPE: [], _T_ORDER: []}
        data = (0, 0)
        for field, wt, a, b in self.fields(start, end, where):
            if field == _T_DTYPE and wt == _VARINT:
                code, _ = self.varint(a, b, where)
                # An enum is an int32 on the wire, as protobuf reads it (and so
                # the small-message path): the low 32 bits, signed.
                code = (code & 0xFFFF_FFFF) - ((code & 0x8000_0000) << 1)
            elif field in dims and wt in (_LEN, _VARINT):  # packed, or unpacked: both valid
                items = dims[field]
                pos = a
                while pos < b:  # a VARINT field's span holds exactly one varint
                    d, pos = self.varint(pos, b, where)
                    items.append(d - (1 << 64) if d >= 1 << 63 else d)
                    if len(items) > MAX_RANK:
                        # Here, not later: a list of dims costs ~15x their wire size.
                        raise InvalidStack(f"{where}: rank over {MAX_RANK}")
            elif field == _T_DATA and wt == _LEN:
                data = (a, b - a)
            elif field in (_T_DTYPE, _T_SHAPE, _T_DATA, _T_ORDER):
                raise InvalidStack(f"{where}: tensor field {field} has wire type {wt}")
        offset, nbytes = data
        return _make_tensor(
            code,
            dims[_T_SHAPE],
            dims[_T_ORDER],
            nbytes,
            where,
            lambda dt, n, memory_shape: self.alias.tensor(dt, memory_shape, offset, n),
        )


_VALUE_WIRE_TYPES = {
    _V_TENSOR: _LEN,
    _V_INT: _VARINT,
    _V_FLOAT: _I64,
    _V_BOOL: _VARINT,
    _V_STRING: _LEN,
    _V_NONE: _LEN,
    _V_LIST: _LEN,
    _V_HANDLE: _LEN,
    _V_SHARED: _LEN,
}


_DTYPE_FOR = dtypes.dtype_for
_BOOL = torch.bool


def _make_tensor(
    code: int,
    shape: list[int],
    order: list[int],
    nbytes: int,
    where: str,
    build: Callable[[torch.dtype, int, list[int]], torch.Tensor],
) -> torch.Tensor:
    """Validates a tensor's header against its byte length, then builds it:
    `build(dtype, nbytes, memory_shape)` gives the tensor in memory order."""
    dtype = _DTYPE_FOR(code)
    if dtype is None:
        raise InvalidStack(f"{where}: unknown dtype enum {code}")
    if len(shape) > MAX_RANK:
        raise InvalidStack(f"{where}: rank over {MAX_RANK}")
    if order and sorted(order) != list(range(len(shape))):
        raise InvalidStack(f"{where}: dim_order {order} is not a permutation of the {len(shape)} dims")
    if shape and min(shape) < 0:
        i = next(i for i, d in enumerate(shape) if d < 0)
        raise InvalidStack(f"{where}: dim {i} of shape {shape} is negative")
    need = math.prod(shape) * dtype.itemsize
    if need != nbytes:
        raise InvalidStack(
            f"{where}: {dtypes.name_for(code)} tensor of shape {shape} needs {need} bytes, got {nbytes}"
        )
    if need == 0:
        try:
            return torch.empty(shape, dtype=dtype)
        except RuntimeError:  # no elements, but strides past int64: [0, 2**62, 2**62]
            raise InvalidStack(f"{where}: shape {shape} is too large") from None
    t = build(dtype, nbytes, [shape[d] for d in order] if order else shape)
    if dtype is _BOOL and bool((t.view(torch.uint8) > 1).any()):
        raise InvalidStack(f"{where}: bool tensor holds bytes other than 0 and 1")
    if order:
        t = t.permute([order.index(d) for d in range(len(order))])
    return t


def decode_stack(buf: Buffer, field: int = 1) -> list[StackValue]:
    """The values of a `Stack` message (or of repeated Value fields `field`)."""
    r = _Reader(buf)
    out: list[StackValue] = []
    for f, wt, a, b in r.fields(0, len(r.view), _StackIndex(out)):
        if f == field:
            if wt != _LEN:
                raise InvalidStack(f"stack[{len(out)}]: wire type {wt}, expected a message")
            out.append(r.value(a, b, f"stack[{len(out)}]"))
    return out


# --------------------------------------------------------------------------- Execute messages


@dataclass(frozen=True)
class ExecuteRequest:
    key: int
    stack: list[StackValue]
    wait_for_compile: bool = False
    variants: tuple[int, ...] = ()  # the only variants the client runs; empty: any
    # Graphs to register before running (a retry on a replica that lacks the kernel).
    graphs: tuple[_pb.graph.Graph, ...] = ()
    alias: str | None = None  # with graphs: registered with graphs[0]
    keep_outputs: bool = False  # tensor outputs stay on the server's device, as Handles
    # Shared memory: the session its Shared values name, and the slot whose
    # output region takes the tensor outputs (0: they travel as bytes).
    shm_session: str = ""
    shm_slot: int = 0
    shm_fresh_output: bool = False  # ExecuteOptions.shared_memory_fresh_output
    shm_cuda_outputs: bool = False  # ExecuteOptions.shared_memory_cuda_outputs
    no_batching: bool = False  # never batched with other calls (ExecuteOptions.no_batching)
    free_handles: tuple[str, ...] = ()  # the caller's handles to free first (ExecuteOptions.free_handles)


@dataclass(frozen=True)
class ExecuteResponse:
    stack: list[StackValue]
    path: int  # _pb.service.Path
    reason: int  # _pb.service.FallbackReason
    detail: str
    timings: _pb.service.Timings
    variant: int = 0
    registered: int = 0  # graphs of the request that were new on the server


def _split(buf: Buffer, stack_field: int) -> tuple[_Reader, bytes, list[tuple[int, int]]]:
    """Separates a message's stack fields from the rest (parsed by protobuf)."""
    r = _Reader(buf)
    rest: list[bytes] = []
    spans: list[tuple[int, int]] = []
    pos, end = 0, len(r.view)
    for f, wt, a, b in r.fields(0, end, _StackIndex(spans)):
        if f == stack_field:
            if wt != _LEN:
                raise InvalidStack(f"stack[{len(spans)}]: wire type {wt}, expected a message")
            spans.append((a, b))
        else:
            rest.append(bytes(r.view[pos:b]))
        pos = b
    return r, b"".join(rest), spans


def execute_request_head(
    key: int,
    *,
    wait_for_compile: bool = False,
    variants: Sequence[int] = (),
    keep_outputs: bool = False,
    shm_session: str = "",
    shm_slot: int = 0,
    no_batching: bool = False,
    shm_fresh_output: bool = False,
    free_handles: Sequence[str] = (),
    shm_cuda_outputs: bool = False,
) -> bytes:
    """An ExecuteRequest's key and options, serialized: what comes before its stack.
    A caller that sends many calls with the same options makes it once and hands
    it to encode_execute_request (`head`)."""
    head = _pb.service.ExecuteRequest(key=key)
    if free_handles:
        head.options.free_handles.extend(free_handles)
    if no_batching:
        head.options.no_batching = True
    if shm_session:
        head.options.shared_memory_session = shm_session
        head.options.shared_memory_slot = shm_slot
        if shm_fresh_output:
            head.options.shared_memory_fresh_output = True
        if shm_cuda_outputs:
            head.options.shared_memory_cuda_outputs = True
    if wait_for_compile:
        head.options.wait_for_compile = True
    if keep_outputs:
        head.options.keep_outputs = True
    if variants:
        head.options.variants.extend(variants)
    return head.SerializeToString()  # type: ignore[no-any-return]


def encode_execute_request(
    key: int,
    stack: Sequence[StackValue],
    wait_for_compile: bool = False,
    limit: int | None = None,
    variants: Sequence[int] = (),
    graphs: Sequence[_pb.graph.Graph] = (),
    alias: str | None = None,
    keep_outputs: bool = False,
    shm_session: str = "",
    shm_slot: int = 0,
    no_batching: bool = False,
    shm_fresh_output: bool = False,
    free_handles: Sequence[str] = (),
    head: bytes | None = None,
    shm_cuda_outputs: bool = False,
) -> bytes:
    """Frames an ExecuteRequest. `head`: execute_request_head's bytes for this key
    and these options, made once by the caller (the key and options given here are
    then not read). A small stack's message is byte for byte what protobuf writes."""
    if head is None:
        head = execute_request_head(
            key,
            wait_for_compile=wait_for_compile,
            variants=variants,
            keep_outputs=keep_outputs,
            shm_session=shm_session,
            shm_slot=shm_slot,
            no_batching=no_batching,
            shm_fresh_output=shm_fresh_output,
            free_handles=free_handles,
            shm_cuda_outputs=shm_cuda_outputs,
        )
    tail = b""
    if graphs:  # fields 30 and 31: after the stack, where protobuf writes them
        rest = _pb.service.ExecuteRequest(graphs=graphs)
        if alias is not None:
            rest.alias = alias
        tail = rest.SerializeToString()
    small = _small_fields(_REQ_STACK_TAG, stack)
    if small is not None:
        return _within(head + small + tail, limit)
    w = _Writer()
    w.put(head)
    for i, v in enumerate(stack):
        w.value_field(_REQ_STACK, v, f"stack[{i}]")
    if tail:
        w.put(tail)
    return w.getvalue(limit)


def carries_graphs(buf: Buffer) -> bool:
    """Whether an ExecuteRequest carries graphs to register (field `graphs`),
    read from its top-level tags alone: the server's access check asks this
    before anything is decoded. A message it cannot walk is answered False:
    decoding it refuses the same message before anything is registered."""
    r = _Reader(buf)
    try:
        return any(f == _REQ_GRAPHS for f, _, _, _ in r.fields(0, len(r.view), "request"))
    except InvalidStack:
        return False


# RegisterRequest.graph, Graph.constants, Tensor.data (proto/fuseport/v1/service.proto, graph.proto, values.proto).
_REG_GRAPH, _GRAPH_CONSTANTS, _TENSOR_DATA = 1, 2, 4


def _writable_view(buf: Buffer) -> memoryview:
    """`buf` as a writable byte view (see _WritableAlias): slices of it alias the message."""
    alias = _WritableAlias(buf)._buf
    return memoryview(alias).cast("B")[: len(buf)]


def _strip_constants(buf: Buffer) -> tuple[bytes, list[tuple[int, int]]]:
    """A RegisterRequest's bytes without its constants' data fields (the lengths around
    them written again), and where each constant's data lies in `buf`. InvalidStack for
    anything this walk does not take as protobuf would (a field twice where protobuf
    would merge or replace it, a wire type protobuf would keep as unknown, framing it
    would refuse): the caller then leaves the whole message to protobuf."""
    r = _Reader(buf)
    out: list[bytes] = []
    spans: list[tuple[int, int]] = []
    seen_graph = False
    pos = 0
    for f, wt, a, b in r.fields(0, len(r.view), "request"):
        if f != _REG_GRAPH:
            out.append(bytes(r.view[pos:b]))
        elif wt != _LEN or seen_graph:
            raise InvalidStack("request: graph field not once, as a message")
        else:
            seen_graph = True
            graph: list[bytes] = []
            gpos = a
            for gf, gwt, ga, gb in r.fields(a, b, "graph"):
                if gf != _GRAPH_CONSTANTS:
                    graph.append(bytes(r.view[gpos:gb]))
                elif gwt != _LEN:
                    raise InvalidStack("graph: constants field not a message")
                else:
                    body: list[bytes] = []
                    span = (ga, ga)  # no data field: empty data
                    cpos, seen_data = ga, False
                    for cf, cwt, ca, cb in r.fields(ga, gb, "constant"):
                        if cf != _TENSOR_DATA:
                            body.append(bytes(r.view[cpos:cb]))
                        elif cwt != _LEN or seen_data:
                            raise InvalidStack("constant: data field not once, as bytes")
                        else:
                            span, seen_data = (ca, cb), True
                        cpos = cb
                    constant = b"".join(body)
                    graph.append(_tag(_GRAPH_CONSTANTS, _LEN) + _varint(len(constant)) + constant)
                    spans.append(span)
                gpos = gb
            whole = b"".join(graph)
            out.append(_tag(_REG_GRAPH, _LEN) + _varint(len(whole)) + whole)
        pos = b
    return b"".join(out), spans


def _parse_register(buf: Buffer) -> _pb.service.RegisterRequest:
    try:
        return _pb.service.RegisterRequest.FromString(buf)
    except Exception as e:  # protobuf's DecodeError and friends
        raise InvalidArgument(f"malformed RegisterRequest: {e}") from None


def has_unknown_fields(graph: _pb.graph.Graph) -> bool:
    """Whether a graph or one of its constants carries fields this server does not
    know: its key covers them, so it is keyed and stored whole (server/intake.py)."""
    return bool(len(UnknownFieldSet(graph)) or any(len(UnknownFieldSet(c)) for c in graph.constants))


def decode_register_request(buf: Buffer) -> tuple[_pb.service.RegisterRequest, list[memoryview] | None]:
    """A RegisterRequest, its graph's constants without their data, and that data as
    writable views of `buf` (one per constant, in order), so that a graph's constants
    cost no bytes beyond the request's own (issue 20): protobuf's parse of the whole
    message would copy them (upb copies the buffer), and each read of a bytes field
    copies again. Only the data fields are taken out; protobuf parses and checks the
    rest as it would the whole message. `buf` must be a bytes object only the caller
    holds (gRPC's request), as for decode_stack: the views alias it, writable.

    A message whose constants this walk cannot take out exactly as protobuf reads
    them, or whose graph or constants carry fields this server does not know (their
    key covers everything they carry: server/intake.py), is parsed whole by protobuf:
    (the message, None)."""
    try:
        skeleton, spans = _strip_constants(buf)
    except InvalidStack:
        return _parse_register(buf), None
    req = _parse_register(skeleton)
    graph = req.graph
    if len(spans) != len(graph.constants) or has_unknown_fields(graph):
        return _parse_register(buf), None
    view = _writable_view(buf)
    return req, [view[a:b] for a, b in spans]


def _decode_execute(buf: Buffer, stack_field: int, cls: Any, what: str) -> tuple[Any, list[StackValue]]:
    """The message's other fields (parsed by protobuf) and its decoded stack."""
    if len(buf) <= SMALL_MESSAGE:
        small = _decode_small(bytes(buf), cls)
        if small is not None:
            return small
    r, rest, spans = _split(buf, stack_field)
    try:
        head = cls.FromString(rest)
    except Exception as e:  # protobuf's DecodeError and friends
        raise InvalidStack(f"{what}: cannot parse: {e}") from None
    return head, [r.value(a, b, f"stack[{i}]") for i, (a, b) in enumerate(spans)]


def decode_execute_request(buf: Buffer) -> ExecuteRequest:
    head, stack = _decode_execute(buf, _REQ_STACK, _pb.service.ExecuteRequest, "request")
    if not head.HasField("options") and not head.graphs:  # the common small call: 5 us less
        return ExecuteRequest(head.key, stack)
    options = head.options
    return ExecuteRequest(
        key=head.key,
        stack=stack,
        wait_for_compile=options.wait_for_compile,
        variants=tuple(options.variants),
        graphs=tuple(head.graphs),
        alias=head.alias if head.HasField("alias") else None,
        keep_outputs=options.keep_outputs,
        shm_session=options.shared_memory_session,
        shm_slot=options.shared_memory_slot,
        shm_fresh_output=options.shared_memory_fresh_output,
        shm_cuda_outputs=options.shared_memory_cuda_outputs,
        no_batching=options.no_batching,
        free_handles=tuple(options.free_handles),
    )


def encode_execute_response(
    stack: Sequence[StackValue],
    path: int,
    reason: int,
    detail: str,
    timings: _pb.service.Timings,
    limit: int | None = None,
    clock: Callable[[], int] | None = None,
    variant: int = 0,
    registered: int = 0,
) -> bytes:
    """Frames an ExecuteResponse. With `clock` (ns), the encode time is measured
    and added to `timings.encode_us` (what the caller spent encoding before, such
    as writing shared memory) and written last, so that it covers the encoding itself.
    A small stack's message is byte for byte what protobuf writes."""
    start = clock() if clock else 0
    # Fields 1-3 (path, reason, detail), the stack (4), the timings (5), then 6 and 30.
    head = (_tag(1, _VARINT) + _varint(path) if path else b"") + (
        _tag(2, _VARINT) + _varint(reason) if reason else b""
    )
    if detail:
        raw = detail.encode("utf-8")
        head += _tag(3, _LEN) + _varint(len(raw)) + raw
    tail = (_tag(6, _VARINT) + _varint(variant) if variant else b"") + (
        _tag(30, _VARINT) + _varint(registered) if registered else b""
    )
    small = _small_fields(_RESP_STACK_TAG, stack)
    if small is None:
        w = _Writer()
        w.put(head)
        for i, v in enumerate(stack):
            w.value_field(_RESP_STACK, v, f"stack[{i}]")
    if clock:
        timings.encode_us += (clock() - start) // 1000
    times = timings.SerializeToString()
    times = _tag(_RESP_TIMINGS, _LEN) + _varint(len(times)) + times
    if small is not None:
        return _within(head + small + times + tail, limit)
    w.put(times)
    w.put(tail)
    return w.getvalue(limit)


def decode_execute_response(buf: Buffer) -> ExecuteResponse:
    head, stack = _decode_execute(buf, _RESP_STACK, _pb.service.ExecuteResponse, "response")
    return ExecuteResponse(
        stack, head.path, head.reason, head.detail, head.timings, head.variant, head.registered
    )


# --------------------------------------------------------------------------- small messages

# Execute messages up to this size are parsed and built whole by protobuf's C
# implementation (upb), their tensor bytes copied: for a 1 KiB stack that is 6-8
# us a message against 19-23 us for the zero-copy framing above, which walks
# every tag in Python. Past it, the copies cost more than the walk (see the
# module's docstring). The same checks apply either way (_make_tensor,
# _handle_of, _shared_of, MAX_VALUES, MAX_DEPTH); the one difference is that a
# small message's tensors are copies, not views into the message.
SMALL_MESSAGE = 64 << 10


def _decode_small(buf: bytes, cls: Any) -> tuple[Any, list[StackValue]] | None:
    """None when protobuf cannot parse it or a value is invalid: the framing
    above then decides, and names what is wrong and where, the same words for
    a message of any size (protobuf skips a field of the wrong wire type as
    unknown, where the framing names it)."""
    try:
        msg = cls.FromString(buf)
    except Exception:  # protobuf's DecodeError and friends
        return None
    if len(UnknownFieldSet(msg)):
        return None
    count = [0]
    try:
        # Where a value is goes unsaid: the framing, given the message again, says it.
        return msg, [_value_of(v, "stack", 0, count) for v in msg.stack]
    except InvalidStack:
        return None  # the framing says it as it says it of any size


def _value_of(v: _pb.values.Value, where: str, depth: int, count: list[int]) -> StackValue:
    count[0] += 1
    if count[0] > MAX_VALUES:
        raise InvalidStack(f"{where}: a stack may hold at most {MAX_VALUES} values")
    if len(UnknownFieldSet(v)):
        raise InvalidStack(f"{where}: a field of another wire type or number")  # the framing names it
    kind = v.WhichOneof("kind")
    if kind == "tensor":
        t = v.tensor
        if len(UnknownFieldSet(t)):
            raise InvalidStack(f"{where}: a tensor field of another wire type or number")
        shape, order = t.shape, t.dim_order
        if len(shape) > MAX_RANK or len(order) > MAX_RANK:
            raise InvalidStack(f"{where}: rank over {MAX_RANK}")
        data = t.data
        # A copy into a bytearray (writable, ours) costs less than aliasing the
        # bytes object for a small tensor (1.3 against 2.8 us at 1 KiB).
        return _make_tensor(
            t.dtype, shape[:], order[:] if order else [], len(data), where,  # [:]: a list, at a quarter of list()'s cost
            lambda dt, n, shape: _small_tensor(data, dt, shape),
        )  # fmt: skip
    if kind == "int_value":
        return v.int_value
    if kind == "float_value":
        return v.float_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "string_value":
        return v.string_value
    if kind == "none_value":
        return None
    if kind == "handle":
        return _handle_of(v.handle, where)
    if kind == "shared":
        return _shared_of(v.shared, where)
    if kind == "list_value":
        if depth >= MAX_DEPTH:
            raise InvalidStack(f"{where}: lists nest deeper than {MAX_DEPTH} levels")
        items = v.list_value
        if len(UnknownFieldSet(items)):
            raise InvalidStack(f"{where}: a list field of another wire type or number")
        return [_value_of(item, where, depth + 1, count) for item in items.items]
    raise InvalidStack(f"{where}: value has no kind set")


def _small_tensor(data: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    flat = torch.frombuffer(bytearray(data), dtype=dtype)
    return flat if len(shape) == 1 else flat.view(shape)


def _tensor_bytes_within(stack: Sequence[StackValue], budget: int) -> int | None:
    """What is left of `budget` after the stack's tensor bytes; None past it."""
    for v in stack:
        if isinstance(v, torch.Tensor):
            budget -= v.numel() * v.element_size()
        elif isinstance(v, (list, tuple)):
            left = _tensor_bytes_within(v, budget)
            if left is None:
                return None
            budget = left
        if budget < 0:
            return None
    return budget


_REQ_STACK_TAG = _tag(_REQ_STACK, _LEN)
_RESP_STACK_TAG = _tag(_RESP_STACK, _LEN)
_LIST_ITEM_TAG = _tag(1, _LEN)
_V_TENSOR_TAG = _tag(_V_TENSOR, _LEN)
_V_LIST_TAG = _tag(_V_LIST, _LEN)
_T_SHAPE_TAG = _tag(_T_SHAPE, _LEN)
_T_DATA_TAG = _tag(_T_DATA, _LEN)
_T_ORDER_TAG = _tag(_T_ORDER, _LEN)
_T_DTYPE_TAG = _tag(_T_DTYPE, _VARINT)


def _small_fields(tag: bytes, stack: Sequence[StackValue]) -> bytes | None:
    """`stack` as repeated Value fields (`tag`: the field's), byte for byte as protobuf
    writes them; None when its tensors (lists included) hold over SMALL_MESSAGE // 2
    bytes: the framing above then writes it, tensor data aligned and uncopied. Written
    here rather than by protobuf's classes, whose every field set is a call: 2-3 us
    for a 1 KiB tensor against 6-8 us, on the path of every small call."""
    if _tensor_bytes_within(stack, SMALL_MESSAGE // 2) is None:
        return None
    parts: list[bytes] = []
    for i, v in enumerate(stack):
        body = _small_value(v, f"stack[{i}]", 0)
        parts += (tag, _varint(len(body)), body)
    return b"".join(parts)


def _small_value(value: Any, where: str, depth: int) -> bytes:
    """A Value message, as protobuf writes it (a tensor's fields in number order)."""
    if isinstance(value, torch.Tensor):
        code, memory, order = _tensor_bytes_checked(value, where)
        shape = [memory.shape[order.index(d)] for d in range(memory.dim())] if order else memory.shape
        body = _T_DTYPE_TAG + _varint(code)
        if shape:
            packed = b"".join(map(_varint, shape))
            body += _T_SHAPE_TAG + _varint(len(packed)) + packed
        n = memory.nbytes
        if n:
            body += _T_DATA_TAG + _varint(n) + ctypes.string_at(memory.data_ptr(), n)
        if order:
            packed = b"".join(map(_varint, order))
            body += _T_ORDER_TAG + _varint(len(packed)) + packed
        return _V_TENSOR_TAG + _varint(len(body)) + body
    if isinstance(value, (list, tuple)):
        if depth >= MAX_DEPTH:
            raise InvalidStack(f"{where}: lists nest deeper than {MAX_DEPTH} levels")
        items = b"".join(
            _LIST_ITEM_TAG + _varint(len(b)) + b
            for b in (_small_value(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
        )
        return _V_LIST_TAG + _varint(len(items)) + items
    return _value_body(value, where, depth)


def _within(out: bytes, limit: int | None) -> bytes:
    if limit is not None and len(out) > limit:
        raise ResourceExhausted(f"message of {len(out)} bytes is over the limit of {limit} bytes")
    return out


# --------------------------------------------------------------------------- generated classes


def tensor_to_proto(t: torch.Tensor, where: str = "tensor") -> _pb.values.Tensor:
    code, memory, order = _tensor_bytes_checked(t, where)
    msg = _pb.values.Tensor.FromString(_tensor_prefix(code, memory, order))
    msg.data = bytes(_memory_of(memory))
    return msg


def tensor_from_proto(msg: _pb.values.Tensor, where: str = "tensor") -> torch.Tensor:
    return tensor_from_bytes(msg.dtype, list(msg.shape), msg.data, where, list(msg.dim_order))


def tensor_from_bytes(
    code: int, shape: list[int], data: Buffer, where: str = "tensor", order: list[int] | None = None
) -> torch.Tensor:
    """A tensor over `data` (row-major, or in `order`), with every check of the
    codec (rank, sizes, byte length, bool bytes). `data` must be a bytes object
    that only the caller holds, as a protobuf field read once is, or a writable
    view (decode_register_request's): the tensor aliases it, writable, without a copy."""
    if len(data) < 2:  # CPython shares b"" and 1-byte bytes objects: never alias those
        data = bytearray(data)  # type: ignore[assignment]
    return _make_tensor(
        code,
        shape,
        order or [],
        len(data),
        where,
        lambda dt, n, memory_shape: _WritableAlias(data).tensor(dt, memory_shape, 0, n),
    )


def value_to_proto(value: StackValue, where: str = "value") -> _pb.values.Value:
    return _pb.values.Value.FromString(_value_body(value, where, 0))


def value_from_proto(msg: _pb.values.Value, where: str = "value") -> StackValue:
    body = msg.SerializeToString()
    return _Reader(body).value(0, len(body), where)
