"""Capture: a Python function or nn.Module plus example inputs -> a Graph message of core ATen ops.

How a capture runs:

1. The function (or module) is traced with ``torch.export.export``, every dim
   of every tensor input marked ``Dim.AUTO`` (sizes that export cannot keep
   symbolic are specialised and show up as fixed sizes in the input's shape
   pattern). ``run_decompositions()`` lowers the program to core ATen, and
   ops it keeps whole that are outside the allowlist are decomposed further
   where torch has a decomposition. If the trace or the conversion below
   fails (float arithmetic on symbolic sizes, say), it all runs again with
   static shapes.
2. Parameters, buffers and lifted tensor constants become `Graph.constants`;
   user inputs become `GraphInput`s: tensors with dtype and shape pattern (a
   symbolic dim is -1, a specialised one its size), Python int/float/bool
   become INPUT_KIND_INT/FLOAT/BOOL.
3. Nodes whose results nothing uses are dropped; that removes export's
   assertions (``aten::_assert_scalar``, ``aten::_assert_tensor_metadata``,
   ``sym_constrain_range*``), which would pin devices and dtypes: the server
   checks inputs itself. The size conditions they held (a dim at least 2,
   two dims equal) are lost with them: GraphInput has no field for them. ``operator.getitem`` on an op's tuple or list result
   is folded into that node's `outputs` (one name per element, "" for
   unused ones); Python arithmetic on sizes becomes ``sym::add`` etc.

Scalar inputs. torch.export bakes Python numbers into the graph: ``x * alpha``
traced with ``alpha=0.5`` becomes ``mul(x, 0.5)``. To keep a scalar an input,
the function is traced once more per int/float input, with that input changed
(a float v becomes ``v * 1.37 + 0.61``, an int n becomes ``n + 1``). If both
graphs have the same structure and differ only in constants that are exactly
the example value in the first graph and the changed value in the second, at
the same positions, those positions become refs to the input. Otherwise (the
second trace fails, the structure changes, or a constant changes in another
way, e.g. ``2 * alpha`` was folded) the input is marked ``static`` with its
example value as ``static_value``, and the server accepts only that value.
Bool inputs are always static. One changed value cannot see everything: a
branch on the scalar that both values take the same way (``if alpha > 0``) is
baked in silently.

Errors: anything that cannot be captured raises CaptureError naming the
problem, except an op outside the allowlist, which raises OpNotAllowed naming
the op (the error the server would give for the same graph).
"""

from __future__ import annotations

import inspect
import logging
import math
import operator
import threading
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
import torch.fx
from torch._decomp import decomposition_table
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from fuseport.wire import _pb, dtypes, keys, ops
from fuseport.wire.codec import tensor_to_proto
from fuseport.wire.errors import CaptureError, FuseportError, OpNotAllowed

__all__ = ["capture"]

logger = logging.getLogger(__name__)

Capturable = Union[Callable[..., Any], torch.nn.Module]  # noqa: UP007

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_DECOMPOSE_ROUNDS = 3

# Python functions export emits for arithmetic on sizes, and their wire names.
_SYM_NAMES: dict[Callable[..., Any], str] = {
    operator.add: "sym::add",
    operator.sub: "sym::sub",
    operator.mul: "sym::mul",
    operator.floordiv: "sym::floordiv",
    operator.mod: "sym::mod",
    operator.neg: "sym::neg",
    torch.sym_max: "sym::max",
    torch.sym_min: "sym::min",
}

_MEMORY_FORMATS: dict[torch.memory_format, int] = {
    torch.contiguous_format: _pb.graph.MEMORY_FORMAT_CONTIGUOUS,
    torch.preserve_format: _pb.graph.MEMORY_FORMAT_PRESERVE,
    torch.channels_last: _pb.graph.MEMORY_FORMAT_CHANNELS_LAST,
    torch.channels_last_3d: _pb.graph.MEMORY_FORMAT_CHANNELS_LAST_3D,
}

_KIND_OF: dict[type, int] = {
    bool: _pb.graph.INPUT_KIND_BOOL,
    int: _pb.graph.INPUT_KIND_INT,
    float: _pb.graph.INPUT_KIND_FLOAT,
}
_VALUE_FIELD: dict[int, str] = {
    _pb.graph.INPUT_KIND_BOOL: "bool_value",
    _pb.graph.INPUT_KIND_INT: "int_value",
    _pb.graph.INPUT_KIND_FLOAT: "float_value",
}

# A position of an Argument in a graph: ("arg", node, index, *list indices),
# ("kw", node, index, *list indices) or ("out", index, *list indices).
_Path = tuple[Any, ...]


class _Wrapper(torch.nn.Module):
    """Gives export a module to trace, with positional inputs only."""

    def __init__(self, inner: Capturable) -> None:
        super().__init__()
        # A module is registered as a submodule, so its weights are lifted.
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        return self.inner(*args)


# torch.export is not thread-safe (concurrent traces fail with "... is not
# tracked with proxy"), so captures take turns.
_EXPORT_LOCK = threading.Lock()


def capture(fn: Capturable, example_inputs: Sequence[Any]) -> _pb.graph.Graph:
    """Traces `fn` on `example_inputs` (tensors, ints, floats, bools) into a Graph message.

    Raises CaptureError naming the problem, or OpNotAllowed naming an op
    outside the allowlist. Safe to call from several threads (they take turns).
    """
    with _EXPORT_LOCK:
        return _capture(fn, example_inputs)


def _capture(fn: Capturable, example_inputs: Sequence[Any]) -> _pb.graph.Graph:
    inputs = list(example_inputs)
    kinds = [_kind_of(v, i) for i, v in enumerate(inputs)]
    names = _preferred_names(fn, len(inputs))
    module = _Wrapper(fn)

    try:
        graph = _convert(_export(module, inputs, dynamic=True), kinds, names)
        dynamic = True
    except Exception as first:  # export raises many types; any failure means "try static"
        # Static shapes also avoid what only symbolic sizes bring (float
        # arithmetic on sizes, for one), so conversion failures retry too.
        logger.info("dynamic-shape capture failed (%s); trying static shapes", _brief(first))
        try:
            ep = _export(module, inputs, dynamic=False)
        except Exception as e:
            raise CaptureError(f"torch.export cannot trace the function: {_brief(e)}") from e
        graph = _convert(ep, kinds, names)
        dynamic = False

    claims: dict[_Path, list[int]] = {}
    static: dict[int, str] = {}
    for i, kind in enumerate(kinds):
        if kind == _pb.graph.INPUT_KIND_TENSOR:
            continue
        if kind == _pb.graph.INPUT_KIND_BOOL:
            static[i] = "bool inputs are always static"
            continue
        paths, reason = _scalar_positions(module, inputs, kinds, names, graph, i, dynamic)
        if paths is None:
            static[i] = reason
            continue
        for path in paths:
            claims.setdefault(path, []).append(i)
    for owners in claims.values():
        if len(owners) > 1:
            for i in owners:
                static[i] = "its value cannot be told apart from another input's"
    for path, owners in claims.items():
        if len(owners) == 1 and owners[0] not in static:
            _arg_at(graph, path).ref = graph.inputs[owners[0]].name
    for i, reason in sorted(static.items()):
        inp = graph.inputs[i]
        inp.static = True
        setattr(inp.static_value, _VALUE_FIELD[inp.kind], inputs[i])
        logger.info("input %d (%s) is static at %r: %s", i, inp.name, inputs[i], reason)
    return graph


def _kind_of(value: Any, i: int) -> int:
    if isinstance(value, torch.Tensor):
        if dtypes.code_for(value.dtype) is None:
            raise CaptureError(f"input {i}: dtype {value.dtype} cannot travel on the wire")
        if value.layout != torch.strided:
            raise CaptureError(f"input {i}: only strided tensors can be inputs, not {value.layout}")
        return _pb.graph.INPUT_KIND_TENSOR
    kind = _KIND_OF.get(type(value))
    if kind is None:
        raise CaptureError(
            f"input {i}: a {type(value).__name__} cannot be an input (tensor, int, float or bool)"
        )
    if kind == _pb.graph.INPUT_KIND_INT and not _INT64_MIN <= value <= _INT64_MAX:
        raise CaptureError(f"input {i}: {value} does not fit in int64")
    return kind


def _preferred_names(fn: Capturable, n: int) -> list[str]:
    """Input names from the function's signature, for people reading the graph."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        params = []
    names: list[str] = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            names.extend(f"{p.name}{k}" for k in range(n - len(names)))
            break
    names.extend(f"input{k}" for k in range(len(names), n))
    return names[:n]


def _brief(e: BaseException) -> str:
    """An exception's type and first line: export's messages run to pages."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _export(module: torch.nn.Module, inputs: list[Any], dynamic: bool) -> ExportedProgram:
    dynamic_shapes = None
    if dynamic:
        specs = tuple(
            {d: Dim.AUTO for d in range(v.dim())} if isinstance(v, torch.Tensor) and v.dim() else None
            for v in inputs
        )
        dynamic_shapes = (specs,)  # one entry: the wrapper's *args
    ep = torch.export.export(module, tuple(inputs), dynamic_shapes=dynamic_shapes)
    ep = ep.run_decompositions()
    # The core decompositions keep some ops whole (aten::linalg_vector_norm,
    # for one); lower those further where torch knows how, so the graph
    # stays inside the allowlist. A decomposition may itself produce such ops.
    for _ in range(_DECOMPOSE_ROUNDS):
        extra = {
            op: decomposition_table[op]
            for op in _ops_outside_allowlist(ep.graph)
            if op in decomposition_table
        }
        if not extra:
            break
        ep = ep.run_decompositions(extra)
    return ep


def _ops_outside_allowlist(graph: torch.fx.Graph) -> set[torch._ops.OpOverload]:
    return {
        node.target
        for node in graph.nodes
        if isinstance(node.target, torch._ops.OpOverload)
        and not ops.is_allowed(ops.op_name(node.target))
    }


def _perturbed(value: int | float) -> int | float | None:
    """A second value for a scalar input, or None when there is no telling one."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        other = value * 1.37 + 0.61
        return other if math.isfinite(other) and other != value else None
    return value + 1 if value < _INT64_MAX else value - 1


def _scalar_positions(
    module: torch.nn.Module,
    inputs: list[Any],
    kinds: list[int],
    names: list[str],
    graph: _pb.graph.Graph,
    i: int,
    dynamic: bool,
) -> tuple[list[_Path] | None, str]:
    """Where scalar input `i` appears in `graph`, or None and why it must be static."""
    value = inputs[i]
    other = _perturbed(value)
    if other is None:
        return None, "no second value to trace with"
    changed = list(inputs)
    changed[i] = other
    try:
        second = _convert(_export(module, changed, dynamic), kinds, names)
    except Exception as e:  # any failure to trace with another value pins the value
        logger.debug("tracing with input %d = %r failed: %s", i, other, _brief(e))
        return None, f"the function cannot be traced with {other!r}"
    field = _VALUE_FIELD[kinds[i]]
    paths = _differences(keys.canonicalize(graph), keys.canonicalize(second), field, value, other)
    if paths is None:
        return None, "the graph depends on its value in a way that cannot be kept as an input"
    return paths, ""


def _differences(
    a: _pb.graph.Graph, b: _pb.graph.Graph, field: str, value: Any, other: Any
) -> list[_Path] | None:
    """Positions where `a` holds `value` and `b` holds `other`, if that is their only difference."""
    if list(a.inputs) != list(b.inputs) or list(a.constants) != list(b.constants):
        return None
    if len(a.nodes) != len(b.nodes) or len(a.outputs) != len(b.outputs):
        return None
    paths: list[_Path] = []

    def same(x: _pb.graph.Argument, y: _pb.graph.Argument, path: _Path) -> bool:
        if x == y:
            return True
        kind = x.WhichOneof("kind")
        if kind != y.WhichOneof("kind"):
            return False
        if kind == "list_value":
            xs, ys = x.list_value.items, y.list_value.items
            return len(xs) == len(ys) and all(
                same(p, q, (*path, k)) for k, (p, q) in enumerate(zip(xs, ys))
            )
        if kind == field and getattr(x, field) == value and getattr(y, field) == other:
            paths.append(path)
            return True
        return False

    for n, (x, y) in enumerate(zip(a.nodes, b.nodes)):
        if x.op != y.op or list(x.outputs) != list(y.outputs):
            return None
        if len(x.args) != len(y.args) or [k.name for k in x.kwargs] != [k.name for k in y.kwargs]:
            return None
        for j, (p, q) in enumerate(zip(x.args, y.args)):
            if not same(p, q, ("arg", n, j)):
                return None
        for j, (p, q) in enumerate(zip(x.kwargs, y.kwargs)):
            if not same(p.value, q.value, ("kw", n, j)):
                return None
    for j, (p, q) in enumerate(zip(a.outputs, b.outputs)):
        if not same(p, q, ("out", j)):
            return None
    return paths


def _arg_at(graph: _pb.graph.Graph, path: _Path) -> _pb.graph.Argument:
    if path[0] == "out":
        arg, rest = graph.outputs[path[1]], path[2:]
    elif path[0] == "arg":
        arg, rest = graph.nodes[path[1]].args[path[2]], path[3:]
    else:
        arg, rest = graph.nodes[path[1]].kwargs[path[2]].value, path[3:]
    for k in rest:
        arg = arg.list_value.items[k]
    return arg


def _where(node: torch.fx.Node) -> str:
    """The node, and the torch call it came from when export recorded it.

    (Export's stack traces stop at the wrapper's forward, so they would not
    point at the user's line.)
    """
    origin = node.meta.get("torch_fn")
    if isinstance(origin, tuple) and len(origin) == 2:
        return f"{node.name} (from {origin[1]})"
    return node.name


class _Converter:
    """One ExportedProgram -> one Graph message."""

    def __init__(self, ep: ExportedProgram, kinds: list[int], names: list[str]) -> None:
        self.ep = ep
        self.kinds = kinds
        self.names = names
        self.graph = _pb.graph.Graph()
        self.values: dict[torch.fx.Node, _pb.graph.Argument] = {}
        # Nodes with a tuple or list result: their index in graph.nodes.
        self.multi: dict[torch.fx.Node, int] = {}

    def convert(self) -> _pb.graph.Graph:
        ep = self.ep
        for spec in ep.graph_signature.output_specs:
            if spec.kind == OutputKind.USER_INPUT_MUTATION:
                raise CaptureError(
                    f"the function changes its input {spec.target} in place; "
                    "a graph cannot carry in-place changes to its inputs"
                )
            if spec.kind != OutputKind.USER_OUTPUT:
                raise CaptureError(
                    f"the function changes {spec.target} ({spec.kind.name.lower()}); "
                    "a graph cannot carry in-place changes to buffers or other state"
                )
        fx_nodes = list(ep.graph.nodes)
        placeholders = [n for n in fx_nodes if n.op == "placeholder"]
        specs = ep.graph_signature.input_specs
        if len(placeholders) != len(specs):
            raise CaptureError("export's graph signature does not match its placeholders")
        taken = {n.name for n in fx_nodes}
        user = 0
        for node, spec in zip(placeholders, specs):
            if spec.kind == InputKind.USER_INPUT:
                if user >= len(self.kinds):
                    raise CaptureError("export found more inputs than were given")
                self._user_input(node, user, taken)
                user += 1
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                self.values[node] = self._add_constant(self._lifted(spec.target), spec.target)
            else:
                raise CaptureError(f"cannot capture a {spec.kind.name.lower()} input ({node.name})")
        if user != len(self.kinds):
            raise CaptureError(f"export kept {user} of the {len(self.kinds)} inputs")

        output = next(n for n in reversed(fx_nodes) if n.op == "output")
        live = self._live(output)
        for node in fx_nodes:
            if node.op == "placeholder" or node.op == "output":
                continue
            if node not in live:
                logger.debug("dropping %s (%s): nothing uses its result", node.name, node.target)
                continue
            if node.op != "call_function":
                raise CaptureError(f"cannot capture a {node.op} node: {_where(node)}")
            self._call(node)
        results = output.args[0]
        results = results if isinstance(results, (list, tuple)) else (results,)
        for j, value in enumerate(results):
            self.graph.outputs.append(self._arg(value, f"output {j}"))
        return self.graph

    def _user_input(self, node: torch.fx.Node, index: int, taken: set[str]) -> None:
        kind = self.kinds[index]
        name = self.names[index]
        if name in taken and name != node.name or any(i.name == name for i in self.graph.inputs):
            name = node.name  # the signature's name clashes with a value's
        inp = self.graph.inputs.add(name=name, kind=kind)
        if kind == _pb.graph.INPUT_KIND_TENSOR:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise CaptureError(f"input {index}: export did not keep it as a tensor")
            code = dtypes.code_for(val.dtype)
            if code is None:
                raise CaptureError(f"input {index}: dtype {val.dtype} cannot travel on the wire")
            inp.dtype = code
            inp.shape.extend(int(d) if is_concrete_int(d) else -1 for d in val.shape)
        self.values[node] = _pb.graph.Argument(ref=name)

    def _lifted(self, target: str | None) -> torch.Tensor:
        if target in self.ep.state_dict:
            value = self.ep.state_dict[target]
        else:
            value = self.ep.constants.get(target or "")
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"cannot capture {target!r}: only tensors can be constants")
        return value

    def _add_constant(self, t: torch.Tensor, what: str) -> _pb.graph.Argument:
        index = len(self.graph.constants)
        try:
            self.graph.constants.append(tensor_to_proto(t.detach(), f"constants[{index}]"))
        except FuseportError as e:
            raise CaptureError(f"cannot capture the constant {what}: {e}") from e
        return _pb.graph.Argument(constant=index)

    @staticmethod
    def _live(output: torch.fx.Node) -> set[torch.fx.Node]:
        live: set[torch.fx.Node] = set()
        todo = list(output.all_input_nodes)
        while todo:
            node = todo.pop()
            if node not in live:
                live.add(node)
                todo.extend(node.all_input_nodes)
        return live

    def _call(self, node: torch.fx.Node) -> None:
        target = node.target
        if target is operator.getitem:
            self._getitem(node)
            return
        if isinstance(target, torch._ops.OpOverload):
            name = ops.op_name(target)
            if not ops.is_allowed(name):
                raise OpNotAllowed(f"op {name!r} is not in the allowlist (at {_where(node)})")
            returns = target._schema.returns
            if len(returns) > 1:
                count = len(returns)
            elif len(returns) == 1 and isinstance(returns[0].type, torch.ListType):
                val = node.meta.get("val")
                if not isinstance(val, (list, tuple)):
                    raise CaptureError(f"export did not record the results of {_where(node)}")
                count = len(val)
            else:
                count = 0
        elif target in _SYM_NAMES:
            name = _SYM_NAMES[target]
            if not isinstance(node.meta.get("val"), (int, torch.SymInt)):
                raise CaptureError(
                    f"only integer arithmetic on sizes can be captured, not {target.__name__} "
                    f"giving {type(node.meta.get('val')).__name__} at {_where(node)}"
                )
            count = 0
        else:
            shown = getattr(target, "__qualname__", None) or repr(target)
            raise CaptureError(f"cannot capture a call to {shown} at {_where(node)}")

        where = _where(node)
        msg = self.graph.nodes.add(op=name)
        for j, a in enumerate(node.args):
            msg.args.append(self._arg(a, f"{where} argument {j}"))
        for key in sorted(node.kwargs):
            msg.kwargs.add(name=key).value.CopyFrom(self._arg(node.kwargs[key], f"{where} {key}="))
        if count:
            # Filled in by the getitem nodes that read the elements.
            msg.outputs.extend([""] * count)
            self.multi[node] = len(self.graph.nodes) - 1
        else:
            msg.outputs.append(node.name)
            self.values[node] = _pb.graph.Argument(ref=node.name)

    def _getitem(self, node: torch.fx.Node) -> None:
        source, index = node.args
        if source not in self.multi or not isinstance(index, int):
            raise CaptureError(f"cannot capture indexing at {_where(node)}")
        outputs = self.graph.nodes[self.multi[source]].outputs
        if not 0 <= index < len(outputs) or outputs[index]:
            raise CaptureError(f"cannot capture indexing at {_where(node)}")
        outputs[index] = node.name
        self.values[node] = _pb.graph.Argument(ref=node.name)

    def _arg(self, value: Any, where: str) -> _pb.graph.Argument:
        if isinstance(value, torch.fx.Node):
            if value in self.multi:
                raise CaptureError(f"{where}: a tuple result used whole cannot be captured")
            if value not in self.values:
                raise CaptureError(f"{where}: {value.name} is used before it is defined")
            return self.values[value]
        if value is None:
            return _pb.graph.Argument(none_value=_pb.values.NoneValue())
        if isinstance(value, bool):
            return _pb.graph.Argument(bool_value=value)
        if isinstance(value, int):
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise CaptureError(f"{where}: {value} does not fit in int64")
            return _pb.graph.Argument(int_value=value)
        if isinstance(value, float):
            return _pb.graph.Argument(float_value=value)
        if isinstance(value, str):
            return _pb.graph.Argument(string_value=value)
        if isinstance(value, (list, tuple)):
            items = [self._arg(v, f"{where}[{k}]") for k, v in enumerate(value)]
            return _pb.graph.Argument(list_value=_pb.graph.ArgumentList(items=items))
        if isinstance(value, torch.dtype):
            code = dtypes.code_for(value)
            if code is None:
                raise CaptureError(f"{where}: dtype {value} cannot travel on the wire")
            return _pb.graph.Argument(dtype=code)
        if isinstance(value, torch.device):
            index = -1 if value.index is None else value.index
            return _pb.graph.Argument(device=_pb.graph.Device(type=value.type, index=index))
        if isinstance(value, torch.memory_format):
            if value not in _MEMORY_FORMATS:
                raise CaptureError(f"{where}: memory format {value} is not supported")
            return _pb.graph.Argument(memory_format=_MEMORY_FORMATS[value])
        if isinstance(value, torch.layout):
            if value != torch.strided:
                raise CaptureError(f"{where}: layout {value} is not supported")
            return _pb.graph.Argument(layout=_pb.graph.LAYOUT_STRIDED)
        if isinstance(value, torch.Tensor):
            return self._add_constant(value, where)
        raise CaptureError(f"{where}: a {type(value).__name__} argument cannot be captured")


def _convert(ep: ExportedProgram, kinds: list[int], names: list[str]) -> _pb.graph.Graph:
    return _Converter(ep, kinds, names).convert()
