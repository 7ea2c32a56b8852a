"""Capture: a Python function or nn.Module plus example inputs -> a Graph message of core ATen ops.

What a captured graph guarantees: it computes what the function computes for
every stack that satisfies its inputs (kind, dtype, rank, fixed sizes, static
values) and its `conditions`, and the server refuses every other stack. Nothing
export specialised on is lost: a branch on a size, a scalar or a shape equality
becomes a condition (or a static value), never a silently baked-in path.

How a capture runs:

1. The function (or module) is traced with ``torch.export.export``: every dim
   of every tensor input is ``Dim.AUTO``, and so is every int input (it becomes
   a symbol like a size). ``run_decompositions()`` lowers the program to core
   ATen, and ops outside the allowlist are decomposed further where torch can.
   If that fails, it is tried again with int inputs static, then with static
   shapes (everything exact).
2. Parameters, buffers and lifted tensor constants become `Graph.constants`;
   user inputs become `GraphInput`s (a dim export kept symbolic is -1, one it
   specialised is its size; an int export specialised is static).
3. What export proved becomes `Graph.conditions`, over input sizes and int
   inputs: each symbol's range (``x.shape[0] >= 2``: export assumes symbolic
   sizes are not 0 or 1, so those get a variant of their own), equalities
   between dims (``y.shape[0] == x.shape[0]``), and every guard the trace took
   (``x.shape[0] >= 4`` for ``if x.shape[0] > 3``, ``x.shape[0] % 2 == 0`` for a
   view). A guard capture cannot express makes that attempt fail (step 1).
4. Nodes whose results nothing uses are dropped (export's assertion nodes among
   them: their conditions are in `conditions`). ``operator.getitem`` on a tuple
   result is folded into the node's `outputs`; Python arithmetic on sizes
   becomes ``sym::add`` etc.

Float inputs. Export bakes Python floats into the graph (``x * alpha`` traced
with 0.5 becomes ``mul(x, 0.5)``) and records no guard on them, so a branch on
a float (``if alpha > 0``) would be invisible. A float therefore stays an input
only when a second trace, with the float passed as a 0-dim float64 tensor,
succeeds and has the same structure as the first with that tensor exactly where
the first has the value. Any control flow on the value fails that trace (export
cannot branch on tensor data) and any arithmetic on it changes the structure;
either way the input becomes *static*: the graph accepts only that value, and
the client captures a new variant for another. Bool inputs are always static.

What stays outside the guarantee: code that branches on the Python *type* of
a scalar input (``isinstance(alpha, float)``) can take another path under
tracing than when called with a plain number.

Errors: anything that cannot be captured raises CaptureError naming the
problem, except an op outside the allowlist, which raises OpNotAllowed naming
the op (the error the server would give for the same graph).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import operator
import os
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import sympy
import torch
import torch.fx
from torch._decomp import decomposition_table
from torch._subclasses.fake_tensor import FakeTensor
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from fuseport.wire import _pb, dtypes, keys, ops
from fuseport.wire._tracing import TRACE_LOCK
from fuseport.wire.codec import tensor_to_proto
from fuseport.wire.errors import CaptureError, FuseportError, OpNotAllowed
from fuseport.wire.sizes import compile_conditions

__all__ = ["SizeConditions", "capture"]

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
        try:
            return self.inner(*args)
        except GuardOnDataDependentSymNode as e:
            # Replaced here, in the user's frame: for an exception that says
            # "data-dependent", torch.export prints its partial graph to stderr.
            raise _BranchOnData(_user_line(e)) from None


class _BranchOnData(Exception):
    """The traced function decided something on a tensor's values."""

    def __init__(self, where: str) -> None:
        super().__init__(
            f"the function decides on a tensor's values{where}; a graph cannot branch on data. "
            "Use torch.where, or pass the value as an int, float or bool input"
        )


@dataclass(frozen=True)
class _Attempt:
    what: str
    dynamic_dims: bool
    dynamic_ints: bool


# Most general first; each later one gives up something the previous could not keep.
_ATTEMPTS = (
    _Attempt("symbolic sizes and int inputs", True, True),
    _Attempt("symbolic sizes, static int inputs", True, False),
    _Attempt("static shapes", False, False),
)


def capture(fn: Capturable, example_inputs: Sequence[Any]) -> _pb.graph.Graph:
    """Traces `fn` on `example_inputs` (tensors, ints, floats, bools) into a Graph message.

    Raises CaptureError naming the problem, or OpNotAllowed naming an op
    outside the allowlist. Safe to call from several threads, and beside
    torch.compile in the same process: tracing takes turns (TRACE_LOCK).
    """
    with TRACE_LOCK, _quiet_torch():
        return _capture(fn, example_inputs)


# torch.export's own deprecation warning (torch 2.13 raises it from inside
# export, twice a capture); it is torch's to fix, and the user can do nothing about it.
_TORCH_NOISE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
# Logs, at WARNING, "Unable to find user code corresponding to {u0}" and the whole
# traced graph for every data-dependent guard: CaptureError says it in one line.
_SHAPES_LOGGER = logging.getLogger("torch.fx.experimental.symbolic_shapes")


@contextlib.contextmanager
def _quiet_torch():
    """Silences what torch says to nobody in particular while it traces, and only
    then: the same warning from the user's own torch.export call still shows."""
    level = _SHAPES_LOGGER.level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCH_NOISE, category=FutureWarning)
        _SHAPES_LOGGER.setLevel(logging.ERROR)
        try:
            yield
        finally:
            _SHAPES_LOGGER.setLevel(level)


def _unaliased(example_inputs: Sequence[Any]) -> list[Any]:
    """The examples, with a tensor that shares memory with an earlier one cloned:
    torch.export folds the same tensor given twice into one input, so `a - b`
    captured on [x, x] would compute `b - b` for every later call."""
    inputs: list[Any] = []
    seen: set[int] = set()
    for v in example_inputs:
        if isinstance(v, torch.Tensor) and v.device.type != "meta":
            storage = v.untyped_storage().data_ptr()
            if storage in seen and v.numel():
                v = v.clone(memory_format=torch.preserve_format)
            seen.add(storage)
        inputs.append(v)
    return inputs


def _capture(fn: Capturable, example_inputs: Sequence[Any]) -> _pb.graph.Graph:
    inputs = _unaliased(example_inputs)
    kinds = [_kind_of(v, i) for i, v in enumerate(inputs)]
    names = _preferred_names(fn, len(inputs))
    module = _Wrapper(fn)

    for n, attempt in enumerate(_ATTEMPTS):
        last = n == len(_ATTEMPTS) - 1
        try:
            ep = _export(module, inputs, kinds, attempt)
        except Exception as e:  # export raises many types; any failure means "try the next"
            if last:
                if isinstance(e, _BranchOnData):
                    raise CaptureError(str(e)) from None
                raise CaptureError(f"torch.export cannot trace the function: {_brief(e)}") from e
            logger.info("capture with %s failed (%s); trying the next", attempt.what, _brief(e))
            continue
        try:
            graph = _Converter(ep, kinds, names).convert()
            _check_own_inputs(graph, inputs)
        except OpNotAllowed:
            raise  # the same op shows up in every attempt
        except Exception as e:
            if last:
                if isinstance(e, CaptureError):
                    raise
                raise CaptureError(f"cannot convert the traced graph: {_brief(e)}") from e
            logger.info("capture with %s failed (%s); trying the next", attempt.what, _brief(e))
            continue
        break

    for i, kind in enumerate(kinds):
        if kind == _pb.graph.INPUT_KIND_BOOL:
            _make_static(graph, i, inputs[i], "bool inputs are always static")
        elif kind == _pb.graph.INPUT_KIND_FLOAT:
            positions, reason = _float_positions(module, inputs, kinds, names, graph, i, attempt)
            if positions is None:
                _make_static(graph, i, inputs[i], reason)
            for path in positions or ():
                _arg_at(graph, path).ref = graph.inputs[i].name
    return graph


def _check_own_inputs(graph: _pb.graph.Graph, inputs: list[Any]) -> None:
    """A capture must cover the inputs it was traced with. Export's ranges do
    not always include them (it takes an int input to be >= 0, whatever the
    example), and a graph that refuses its own example is no capture of it."""
    for cond in compile_conditions(graph):
        if not cond.holds(inputs):
            raise CaptureError(f"export's condition {cond.text} excludes the example inputs")


def _make_static(graph: _pb.graph.Graph, i: int, value: Any, reason: str) -> None:
    inp = graph.inputs[i]
    inp.static = True
    setattr(inp.static_value, _VALUE_FIELD[inp.kind], value)
    logger.info("input %d (%s) is static at %r: %s", i, inp.name, value, reason)


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


# Frames in these folders are the tracer's, not the user's.
_LIBRARY_DIRS = tuple(
    os.path.join(os.path.realpath(d), "")
    for d in (os.path.dirname(torch.__file__), os.path.dirname(__file__))  # torch, fuseport.wire
)
_STDLIB_DIR = os.path.join(os.path.realpath(os.path.dirname(contextlib.__file__)), "")


def _user_line(e: BaseException) -> str:
    """' at FILE:LINE (`code`)' of the innermost frame of `e` outside torch and fuseport."""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        path = os.path.realpath(frame.filename)
        stdlib = path.startswith(_STDLIB_DIR) and "-packages" not in path
        if not (stdlib or path.startswith(_LIBRARY_DIRS)) and os.path.exists(path):
            return f" at {frame.filename}:{frame.lineno}" + (f" (`{frame.line}`)" if frame.line else "")
    return ""


def _export(module: torch.nn.Module, inputs: list[Any], kinds: list[int], attempt: _Attempt) -> ExportedProgram:
    specs: list[Any] = []
    for v, kind in zip(inputs, kinds):
        if kind == _pb.graph.INPUT_KIND_TENSOR and attempt.dynamic_dims and v.dim():
            specs.append({d: Dim.AUTO for d in range(v.dim())})
        elif kind == _pb.graph.INPUT_KIND_INT and attempt.dynamic_ints:
            specs.append(Dim.AUTO)  # AUTO, not DYNAMIC: a value export must pin is pinned, not an error
        else:
            specs.append(None)
    ep = torch.export.export(module, tuple(inputs), dynamic_shapes=(tuple(specs),))  # one entry: *args
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


def _float_positions(
    module: torch.nn.Module,
    inputs: list[Any],
    kinds: list[int],
    names: list[str],
    graph: _pb.graph.Graph,
    i: int,
    attempt: _Attempt,
) -> tuple[list[_Path] | None, str]:
    """Where float input `i` appears in `graph`, or None and why it must be static.

    The probe: trace again with the float as a 0-dim float64 tensor. Export
    cannot branch on a tensor's value, so success means no control flow
    depends on it; the probe must then be `graph` with the tensor exactly where
    `graph` holds the value (same ops, same constants, same conditions)."""
    value = inputs[i]
    if not math.isfinite(value):
        return None, "a NaN or infinite example cannot be told apart from constants"
    probe_inputs = list(inputs)
    probe_inputs[i] = torch.tensor(value, dtype=torch.float64)
    probe_kinds = list(kinds)
    probe_kinds[i] = _pb.graph.INPUT_KIND_TENSOR
    try:
        ep = _export(module, probe_inputs, probe_kinds, attempt)
        probe = _Converter(ep, probe_kinds, names, check_ops=False).convert()
    except Exception as e:  # any failure to trace the value as data pins it
        logger.debug("probe of input %d as a tensor failed: %s", i, _brief(e))
        return None, f"the function branches on it or needs it as a Python number ({_brief(e)})"
    paths = _aligned(keys.canonicalize(graph), keys.canonicalize(probe), i, value)
    if paths is None:
        return None, "the graph depends on its value in a way that cannot be kept as an input"
    return paths, ""


def _aligned(real: _pb.graph.Graph, probe: _pb.graph.Graph, i: int, value: float) -> list[_Path] | None:
    """Positions where `real` holds `value` and `probe` refers to input `i`, if
    that (and an op's Scalar overload against its Tensor one) is their only difference."""
    if len(real.inputs) != len(probe.inputs) or any(
        a != b for k, (a, b) in enumerate(zip(real.inputs, probe.inputs)) if k != i
    ):
        return None
    if list(real.constants) != list(probe.constants) or list(real.conditions) != list(probe.conditions):
        return None
    if len(real.nodes) != len(probe.nodes) or len(real.outputs) != len(probe.outputs):
        return None
    ref = real.inputs[i].name  # canonical: "i<i>" in both
    paths: list[_Path] = []

    def same(x: _pb.graph.Argument, y: _pb.graph.Argument, path: _Path) -> bool:
        if x == y:
            return True
        kind = x.WhichOneof("kind")
        if kind == "float_value" and x.float_value == value and y.WhichOneof("kind") == "ref" and y.ref == ref:
            paths.append(path)
            return True
        if kind == "list_value" and y.WhichOneof("kind") == "list_value":
            xs, ys = x.list_value.items, y.list_value.items
            return len(xs) == len(ys) and all(same(p, q, (*path, k)) for k, (p, q) in enumerate(zip(xs, ys)))
        return False

    for n, (x, y) in enumerate(zip(real.nodes, probe.nodes)):
        before = len(paths)
        if list(x.outputs) != list(y.outputs) or len(x.args) != len(y.args):
            return None
        if [k.name for k in x.kwargs] != [k.name for k in y.kwargs]:
            return None
        if not all(same(p, q, ("arg", n, j)) for j, (p, q) in enumerate(zip(x.args, y.args))):
            return None
        if not all(same(p.value, q.value, ("kw", n, j)) for j, (p, q) in enumerate(zip(x.kwargs, y.kwargs))):
            return None
        # clamp.default(x, None, 0.5) against clamp.Tensor(x, None, t): the
        # same op, taking the value as a Scalar where the probe passed a tensor.
        if x.op != y.op and (x.op.partition(".")[0] != y.op.partition(".")[0] or len(paths) == before):
            return None
    if not all(same(p, q, ("out", j)) for j, (p, q) in enumerate(zip(real.outputs, probe.outputs))):
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


class SizeConditions:
    """Symbolic sizes -> SizeExpr conditions over a graph's inputs. Used for what
    export proved at capture (Graph.conditions) and for the guards a compile
    recorded (the compile worker): either way, the server evaluates them itself."""

    def __init__(self) -> None:
        # Each symbol used for a size or int input, and the first input dim or
        # int input that holds it; later occurrences become equalities.
        self.bound: dict[sympy.Symbol, _pb.graph.SizeExpr] = {}
        self.equal: list[tuple[_pb.graph.SizeExpr, sympy.Expr]] = []

    def bind(self, expr: sympy.Expr, ref: _pb.graph.SizeExpr) -> None:
        if isinstance(expr, sympy.Symbol) and expr not in self.bound:
            self.bound[expr] = ref
        else:
            self.equal.append((ref, expr))

    def conditions(self, env: Any, ranges: Any = None) -> list[_pb.graph.SizeExpr]:
        """Every range, equality and guard `env` holds over the bound symbols
        (`ranges`: export's range constraints, read before env's own ranges)."""
        out: list[_pb.graph.SizeExpr] = []
        seen: set[bytes] = set()

        def add(cond: _pb.graph.SizeExpr) -> None:
            data = cond.SerializeToString(deterministic=True)
            if data not in seen:
                seen.add(data)
                out.append(cond)

        for symbol, ref in self.bound.items():
            vr = (ranges or {}).get(symbol) or env.var_to_range.get(symbol)
            if vr is None:
                continue
            lower, upper = _finite(vr.lower), _finite(vr.upper)
            # Sizes are never negative: only a lower bound above 0 says anything.
            if lower is not None and (ref.WhichOneof("kind") != "dim" or lower > 0):
                add(_size_op(_pb.graph.SIZE_OP_LE, _size_int(lower), ref))
            if upper is not None:
                add(_size_op(_pb.graph.SIZE_OP_LE, ref, _size_int(upper)))
        for symbol, ref in self.bound.items():
            # A guard that made two symbols one (s50 == s28) is settled by a
            # replacement, and reads true once replaced: the equality itself is
            # the condition. (Export's symbols are bound after replacement, so
            # there it never fires; the compile worker binds before tracing.)
            replaced = env.replace(symbol)
            if replaced != symbol:
                add(_size_op(_pb.graph.SIZE_OP_EQ, ref, self.size(replaced)))
        for ref, expr in self.equal:
            add(_size_op(_pb.graph.SIZE_OP_EQ, ref, self.size(env.replace(expr))))
        for guard in env.guards:
            expr = env.replace(guard.expr)
            if expr == sympy.true:
                continue  # settled by a replacement (an equality now built into the inputs)
            if expr == sympy.false:
                raise CaptureError(f"a guard was recorded that cannot hold: {guard.expr}")
            add(self.size(expr))
        return out

    def size(self, e: Any) -> _pb.graph.SizeExpr:
        """A sympy expression over bound symbols -> SizeExpr; CaptureError for what it cannot say."""
        if e == sympy.true or e == sympy.false:
            return _size_int(int(e == sympy.true))
        if isinstance(e, sympy.Integer):
            return _size_int(int(e))
        if isinstance(e, sympy.Symbol):
            if e not in self.bound:
                raise CaptureError(f"a condition uses {e}, which no input size or int input holds")
            return self.bound[e]
        name = type(e).__name__
        if name in ("StrictLessThan", "StrictGreaterThan"):
            # Integers only: a < b is a + 1 <= b, so "x > 3" and the range
            # "x >= 4" come out the same and count once.
            a, b = e.args if name == "StrictLessThan" else reversed(e.args)
            return self.size(sympy.Le(a + 1, b, evaluate=False))
        if name in _SYMPY_FLIPPED:
            a, b = e.args
            return _size_op(_SYMPY_FLIPPED[name], self.size(b), self.size(a))
        if name in _SYMPY_OPS:
            return _size_op(_SYMPY_OPS[name], *(self.size(a) for a in e.args))
        if name in ("Pow", "PowByNatural"):
            base, exp = e.args
            if isinstance(exp, sympy.Integer) and 2 <= int(exp) <= 8:
                return _size_op(_pb.graph.SIZE_OP_MUL, *([self.size(base)] * int(exp)))
        raise CaptureError(f"cannot express the condition {e} (a {name})")


class _Converter:
    """One ExportedProgram -> one Graph message."""

    def __init__(self, ep: ExportedProgram, kinds: list[int], names: list[str], check_ops: bool = True) -> None:
        self.ep = ep
        self.kinds = kinds
        self.names = names
        self.check_ops = check_ops  # off for probes, which are never sent
        self.graph = _pb.graph.Graph()
        self.values: dict[torch.fx.Node, _pb.graph.Argument] = {}
        # Nodes with a tuple or list result: their index in graph.nodes.
        self.multi: dict[torch.fx.Node, int] = {}
        self.sizes = SizeConditions()
        self.shape_env: Any = None

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
        if self.shape_env is not None:
            # Graph.conditions: every range, equality and guard export proved the graph under.
            self.graph.conditions.extend(self.sizes.conditions(self.shape_env, self.ep.range_constraints))
        return self.graph

    def _user_input(self, node: torch.fx.Node, index: int, taken: set[str]) -> None:
        kind = self.kinds[index]
        name = self.names[index]
        if name in taken and name != node.name or any(i.name == name for i in self.graph.inputs):
            name = node.name  # the signature's name clashes with a value's
        inp = self.graph.inputs.add(name=name, kind=kind)
        val = node.meta.get("val")
        if kind == _pb.graph.INPUT_KIND_TENSOR:
            if not isinstance(val, torch.Tensor):
                raise CaptureError(f"input {index}: export did not keep it as a tensor")
            code = dtypes.code_for(val.dtype)
            if code is None:
                raise CaptureError(f"input {index}: dtype {val.dtype} cannot travel on the wire")
            inp.dtype = code
            if self.shape_env is None and isinstance(val, FakeTensor):
                self.shape_env = val.fake_mode.shape_env
            for d, size in enumerate(val.shape):
                expr = _expr_of(size)
                if isinstance(expr, sympy.Integer):
                    inp.shape.append(int(expr))
                else:
                    inp.shape.append(-1)
                    self.sizes.bind(expr, _pb.graph.SizeExpr(dim=_pb.graph.SizeRef(input=index, dim=d)))
        elif kind == _pb.graph.INPUT_KIND_INT:
            if not isinstance(val, (int, torch.SymInt)):
                raise CaptureError(f"input {index}: export did not keep it as an int")
            if self.shape_env is None and isinstance(val, torch.SymInt):
                self.shape_env = val.node.shape_env
            expr = _expr_of(val)
            if isinstance(expr, sympy.Integer):
                # Export pinned the value (or was told to): only it is accepted.
                inp.static = True
                inp.static_value.int_value = int(expr)
            else:
                self.sizes.bind(expr, _pb.graph.SizeExpr(scalar=index))
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
            if self.check_ops and not ops.is_allowed(name):
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


def _expr_of(size: int | torch.SymInt) -> sympy.Expr:
    """A size or int as export knows it (replacements applied): an Integer, a symbol or an expression."""
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return sympy.Integer(int(size))


def _finite(bound: Any) -> int | None:
    """A range bound as an int, or None for +-infinity (and bounds outside int64)."""
    if not isinstance(bound, sympy.Integer):  # torch's int_oo calls itself finite
        return None
    value = int(bound)
    return value if _INT64_MIN <= value <= _INT64_MAX else None


def _size_int(value: int) -> _pb.graph.SizeExpr:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise CaptureError(f"a condition holds {value}, outside int64")
    return _pb.graph.SizeExpr(int_value=value)


def _size_op(kind: int, *args: _pb.graph.SizeExpr) -> _pb.graph.SizeExpr:
    return _pb.graph.SizeExpr(op=_pb.graph.SizeOp(kind=kind, args=args))


# sympy (and torch's sympy functions) by class name -> size op. Names, not
# classes: torch moves these between modules from release to release.
_SYMPY_OPS: dict[str, int] = {
    "Add": _pb.graph.SIZE_OP_ADD,
    "Mul": _pb.graph.SIZE_OP_MUL,
    "FloorDiv": _pb.graph.SIZE_OP_FLOORDIV,
    "CleanDiv": _pb.graph.SIZE_OP_FLOORDIV,  # exact division: floor division of a multiple
    "Mod": _pb.graph.SIZE_OP_MOD,
    "PythonMod": _pb.graph.SIZE_OP_MOD,
    "Max": _pb.graph.SIZE_OP_MAX,
    "Min": _pb.graph.SIZE_OP_MIN,
    "Equality": _pb.graph.SIZE_OP_EQ,
    "Unequality": _pb.graph.SIZE_OP_NE,
    "LessThan": _pb.graph.SIZE_OP_LE,
    "And": _pb.graph.SIZE_OP_AND,
    "Or": _pb.graph.SIZE_OP_OR,
    "Not": _pb.graph.SIZE_OP_NOT,
}
# a >= b is b <= a.
_SYMPY_FLIPPED: dict[str, int] = {"GreaterThan": _pb.graph.SIZE_OP_LE}
