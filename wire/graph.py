"""The server side of the graph IR: validate a Graph message and rebuild it as an FX GraphModule.

`build_module` trusts nothing in the message: every op goes through
`ops.resolve` (the allowlist), every ref must name a value defined earlier,
every constant is decoded by the codec's checks, argument counts and keyword
names are checked against the op's schema, and device arguments are replaced
by the executing device. Errors are InvalidGraph (OpNotAllowed for an op
outside the allowlist) and name the position: ``nodes[3] (aten::mm.default):
...``.

The module's forward takes the graph inputs positionally, in `Graph.inputs`
order (static scalar inputs included: the caller checks their value), and
always returns a tuple.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx

from fuseport.wire import _pb, dtypes, ops
from fuseport.wire.codec import MAX_DEPTH, MAX_RANK, Buffer, tensor_from_bytes, tensor_from_proto
from fuseport.wire.errors import FuseportError, InvalidGraph, OpNotAllowed
from fuseport.wire.sizes import Condition, compile_conditions

__all__ = [
    "InputSpec",
    "Kind",
    "Signature",
    "build_module",
    "graph_summary",
    "signature_of",
]

logger = logging.getLogger(__name__)

Kind = Literal["tensor", "int", "float", "bool"]

_KIND_NAMES: dict[int, Kind] = {
    _pb.graph.INPUT_KIND_TENSOR: "tensor",
    _pb.graph.INPUT_KIND_INT: "int",
    _pb.graph.INPUT_KIND_FLOAT: "float",
    _pb.graph.INPUT_KIND_BOOL: "bool",
}
# Which Argument field a static scalar's value must use.
_STATIC_FIELD: dict[Kind, str] = {"int": "int_value", "float": "float_value", "bool": "bool_value"}

_MEMORY_FORMATS: dict[int, torch.memory_format] = {
    _pb.graph.MEMORY_FORMAT_CONTIGUOUS: torch.contiguous_format,
    _pb.graph.MEMORY_FORMAT_PRESERVE: torch.preserve_format,
    _pb.graph.MEMORY_FORMAT_CHANNELS_LAST: torch.channels_last,
    _pb.graph.MEMORY_FORMAT_CHANNELS_LAST_3D: torch.channels_last_3d,
}
_LAYOUTS: dict[int, torch.layout] = {_pb.graph.LAYOUT_STRIDED: torch.strided}

# Schema return types of Python numbers: the values sym:: arithmetic may take
# (never tensors, which would make operator.add an unlisted tensor op).
# "number" is what aten::_local_scalar_dense (Tensor.item()) returns.
_NUMBER_TYPES = frozenset({"int", "SymInt", "float", "SymFloat", "number", "Scalar"})

# Client strings end up in error messages; keep those readable.
_MAX_SHOWN = 100


def _show(name: str) -> str:
    return repr(name if len(name) <= _MAX_SHOWN else name[:_MAX_SHOWN] + "...")


@dataclass(frozen=True)
class InputSpec:
    """One graph input as the server checks it.

    `dtype` and `shape` are set for tensors only; -1 in `shape` matches any
    size. `static_value` is set exactly when `static` is: the only value the
    graph accepts for that scalar.
    """

    name: str
    kind: Kind
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] | None = None
    static: bool = False
    static_value: int | float | bool | None = None


@dataclass(frozen=True)
class Signature:
    """What a graph consumes from the stack (`inputs`, in order), how many values
    it pushes, and the size conditions a stack must meet (Graph.conditions)."""

    inputs: tuple[InputSpec, ...]
    num_outputs: int
    conditions: tuple[Condition, ...] = ()


def signature_of(graph: _pb.graph.Graph) -> Signature:
    """The signature of a graph; raises InvalidGraph for malformed inputs or conditions."""
    if not graph.outputs:
        raise InvalidGraph("the graph has no outputs: there is nothing to run")
    return Signature(
        inputs=_input_specs(graph), num_outputs=len(graph.outputs), conditions=compile_conditions(graph)
    )


def graph_summary(graph: _pb.graph.Graph) -> list[str]:
    """The distinct op names a graph uses, sorted."""
    return sorted({node.op for node in graph.nodes})


def _input_specs(graph: _pb.graph.Graph) -> tuple[InputSpec, ...]:
    specs: list[InputSpec] = []
    seen: set[str] = set()
    for i, inp in enumerate(graph.inputs):
        where = f"inputs[{i}]"
        if not inp.name:
            raise InvalidGraph(f"{where}: empty name")
        if inp.name in seen:
            raise InvalidGraph(f"{where}: name {_show(inp.name)} is used twice")
        seen.add(inp.name)
        where = f"inputs[{i}] {_show(inp.name)}"
        kind = _KIND_NAMES.get(inp.kind)
        if kind is None:
            raise InvalidGraph(f"{where}: unknown input kind {inp.kind}")
        has_value = inp.HasField("static_value")
        if kind == "tensor":
            dtype = dtypes.dtype_for(inp.dtype)
            if dtype is None:
                raise InvalidGraph(f"{where}: unknown dtype ({dtypes.name_for(inp.dtype)})")
            if len(inp.shape) > MAX_RANK:
                raise InvalidGraph(f"{where}: rank over {MAX_RANK}")
            if any(d < -1 for d in inp.shape):
                raise InvalidGraph(f"{where}: shape {list(inp.shape)} has a dim below -1")
            if inp.static or has_value:
                raise InvalidGraph(f"{where}: a tensor input cannot be static")
            specs.append(InputSpec(inp.name, kind, dtype=dtype, shape=tuple(inp.shape)))
            continue
        if inp.dtype or len(inp.shape):
            raise InvalidGraph(f"{where}: a {kind} input has no dtype or shape")
        if not inp.static:
            if has_value:
                raise InvalidGraph(f"{where}: static_value given but static is false")
            specs.append(InputSpec(inp.name, kind))
            continue
        field = _STATIC_FIELD[kind]
        if not has_value or inp.static_value.WhichOneof("kind") != field:
            raise InvalidGraph(f"{where}: a static {kind} input needs a static_value of {field}")
        value = getattr(inp.static_value, field)
        specs.append(InputSpec(inp.name, kind, static=True, static_value=value))
    return tuple(specs)


class _Builder:
    """Turns one Graph message into an FX graph, checking as it goes."""

    def __init__(
        self, graph: _pb.graph.Graph, device: torch.device, datas: Sequence[Buffer] | None = None
    ) -> None:
        self.msg = graph
        self.datas = datas
        self.device = device
        self.fx = torch.fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[str, torch.fx.Node] = {}
        self.is_number: dict[str, bool] = {}  # which values sym:: arithmetic may take
        self.constants: dict[int, torch.fx.Node] = {}

    def build(self) -> torch.fx.GraphModule:
        specs = _input_specs(self.msg)
        for i, spec in enumerate(specs):
            # Placeholder names become the forward's parameter names, so they
            # must be identifiers; the client's names stay in error messages.
            self.env[spec.name] = self.fx.placeholder(f"i{i}")
            self.is_number[spec.name] = spec.kind in ("int", "float")
        for i, msg in enumerate(self.msg.constants):
            where = f"constants[{i}]"
            try:
                if self.datas is None:
                    t = tensor_from_proto(msg, where)
                else:  # read once already (the server's Register): aliased, not copied again
                    t = tensor_from_bytes(
                        msg.dtype, list(msg.shape), self.datas[i], where, list(msg.dim_order)
                    )
            except FuseportError as e:
                raise InvalidGraph(str(e)) from None
            self.root.register_buffer(f"c{i}", t.to(self.device), persistent=False)
        for n, node in enumerate(self.msg.nodes):
            self._node(n, node)
        outputs = tuple(self._value(a, f"outputs[{j}]", 0) for j, a in enumerate(self.msg.outputs))
        self.fx.output(outputs)
        self.fx.lint()
        return torch.fx.GraphModule(self.root, self.fx, class_name="FuseportGraph")

    def _node(self, n: int, node: _pb.graph.Node) -> None:
        where = f"nodes[{n}] ({_show(node.op)})"
        try:
            target = ops.resolve(node.op)
        except OpNotAllowed as e:
            raise OpNotAllowed(f"nodes[{n}]: {e}") from None
        except InvalidGraph as e:
            raise InvalidGraph(f"nodes[{n}]: {e}") from None
        args = tuple(self._value(a, f"{where} args[{j}]", 0) for j, a in enumerate(node.args))
        kwargs: dict[str, Any] = {}
        for kw in node.kwargs:
            if kw.name in kwargs:
                raise InvalidGraph(f"{where}: keyword argument {_show(kw.name)} given twice")
            kwargs[kw.name] = self._value(kw.value, f"{where} kwarg {_show(kw.name)}", 0)

        if isinstance(target, torch._ops.OpOverload):
            returns = _check_call(target, node, where)
        else:
            self._check_sym(node, where)
            returns = ["int"]

        call = self.fx.call_function(target, args, kwargs)
        if node.op in _UNINITIALISED:
            # Uninitialised memory may hold another request's data: a graph that
            # returns it would leak that to this client. Zeros are a valid
            # "uninitialised" value, and Inductor folds the fill into its consumer.
            call = self.fx.call_function(torch.ops.aten.zero.default, (call,))
        names = list(node.outputs)
        if len(returns) == 1 and returns[0] != "list":
            if len(names) != 1:
                raise InvalidGraph(f"{where}: the op has one result, but {len(names)} names are given")
            self._define(names[0], call, returns[0] in _NUMBER_TYPES, where)
            return
        if returns == ["list"]:
            if not names:
                raise InvalidGraph(f"{where}: no names given for the op's results")
        elif len(names) != len(returns):
            raise InvalidGraph(
                f"{where}: the op has {len(returns)} results, but {len(names)} names are given"
            )
        for k, name in enumerate(names):
            if name:
                item = self.fx.call_function(operator.getitem, (call, k))
                is_number = returns != ["list"] and returns[k] in _NUMBER_TYPES
                self._define(name, item, is_number, where)

    def _check_sym(self, node: _pb.graph.Node, where: str) -> None:
        arity = 1 if node.op == "sym::neg" else 2
        if len(node.args) != arity or len(node.kwargs):
            raise InvalidGraph(f"{where}: takes {arity} positional argument(s)")
        for j, arg in enumerate(node.args):
            kind = arg.WhichOneof("kind")
            if kind == "ref" and self.is_number.get(arg.ref, False):
                continue
            if kind not in ("int_value", "float_value"):
                raise InvalidGraph(f"{where} args[{j}]: size arithmetic takes numbers, not tensors")

    def _define(self, name: str, value: torch.fx.Node, is_number: bool, where: str) -> None:
        if not name:
            return  # an unused result
        if name in self.env:
            raise InvalidGraph(f"{where}: value {_show(name)} is defined twice")
        self.env[name] = value
        self.is_number[name] = is_number

    def _value(self, arg: _pb.graph.Argument, where: str, depth: int) -> Any:
        kind = arg.WhichOneof("kind")
        if kind == "ref":
            if arg.ref not in self.env:
                raise InvalidGraph(f"{where}: ref to undefined value {_show(arg.ref)}")
            return self.env[arg.ref]
        if kind == "constant":
            return self._constant(arg.constant, where)
        if kind in ("int_value", "float_value", "bool_value", "string_value"):
            return getattr(arg, kind)
        if kind == "none_value":
            return None
        if kind == "list_value":
            if depth >= MAX_DEPTH:
                raise InvalidGraph(f"{where}: lists nested over {MAX_DEPTH} deep")
            return [
                self._value(item, f"{where}[{j}]", depth + 1)
                for j, item in enumerate(arg.list_value.items)
            ]
        if kind == "dtype":
            dtype = dtypes.dtype_for(arg.dtype)
            if dtype is None:
                raise InvalidGraph(f"{where}: unknown dtype ({dtypes.name_for(arg.dtype)})")
            return dtype
        if kind == "device":
            return self.device
        if kind == "memory_format":
            if arg.memory_format not in _MEMORY_FORMATS:
                raise InvalidGraph(f"{where}: unknown memory format {arg.memory_format}")
            return _MEMORY_FORMATS[arg.memory_format]
        if kind == "layout":
            if arg.layout not in _LAYOUTS:
                raise InvalidGraph(f"{where}: unknown layout {arg.layout}")
            return _LAYOUTS[arg.layout]
        raise InvalidGraph(f"{where}: empty argument")

    def _constant(self, index: int, where: str) -> torch.fx.Node:
        if index >= len(self.msg.constants):
            raise InvalidGraph(
                f"{where}: constant {index} does not exist ({len(self.msg.constants)} constants)"
            )
        if index not in self.constants:
            self.constants[index] = self.fx.get_attr(f"c{index}")
        return self.constants[index]


def _check_call(op: torch._ops.OpOverload, node: _pb.graph.Node, where: str) -> list[str]:
    """Checks argument count and keyword names against the schema; returns the result types.

    Each result type is its schema type as a string, or "list" for an op
    returning one list (whose length only shows at run time).
    """
    schema = op._schema
    positional = [a for a in schema.arguments if not a.kwarg_only]
    if len(node.args) > len(positional):
        raise InvalidGraph(
            f"{where}: {len(node.args)} positional arguments given, the op takes {len(positional)}"
        )
    given = {a.name for a in positional[: len(node.args)]}
    names = {a.name for a in schema.arguments}
    for kw in node.kwargs:
        if kw.name not in names:
            raise InvalidGraph(f"{where}: the op has no argument {_show(kw.name)}")
        if kw.name in given:
            raise InvalidGraph(f"{where}: argument {_show(kw.name)} given twice")
        given.add(kw.name)
    for a in schema.arguments:
        if a.name not in given and not a.has_default_value():
            raise InvalidGraph(f"{where}: argument {a.name!r} is missing")
    returns = list(schema.returns)
    if len(returns) == 1 and isinstance(returns[0].type, torch.ListType):
        return ["list"]
    return [str(r.type) for r in returns]


# Allowlisted ops that allocate without initialising (see _Builder._node).
_UNINITIALISED = frozenset({"aten::empty.memory_format", "aten::empty_strided.default"})


def build_module(
    graph: _pb.graph.Graph, device: torch.device, datas: Sequence[Buffer] | None = None
) -> torch.fx.GraphModule:
    """Validates a graph and rebuilds it as a GraphModule whose constants live on `device`.

    `datas`: the constants' data, read from the message by the caller (each a
    bytes object only it holds, or a writable view): the constants alias them instead of reading
    the message again. Raises InvalidGraph (or OpNotAllowed) naming the position
    of the problem.
    """
    module = _Builder(graph, torch.device(device), datas).build()
    logger.debug(
        "built a graph of %d nodes and %d constants for %s",
        len(graph.nodes),
        len(graph.constants),
        device,
    )
    return module
