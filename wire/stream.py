"""Streamed stacks and graphs: the StackChunk format of ExecuteStream/FallbackStream and RegisterStream (service.proto).

A stream is a header (the stack with every tensor's dtype and shape but no
bytes, and each tensor's byte size), data chunks (tensor index, offset,
CRC-32C, bytes) and an end (counts). The writer here sends each chunk straight
from tensor memory (one copy, into the chunk's message); the reader
(`Assembler`) checks the header completely before it allocates anything, then
copies each chunk's bytes straight into its tensor's preallocated destination
(a `Sink`: host memory here, pinned staging to the device on the server), so a
stack never exists as one message: not past protobuf's 2 GiB ceiling, and not
twice in memory.

RegisterStream speaks the same format with a register header in the place of
the request's: its chunks carry a graph's large constants (StreamData.tensor is
the constant's index), each assembled into a `BufferSink` that the registered
graph's constant then aliases, so that Register's peak is the graph and a chunk
(a unary Register's receive alone is 3 times the graph: docs/perf.md).

Errors are InvalidStack (INVALID_ARGUMENT) naming the chunk and what is wrong
with it; the budget check the reader is given raises ResourceExhausted.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import crc32c
import torch

from fuseport.wire import _pb, codec, dtypes
from fuseport.wire.errors import InvalidStack
from fuseport.wire.hostmem import PagePool

__all__ = [
    "CHUNK_BYTES",
    "Assembler",
    "BufferSink",
    "HostSink",
    "Sink",
    "TensorSpec",
    "Writer",
    "payload_bytes",
]

# Data bytes per chunk. Measured on the 2-core CPU machine (docs/perf.md):
# 1-4 MiB chunks stream at the same rate; smaller ones pay per-message costs,
# larger ones overlap less and hold more memory per call.
CHUNK_BYTES = 4 << 20

# Field numbers, as in service.proto.
_C_REQUEST, _C_RESPONSE, _C_DATA, _C_END, _C_REGISTER = 1, 2, 3, 4, 5
_HEADERS = {"request": _C_REQUEST, "response": _C_RESPONSE, "register": _C_REGISTER}
_D_TENSOR, _D_OFFSET, _D_CRC, _D_DATA = 1, 2, 3, 4
_VARINT, _I32, _LEN = 0, 5, 2
_U32 = struct.Struct("<I")

# Where a bytes object's payload starts (CPython), for copying out of a received
# message without slicing it (a slice of bytes is a copy).
_BYTES_HEADER = bytes.__basicsize__ - 1
_CPYTHON = sys.implementation.name == "cpython"


def payload_bytes(stack: Sequence[Any]) -> int:
    """The tensor bytes of a stack (lists included): what decides the transport."""
    total = 0
    for v in stack:
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, (list, tuple)):
            total += payload_bytes(v)
    return total


# --------------------------------------------------------------------------- writing


class Writer:
    """The messages of one stream, for a stack: `header_stack`/`sizes` go into
    the header (built by the caller, who adds the key or the result's path), then
    `chunks()` and `end()`. Tensors stay referenced until the writer is dropped:
    chunks read their memory directly."""

    def __init__(self, stack: Sequence[Any], chunk_bytes: int = CHUNK_BYTES) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be at least 1")
        self.chunk_bytes = chunk_bytes
        self._memory: list[torch.Tensor] = []
        self.sizes: list[int] = []
        self.header_stack = [self._skeleton(v, f"stack[{i}]", 0) for i, v in enumerate(stack)]
        self.chunks_sent = 0
        self.bytes_sent = 0

    def _skeleton(self, value: Any, where: str, depth: int) -> _pb.values.Value:
        if isinstance(value, torch.Tensor):
            code, memory, order = codec._tensor_bytes_checked(value, where)
            self._memory.append(memory)
            self.sizes.append(memory.numel() * memory.element_size())
            return _pb.values.Value(
                tensor=_pb.values.Tensor.FromString(codec._tensor_prefix(code, memory, order))
            )
        if isinstance(value, (list, tuple)):
            if depth >= codec.MAX_DEPTH:
                raise InvalidStack(f"{where}: lists nest deeper than {codec.MAX_DEPTH} levels")
            items = [self._skeleton(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
            return _pb.values.Value(list_value=_pb.values.ValueList(items=items))
        return codec.value_to_proto(value, where)

    def chunks(self) -> Iterator[bytes]:
        """The data chunks, each one bytes object made from the tensor's memory."""
        for index, memory in enumerate(self._memory):
            yield from self.data_chunks(index, codec._memory_of(memory))

    def data_chunks(self, index: int, view: memoryview) -> Iterator[bytes]:
        """The chunks of one tensor's (or a streamed graph's constant's) bytes, counted
        towards the end's totals."""
        step = self.chunk_bytes
        for offset in range(0, len(view), step):
            piece = view[offset : offset + step]
            head = (
                codec._tag(_D_TENSOR, _VARINT)
                + codec._varint(index)
                + codec._tag(_D_OFFSET, _VARINT)
                + codec._varint(offset)
                + codec._tag(_D_CRC, _I32)
                + _U32.pack(crc32c.crc32c(piece))
                + codec._tag(_D_DATA, _LEN)
                + codec._varint(len(piece))
            )
            self.chunks_sent += 1
            self.bytes_sent += len(piece)
            yield b"".join((codec._tag(_C_DATA, _LEN), codec._varint(len(head) + len(piece)), head, piece))

    def end(self, timings: _pb.service.Timings | None = None) -> bytes:
        end = _pb.service.StreamEnd(chunks=self.chunks_sent, bytes=self.bytes_sent)
        if timings is not None:
            end.timings.CopyFrom(timings)
        return _pb.service.StackChunk(end=end).SerializeToString()


# --------------------------------------------------------------------------- reading


class Sink(Protocol):
    """Where one tensor's bytes land as chunks arrive."""

    def write(self, offset: int, source: int, nbytes: int) -> None:
        """Copies `nbytes` from address `source` to `offset` (the caller keeps the source alive)."""

    def result(self) -> Any:
        """The assembled bytes, once every chunk is written: a flat uint8 tensor
        (a stack's tensor), or a writable memoryview (BufferSink: a graph's constant)."""


class HostSink:
    """A tensor's bytes in host memory, allocated once, written in place.

    `own_pages`: the bytes get an anonymous mapping of their own instead of a
    heap block, so the pages go back to the OS the moment the last view of the
    tensor dies, in whichever thread drops it. For buffers past the server's
    keep-for-reuse budget: a heap block freed after the post-call malloc_trim
    has run (a chunk still being copied in when a client vanished) stayed
    resident for good, 0.5 GiB of a dead client's call in one run of six."""

    def __init__(self, nbytes: int, *, own_pages: bool = False, pool: PagePool | None = None) -> None:
        if pool is not None:  # `pool`: pages reused from an earlier buffer whose tensors died
            self._buf = pool.tensor(nbytes)
        elif own_pages and nbytes > 0:
            self._buf = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)
        else:
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        self._addr = self._buf.data_ptr()

    def write(self, offset: int, source: int, nbytes: int) -> None:
        # ctypes releases the GIL around the copy: the event loop keeps receiving.
        ctypes.memmove(self._addr + offset, source, nbytes)

    def result(self) -> torch.Tensor:
        return self._buf


# A streamed constant this large gets an anonymous mapping of its own (BufferSink):
# its pages go back to the OS when its kernel is unregistered, whatever the heap
# around it holds; smaller ones would cost a mapping each for little.
_OWN_PAGES_FROM = 1 << 20


class BufferSink:
    """A streamed graph's constant (RegisterStream): one writable buffer of the
    declared size, written in place as chunks arrive, whose memoryview the
    registered graph then keeps as the constant's data: the built module's tensor
    and the store's write alias it (server/intake.py), so the constant exists
    once, from its first chunk on."""

    def __init__(self, nbytes: int) -> None:
        buf: mmap.mmap | bytearray = mmap.mmap(-1, nbytes) if nbytes >= _OWN_PAGES_FROM else bytearray(nbytes)
        self._view = memoryview(buf)  # an export: the buffer can neither move nor be resized now
        self._addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))

    def write(self, offset: int, source: int, nbytes: int) -> None:
        ctypes.memmove(self._addr + offset, source, nbytes)  # the GIL is released around the copy

    def result(self) -> memoryview:
        return self._view


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a header, checked: what a budget check gets before allocation."""

    code: int
    shape: list[int]
    order: list[int]
    nbytes: int
    where: str


class _Slot:
    """Placeholder for a tensor inside the decoded header stack."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class Assembler:
    """Reads one stream of StackChunk messages (raw bytes, in order) into a stack.

    `expect` is "request", "response" or "register": which header this side
    accepts. For "register" the streamed values are the constants of the
    header's graph whose `sizes` are not 0 (their dtype and shape are the
    graph's to check, as for a unary Register), and `finish()` answers their data.
    `check(specs)` runs once the header is read and checked, before anything is
    allocated (the server's budgets). `sink(nbytes)` makes each tensor's destination."""

    def __init__(
        self,
        expect: str,
        sink: Callable[[int], Sink] = HostSink,
        check: Callable[[list[TensorSpec]], None] | None = None,
    ) -> None:
        self._expect = _HEADERS[expect]
        self._noun = "constant" if expect == "register" else "tensor"  # what a chunk's index names
        self._sink = sink
        self._check = check
        self.header: Any = None
        self.specs: list[TensorSpec] = []
        self._sinks: list[Sink | None] = []
        self._received: list[int] = []
        self._skeleton: list[Any] = []
        self.ended: _pb.service.StreamEnd | None = None
        self.chunks = 0
        self.bytes = 0
        self.declared = 0  # bytes the header declared, all tensors

    def feed(self, raw: bytes) -> None:
        """One StackChunk message, as received."""
        r = codec._Reader(raw)
        fields = list(r.fields(0, len(raw), "stream"))
        if len(fields) != 1:
            raise InvalidStack(f"stream: chunk {self.chunks}: a StackChunk holds exactly one of its kinds")
        kind, wt, a, b = fields[0]
        if wt != _LEN:
            raise InvalidStack(f"stream: chunk field {kind} has wire type {wt}")
        if self.ended is not None:
            raise InvalidStack("stream: a message after the end")
        if kind in (_C_REQUEST, _C_RESPONSE, _C_REGISTER):
            self._read_header(kind, raw)
        elif kind == _C_DATA:
            self._read_data(r, raw, a, b)
        elif kind == _C_END:
            self._read_end(raw)
        else:
            raise InvalidStack(f"stream: unknown chunk kind {kind}")

    # -- header

    def _read_header(self, kind: int, raw: bytes) -> None:
        if self.header is not None:
            raise InvalidStack("stream: a second header")
        if kind != self._expect:
            want = next(name for name, k in _HEADERS.items() if k == self._expect)
            raise InvalidStack(f"stream: expected a {want} header first")
        try:
            msg = _pb.service.StackChunk.FromString(raw)
        except Exception as e:  # protobuf's DecodeError and friends
            raise InvalidStack(f"stream: cannot parse the header: {e}") from None
        if kind == _C_REGISTER:
            header = msg.register
            skeleton = self._constants(header)
        else:
            header = msg.request if kind == _C_REQUEST else msg.response
            counter = [0]
            skeleton = [self._value(v, f"stack[{i}]", 0, counter) for i, v in enumerate(header.stack)]
            if len(header.sizes) != len(self.specs):
                raise InvalidStack(
                    f"stream header: {len(header.sizes)} sizes for {len(self.specs)} tensors (one size per tensor)"
                )
            for spec, declared in zip(self.specs, header.sizes):
                if declared != spec.nbytes:
                    raise InvalidStack(
                        f"stream header: {spec.where}: {dtypes.name_for(spec.code)} tensor of shape {spec.shape} "
                        f"needs {spec.nbytes} bytes, but its declared size is {declared}"
                    )
        self.declared = sum(s.nbytes for s in self.specs)
        if self._check is not None:
            self._check(self.specs)  # before any allocation
        self._sinks = [self._sink(s.nbytes) if s.nbytes else None for s in self.specs]
        self._received = [0] * len(self.specs)
        self._skeleton = skeleton
        self.header = header

    def _constants(self, header: Any) -> list[Any]:
        """A register header's constants as specs (their declared sizes: whether the
        bytes fit the dtype and shape is the graph's check, made where a unary
        Register's is, with the same error), and a slot for each streamed one,
        None for one whose data (if any) is in the header."""
        constants = header.request.graph.constants
        sizes = header.sizes
        if len(sizes) != len(constants):
            raise InvalidStack(
                f"stream header: {len(sizes)} sizes for {len(constants)} constants of the graph (one size per constant)"
            )
        for i, (c, declared) in enumerate(zip(constants, sizes)):
            where = f"graph.constants[{i}]"
            if declared and c.data:
                raise InvalidStack(
                    f"stream header: {where} carries data and a size of {declared}: a constant's data travels "
                    "in the header (size 0) or in data chunks, not both"
                )
            # Every constant has its spec, so that a chunk's index is the constant's; one of size 0 takes no chunk.
            self.specs.append(TensorSpec(c.dtype, list(c.shape), list(c.dim_order), declared, where))
        return [_Slot(i) if declared else None for i, declared in enumerate(sizes)]

    def _value(self, v: _pb.values.Value, where: str, depth: int, counter: list[int]) -> Any:
        counter[0] += 1
        if counter[0] > codec.MAX_VALUES:
            raise InvalidStack(f"stream header: {where}: a stack may hold at most {codec.MAX_VALUES} values")
        kind = v.WhichOneof("kind")
        if kind == "tensor":
            return self._tensor(v.tensor, where)
        if kind == "list_value":
            if depth >= codec.MAX_DEPTH:
                raise InvalidStack(f"stream header: {where}: lists nest deeper than {codec.MAX_DEPTH} levels")
            return [
                self._value(item, f"{where}[{i}]", depth + 1, counter)
                for i, item in enumerate(v.list_value.items)
            ]
        return codec.value_from_proto(v, where)

    def _tensor(self, t: _pb.values.Tensor, where: str) -> _Slot:
        if t.data:
            raise InvalidStack(
                f"stream header: {where}: tensor carries data; in a stream its bytes travel in data chunks"
            )
        code, shape, order = t.dtype, list(t.shape), list(t.dim_order)
        if dtypes.dtype_for(code) is None:
            raise InvalidStack(f"stream header: {where}: unknown dtype enum {code}")
        if len(shape) > codec.MAX_RANK:
            raise InvalidStack(f"stream header: {where}: rank over {codec.MAX_RANK}")
        if order and sorted(order) != list(range(len(shape))):
            raise InvalidStack(
                f"stream header: {where}: dim_order {order} is not a permutation of the {len(shape)} dims"
            )
        if any(d < 0 for d in shape):
            raise InvalidStack(f"stream header: {where}: shape {shape} has a negative dim")
        nbytes = math.prod(shape) * dtypes.itemsize_for(code)  # Python ints: never overflows
        self.specs.append(TensorSpec(code, shape, order, nbytes, where))
        return _Slot(len(self.specs) - 1)

    # -- data

    def _read_data(self, r: codec._Reader, raw: bytes, start: int, stop: int) -> None:
        n = self.chunks
        if self.header is None:
            raise InvalidStack(f"stream: data chunk {n} before the header")
        index = offset = 0
        crc: int | None = None
        data = (start, 0)
        for field, wt, a, b in r.fields(start, stop, f"stream: chunk {n}"):
            if field == _D_TENSOR and wt == _VARINT:
                index, _ = r.varint(a, b, "stream")
            elif field == _D_OFFSET and wt == _VARINT:
                offset, _ = r.varint(a, b, "stream")
            elif field == _D_CRC and wt == _I32:
                crc = _U32.unpack_from(raw, a)[0]
            elif field == _D_DATA and wt == _LEN:
                data = (a, b - a)
            elif field in (_D_TENSOR, _D_OFFSET, _D_CRC, _D_DATA):
                raise InvalidStack(f"stream: chunk {n}: field {field} has wire type {wt}")
        if index >= len(self.specs):
            raise InvalidStack(
                f"stream: chunk {n} is for {self._noun} {index}, but the header declares {len(self.specs)} {self._noun}s"
            )
        spec = self.specs[index]
        pos, size = data
        if offset != self._received[index]:
            raise InvalidStack(
                f"stream: chunk {n} ({spec.where}) starts at offset {offset}, expected {self._received[index]}: "
                "a tensor's chunks arrive in order, without gaps or overlaps"
            )
        if offset + size > spec.nbytes:
            raise InvalidStack(
                f"stream: chunk {n} ({spec.where}) runs to byte {offset + size}, past the tensor's "
                f"declared size of {spec.nbytes}"
            )
        if size == 0:
            raise InvalidStack(f"stream: chunk {n} ({spec.where}) carries no data")
        view = memoryview(raw)[pos : pos + size]
        computed = crc32c.crc32c(view)
        if crc is None or crc != computed:
            raise InvalidStack(
                f"stream: chunk {n} ({spec.where}, offset {offset}): CRC-32C "
                f"{'missing' if crc is None else f'{crc:08x}'} does not match the data's {computed:08x}: "
                "the chunk was corrupted"
            )
        sink = self._sinks[index]
        assert sink is not None  # a tensor of 0 bytes took no chunk above
        if _CPYTHON:
            sink.write(offset, id(raw) + _BYTES_HEADER + pos, size)
        else:  # pragma: no cover - elsewhere a slice's own buffer
            held = ctypes.create_string_buffer(bytes(view), size)
            sink.write(offset, ctypes.addressof(held), size)
        self._received[index] = offset + size
        self.chunks += 1
        self.bytes += size

    # -- end

    def _read_end(self, raw: bytes) -> None:
        if self.header is None:
            raise InvalidStack("stream: the end before the header")
        try:
            end = _pb.service.StackChunk.FromString(raw).end
        except Exception as e:  # protobuf's DecodeError and friends
            raise InvalidStack(f"stream: cannot parse the end: {e}") from None
        if end.chunks != self.chunks or end.bytes != self.bytes:
            raise InvalidStack(
                f"stream: the end says {end.chunks} chunks and {end.bytes} bytes were sent, "
                f"but {self.chunks} chunks and {self.bytes} bytes arrived"
            )
        self._missing("the end arrived")
        self.ended = end

    def _missing(self, when: str) -> None:
        for spec, got in zip(self.specs, self._received):
            if got != spec.nbytes:
                raise InvalidStack(
                    f"stream: {when} with {spec.where} incomplete: {got} of its {spec.nbytes} bytes received"
                )

    def finish(self) -> list[Any]:
        """The assembled stack, once the stream is over (raises if it stopped short).
        For a register header: per constant of its graph, the streamed data (the
        sink's result), or None for a constant whose data is the header's."""
        if self.header is None:
            raise InvalidStack("stream: ended before its header")
        if self.ended is None:
            self._missing("the stream stopped before its end")
            raise InvalidStack("stream: the stream stopped before its end message (truncated)")
        if self._expect == _C_REGISTER:
            return [None if v is None else self._sinks[v.index].result() for v in self._skeleton]  # type: ignore[union-attr]
        return [self._fill(v) for v in self._skeleton]

    def _fill(self, v: Any) -> Any:
        if isinstance(v, _Slot):
            spec = self.specs[v.index]
            sink = self._sinks[v.index]
            buf = sink.result() if sink is not None else None
            return codec._make_tensor(
                spec.code,
                spec.shape,
                spec.order,
                spec.nbytes,
                spec.where,
                lambda dt, n, memory_shape: buf.view(dt).view(memory_shape),  # type: ignore[union-attr]
            )
        if isinstance(v, list):
            return [self._fill(x) for x in v]
        return v

    def release(self) -> None:
        """Drops every destination (a call that failed or was cancelled)."""
        self._sinks = []
        self._skeleton = []
