"""Register's intake of a graph: its key, size and stored bytes without copying its constants, and a plan on meta.

Why: with upb, every whole-message step copies every constant. `key_for` copies
the message (canonicalize's CopyFrom) and serialises it, `ByteSize` serialises
it, storing it serialises it again, and each read of a bytes field makes a new
bytes object. A graph that is mostly constants cost Register about 6 times its
bytes at the peak (issue 20). Here a graph is a skeleton (inputs, nodes,
outputs, conditions: small) and its constants' data, each read once (`datas`):
the key is SHA-256 over the canonical serialisation made piece by piece, the
store writes the graph's serialisation piece by piece, the data as views, and
the built module's constants alias the same bytes. The pieces are exactly the
bytes protobuf writes: a message's fields in field-number order, a repeated
message field as tag, length, body per element (the test pins both against
`SerializeToString(deterministic=True)` and `key_for`). A graph that carries
fields this server does not know (unknown fields) takes the old, copying way,
so that its key is still computed over everything it carries.

Register's servicer goes further: codec.decode_register_request parses the
request without the constants' data and hands `datas` as views of the request's
own bytes (Intake.of(graph, datas)), so not even the one read copies them; what
is left of Register's peak is gRPC's receive of the message (docs/perf.md).

Then the graph is planned on meta tensors at a few example sizes, once, and
refused when it can only fail: an error at every size tried (``full([-5])``,
``full([2**62])``, a string where a tensor goes) is INVALID_ARGUMENT, a tensor
or a result larger than the device at every size tried where it runs at all
(``full([2**40])``, a 2**42-element expand returned) is RESOURCE_EXHAUSTED. A graph whose conditions no example size meets, or whose
sizes depend on data, is accepted as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from google.protobuf import unknown_fields

from fuseport.wire import _pb
from fuseport.wire.codec import Buffer
from fuseport.wire.errors import InvalidGraph, ResourceExhausted
from fuseport.wire.graph import Signature
from fuseport.wire.keys import KEY_DOMAIN, canonicalize, key_for

__all__ = ["EXAMPLE_SIZES", "Intake", "example_args", "refuse_if_only_fails", "serialized"]

# Graph and Tensor field numbers (proto/fuseport/v1/graph.proto, values.proto).
_GRAPH_CONSTANTS = 2
_TENSOR_DATA = 4
# Sizes at which a graph is planned: a dim that follows the inputs takes each in turn.
# 1 too: a dim that only broadcasts (an expand of it) runs at 1 and nowhere else; and
# large ones, for a graph that needs long inputs (a window of 100 over them). Only a
# graph that fails at the first sizes is planned at the later ones.
EXAMPLE_SIZES = (1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 65, 1024, 65536)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_prefix(field: int, length: int) -> bytes:
    return _varint(field << 3 | 2) + _varint(length)


def _has_unknown(message: Any) -> bool:
    return len(unknown_fields.UnknownFieldSet(message)) > 0


@dataclass
class Intake:
    """A graph taken in by Register: its constants' data read once, its key and canonical size."""

    graph: _pb.graph.Graph
    datas: Sequence[Buffer] | None  # None: the copying way (unknown fields)
    key: int
    size: int  # bytes of its serialisation, as ByteSize says (what --max-graph-bytes bounds and the store holds)

    @classmethod
    def of(cls, graph: _pb.graph.Graph, datas: Sequence[Buffer] | None = None) -> Intake:
        """`datas`: the constants' data when `graph` carries none (decoded without it,
        known to carry no unknown fields: codec.decode_register_request); None: read here."""
        if datas is None:
            if _has_unknown(graph) or any(_has_unknown(c) for c in graph.constants):
                return cls(graph, None, key_for(graph), graph.ByteSize())
            datas = [c.data for c in graph.constants]  # the one copy of each
        digest = hashlib.sha256(KEY_DOMAIN)
        for piece in _pieces(graph, datas, canonical=True):
            digest.update(piece)
        size = sum(len(piece) for piece in _pieces(graph, datas, canonical=False))
        return cls(graph, datas, int.from_bytes(digest.digest()[:8], "little", signed=True), size)

    def serialized(self) -> Iterator[bytes | memoryview]:
        """The graph's own serialisation (names and alignment as sent), in pieces."""
        return serialized(self.graph, self.datas)

    def skeleton(self) -> _pb.graph.Graph:
        """The graph with its constants' data left out (their dtype, shape and layout
        stay): what a Variant keeps beside `datas`, so that the message's own copy
        of the constants goes once Register is done. The graph itself without `datas`."""
        if self.datas is None:
            return self.graph
        g = self.graph
        out = _pb.graph.Graph(inputs=g.inputs, nodes=g.nodes, outputs=g.outputs, conditions=g.conditions)
        for c in g.constants:
            out.constants.add(dtype=c.dtype, shape=c.shape, alignment=c.alignment, dim_order=c.dim_order)
        return out


def serialized(graph: _pb.graph.Graph, datas: Sequence[Buffer] | None) -> Iterator[bytes | memoryview]:
    """The serialisation of `graph` whose constants' data are `datas` (None: in the
    graph itself), in pieces: a skeleton and the data it left out make the whole graph."""
    if datas is None:
        yield graph.SerializeToString(deterministic=True)
    else:
        yield from _pieces(graph, datas, canonical=False)


def _pieces(
    graph: _pb.graph.Graph, datas: Sequence[Buffer], *, canonical: bool
) -> Iterator[bytes | memoryview]:
    skeleton = _pb.graph.Graph(inputs=graph.inputs, nodes=graph.nodes, outputs=graph.outputs,
                               conditions=graph.conditions)  # fmt: skip
    if canonical:
        skeleton = canonicalize(skeleton)
    yield _pb.graph.Graph(inputs=skeleton.inputs).SerializeToString(deterministic=True)
    for c, data in zip(graph.constants, datas):
        # A constant's fields: dtype 1, shape 2, alignment 3 (cleared in the canonical form), data 4, dim_order 5.
        head = _pb.values.Tensor(dtype=c.dtype, shape=c.shape, alignment=b"" if canonical else c.alignment)
        head_bytes = head.SerializeToString(deterministic=True)
        data_prefix = _length_prefix(_TENSOR_DATA, len(data)) if data else b""
        tail = _pb.values.Tensor(dim_order=c.dim_order).SerializeToString(deterministic=True)
        body = len(head_bytes) + len(data_prefix) + len(data) + len(tail)
        yield _length_prefix(_GRAPH_CONSTANTS, body) + head_bytes + data_prefix
        if data:
            yield memoryview(data)
        yield tail
    rest = _pb.graph.Graph(nodes=skeleton.nodes, outputs=skeleton.outputs, conditions=skeleton.conditions)
    yield rest.SerializeToString(deterministic=True)


def example_args(sig: Signature, size: int) -> list[Any] | None:
    """Meta inputs for `sig` with every dim that follows the inputs (and every
    int input) at `size`; None when its conditions refuse them."""
    args: list[Any] = []
    for d in sig.inputs:
        if d.kind == "tensor":
            assert d.dtype is not None and d.shape is not None
            shape = [size if s < 0 else s for s in d.shape]
            try:
                args.append(torch.empty(shape, dtype=d.dtype, device="meta"))
            except RuntimeError:  # more elements than a tensor may have (65536 ** 4): no such inputs
                return None
        elif d.static:
            args.append(d.static_value)
        else:
            args.append({"int": size, "float": 1.0, "bool": False}[d.kind])
    return args if all(c.holds(args) for c in sig.conditions) else None


def refuse_if_only_fails(planner: Any, sig: Signature, capacity: int, device: torch.device) -> None:
    """Plans the graph at the example sizes until one plan could run; raises when none could.

    One plan is enough to accept (the first usually is): Register then costs one
    meta run of the graph, and one per example size only for a graph that fails."""
    failures: list[tuple[int, str, int]] = []  # (size, why, bytes: 0 for an error)
    for size in EXAMPLE_SIZES:
        args = example_args(sig, size)
        if args is None:
            continue
        plan = planner.plan(args)
        if plan.error is not None:
            failures.append((size, plan.error, 0))
        elif plan.overflow:
            over = plan.largest_bytes
            failures.append((size, f"{plan.overflow}: over {over - 1} bytes", over))
        elif plan.largest_bytes > capacity:
            failures.append((size, f"{plan.largest_what} is {plan.largest_bytes} bytes", plan.largest_bytes))
        elif (plan.output_bytes or 0) > capacity:
            # A view costs nothing to make, but a result is copied out (or kept) whole.
            failures.append((size, f"its results are {plan.output_bytes} bytes", plan.output_bytes or 0))
        else:
            return
    if not failures:
        return  # no example size meets its conditions: nothing to tell
    sizes = ", ".join(str(s) for s, _, _ in failures)
    # Too large wherever it runs: that is what is wrong (elsewhere it fails for the sizes
    # alone). Otherwise the smallest size's error says it.
    size, why, nbytes = next((f for f in failures if f[2]), failures[0])
    if nbytes:
        raise ResourceExhausted(
            f"the graph needs more memory than {device} has ({capacity} bytes) at every example size where "
            f"it runs, and fails at the others ({sizes}), planned on meta tensors; at size {size}: {why}"
        )
    raise InvalidGraph(
        f"the graph fails whatever its inputs: planned on meta tensors at every example size ({sizes}), "
        f"it fails; at size {size}: {why}"
    )
