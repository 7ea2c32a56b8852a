"""Hand-made graphs for tests: one allowlisted op, its tensors as inputs, everything else literal.

What a hostile client sends: no capture, no conditions, arguments of its
choosing. Tensors become graph inputs (every dim -1, so the stack carries
them), everything else is written into the node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fuseport.wire import _pb, dtypes

_MEMORY_FORMATS = {
    torch.contiguous_format: _pb.graph.MEMORY_FORMAT_CONTIGUOUS,
    torch.preserve_format: _pb.graph.MEMORY_FORMAT_PRESERVE,
    torch.channels_last: _pb.graph.MEMORY_FORMAT_CHANNELS_LAST,
    torch.channels_last_3d: _pb.graph.MEMORY_FORMAT_CHANNELS_LAST_3D,
}


def one_op(op: str, args: Sequence[Any], kwargs: dict[str, Any] | None = None, outputs: int = 1) -> tuple[_pb.graph.Graph, list[torch.Tensor]]:
    """A graph of one node and the stack to run it with.

    `outputs` > 1: the op returns a tuple (or list) of that many values, all returned."""
    graph = _pb.graph.Graph()
    stack: list[torch.Tensor] = []

    def arg(value: Any) -> _pb.graph.Argument:
        if isinstance(value, torch.Tensor):
            name = f"t{len(stack)}"
            code = dtypes.code_for(value.dtype)
            assert code is not None, value.dtype
            graph.inputs.add(name=name, kind=_pb.graph.INPUT_KIND_TENSOR, dtype=code, shape=[-1] * value.dim())
            stack.append(value)
            return _pb.graph.Argument(ref=name)
        if value is None:
            return _pb.graph.Argument(none_value=_pb.values.NoneValue())
        if isinstance(value, bool):
            return _pb.graph.Argument(bool_value=value)
        if isinstance(value, int):
            return _pb.graph.Argument(int_value=value)
        if isinstance(value, float):
            return _pb.graph.Argument(float_value=value)
        if isinstance(value, str):
            return _pb.graph.Argument(string_value=value)
        if isinstance(value, (list, tuple)):
            return _pb.graph.Argument(list_value=_pb.graph.ArgumentList(items=[arg(v) for v in value]))
        if isinstance(value, torch.dtype):
            return _pb.graph.Argument(dtype=dtypes.code_for(value))
        if isinstance(value, torch.device):
            return _pb.graph.Argument(device=_pb.graph.Device(type=value.type, index=-1))
        if isinstance(value, torch.memory_format):
            return _pb.graph.Argument(memory_format=_MEMORY_FORMATS[value])
        if isinstance(value, torch.layout):
            return _pb.graph.Argument(layout=_pb.graph.LAYOUT_STRIDED)
        raise TypeError(f"cannot write {type(value).__name__} into a graph")

    node = graph.nodes.add(op=op)
    for a in args:
        node.args.append(arg(a))
    for name in sorted(kwargs or {}):
        node.kwargs.add(name=name).value.CopyFrom(arg((kwargs or {})[name]))
    names = [f"r{k}" for k in range(outputs)]
    node.outputs.extend(names)
    graph.outputs.extend(_pb.graph.Argument(ref=n) for n in names)
    return graph, stack
