"""Checks before a graph runs, the same for the fused and the unfused path: arguments, shapes, sizes, data.

What a request could otherwise get past the kernels (docs/allowlist.md has the list):

* Arguments no kernel checks. `_VALIDATORS` refuse, per op, what crashes or
  reads memory it should not: negative strides, a batch norm run without
  statistics in eval mode (a segfault in eager), FFT dims out of range (a
  segfault), sampler modes that do not exist (uninitialised memory).
* Shapes and sizes. `Planner.plan` runs the graph on the meta device for the
  stack's sizes (once per distinct sizes: plans are cached). A shape error is
  refused here for both paths alike (Inductor's kernels skip many checks
  eager makes), and the plan knows every size: the caller refuses a result
  over the message limit, or a tensor larger than the device, before anything
  is allocated.
* Data. Some ops are only safe for some values: an index must be inside the
  dim it indexes (on CUDA an index out of range is a device-side assert that
  poisons the whole process); an integer divisor must not be 0, nor -1 under
  the smallest integer with rounding "trunc" (SIGFPE, in eager and in
  Inductor's CPU kernels alike). Where such an operand is a graph input (or a
  constant), `Plan.check_inputs` checks it on the host before the stack moves
  to the device; `with_data_checks` puts the same check in front of each such
  op of the unfused graph, operands the graph computes included. The fused
  path runs only when every check happened before launch
  (`Plan.unfused` is empty), or on the CPU for ops whose Inductor kernels raise
  an ordinary error themselves.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
import torch.fx

from fuseport.wire import ops

__all__ = [
    "OVERFLOW_BYTES", "DataError", "OutOfTime", "Plan", "Planner", "between_ops", "check_data", "device_capacity",
    "time_limits", "with_data_checks",
]  # fmt: skip

log = logging.getLogger(__name__)

META = torch.device("meta")
_PLANS_PER_GRAPH = 256
# A tensor's size past what torch counts in an int64: more than any device holds.
OVERFLOW_BYTES = 1 << 63
# c10's checks for such a size (the byte size, and the element count, of a shape):
# torch raises them as plain RuntimeErrors, so their words are all there is to know them by.
_OVERFLOW_WORDS = ("Storage size calculation overflowed", "integer multiplication overflow")

# Ops whose work the plan does not bound: the bytes they read and write (what the plan
# counts) can be far fewer than what they compute, and the FLOP counter does not count
# them. A pooling window is read once per output element (avg_pool2d of a 360x360
# constant with a 360 window: 1 MiB touched, 1.7e10 adds, 10 s of a CPU core); cdist
# and pdist compare every pair; the FFTs, sorts and cumulative
# ops are n log n or worse. A plan with one of them is never
# light (calls.light_work): its calls go to a worker, under their deadline and the
# watchdog, whatever their sizes.
UNBOUNDED_WORK_OPS = frozenset({
    "aten::_adaptive_avg_pool2d.default", "aten::_adaptive_avg_pool3d.default",
    "aten::adaptive_avg_pool1d.default", "aten::avg_pool1d.default", "aten::avg_pool2d.default",
    "aten::avg_pool3d.default", "aten::max_pool2d_with_indices.default", "aten::max_pool3d_with_indices.default",
    "aten::_cdist_forward.default", "aten::_pdist_forward.default", "aten::_fft_c2r.default",
    "aten::_fft_r2c.default", "aten::col2im.default", "aten::grid_sampler_2d.default", "aten::sort.default",
    "aten::topk.default", "aten::cumsum.default", "aten::randperm.default",
})  # fmt: skip


class DataError(ValueError):
    """An operand's values make the op unsafe to run (an index out of range, a zero divisor)."""


def _bind(op: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The op's arguments by schema name, defaults included."""
    bound = {a.name: a.default_value for a in op._schema.arguments if a.has_default_value()}
    bound.update(kwargs)
    for a, v in zip(op._schema.arguments, args):
        bound[a.name] = v
    return bound


def _is_int(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


# --------------------------------------------------------------------------- data rules


@dataclass(frozen=True)
class _DataCheck:
    """Operands whose values decide whether one op may run, and the test.

    `operands` are tensors (fx.Nodes when planning); `test` gets their
    values and raises DataError. `cpu_fused_safe`: Inductor's CPU kernel for
    the op raises an ordinary error itself, so a check the fused path cannot
    make before launch costs nothing there."""

    operands: tuple[Any, ...]
    test: Callable[..., None]
    cpu_fused_safe: bool


def _in_range(size: int, negative: bool, where: str, dim: int) -> Callable[[torch.Tensor], None]:
    def test(index: torch.Tensor) -> None:
        if not _is_int(index) or index.numel() == 0:
            return  # not an index: the op rejects it itself
        lo, hi = (int(v) for v in torch.aminmax(index))  # one host sync on a device
        low = -size if negative else 0
        if lo < low or hi >= size:
            bad = lo if lo < low else hi
            allowed = f"{low}..{size - 1}" if size else "none (the dim is empty)"
            raise DataError(f"{where}: index {bad} is out of range for dim {dim} of size {size} (allowed: {allowed})")

    return test


@dataclass(frozen=True)
class _IndexRule:
    """Where an op's index argument is and what it indexes, by schema name."""

    source: str  # the indexed tensor
    index: str  # the index tensor, or a list of optional tensors (one per dim)
    dim: str | None  # the dim argument; None: dim 0, or list position for lists
    negative: bool  # whether -n <= i < 0 counts from the end


_INDEX_RULES: dict[str, _IndexRule] = {
    "aten::gather.default": _IndexRule("self", "index", "dim", False),
    "aten::scatter.src": _IndexRule("self", "index", "dim", False),
    "aten::scatter.value": _IndexRule("self", "index", "dim", False),
    "aten::scatter_add.default": _IndexRule("self", "index", "dim", False),
    "aten::scatter_reduce.two": _IndexRule("self", "index", "dim", False),
    "aten::index_select.default": _IndexRule("self", "index", "dim", False),
    "aten::embedding.default": _IndexRule("weight", "indices", None, False),
    "aten::index.Tensor": _IndexRule("self", "indices", None, True),
    "aten::index_put.default": _IndexRule("self", "indices", None, True),
}


def _index_checks(name: str, a: dict[str, Any], value: Callable[[Any], Any]) -> list[_DataCheck]:
    rule = _INDEX_RULES[name]
    source = value(a.get(rule.source))
    index = a.get(rule.index)
    if not isinstance(source, torch.Tensor):
        return []  # the op rejects it itself

    def check(item: Any, dim: int, where: str) -> list[_DataCheck]:
        if not -source.dim() <= dim < max(source.dim(), 1):
            return []  # likewise
        size = source.shape[dim] if source.dim() else 1
        return [_DataCheck((item,), _in_range(size, rule.negative, where, dim), True)]

    if rule.dim is not None:
        return check(index, int(value(a.get(rule.dim, 0))), name)
    if not isinstance(index, (list, tuple)):
        return check(index, 0, name)
    out, dim = [], 0
    for k, item in enumerate(index):
        t = value(item)
        if not isinstance(t, torch.Tensor):
            dim += 1  # None: the whole dim
        elif t.dtype in (torch.bool, torch.uint8):
            dim += t.dim()  # a mask: its shape is checked by the op, its values are harmless
        else:
            out.extend(check(item, dim, f"index {k} of {name}"))
            dim += 1
    return out


_INT_DIVISION = {
    "aten::div.Tensor_mode": "rounding_mode",
    "aten::div.Scalar_mode": "rounding_mode",
    "aten::remainder.Tensor": None,
    "aten::remainder.Scalar": None,
    "aten::fmod.Tensor": None,
    "aten::fmod.Scalar": None,
}


def _division_checks(name: str, a: dict[str, Any], value: Callable[[Any], Any]) -> list[_DataCheck]:
    """Integer division by 0 is SIGFPE in Inductor's CPU kernel (rounding "trunc") and
    garbage on CUDA; the smallest integer divided by -1 with "trunc" is SIGFPE in eager too."""
    self, other = a.get("self"), a.get("other")
    t = value(self)
    if not _is_int(t):
        return []
    trunc = _INT_DIVISION[name] is not None and a.get("rounding_mode") == "trunc"
    smallest = torch.iinfo(t.dtype).min
    divisor = value(other)
    if not isinstance(divisor, torch.Tensor):  # a Scalar: known now (a literal, or an int input's value)
        if isinstance(divisor, (int, float)) and not isinstance(divisor, bool):
            if divisor == 0:
                raise DataError(f"{name}: integer division by zero")
            if trunc and divisor == -1:

                def no_smallest(x: torch.Tensor) -> None:
                    if bool((x == smallest).any()):
                        raise DataError(f"{name}: {smallest} // -1 overflows")

                return [_DataCheck((self,), no_smallest, False)]
        return []
    if not _is_int(divisor):
        return []

    def divisors(x: torch.Tensor, y: torch.Tensor) -> None:
        if bool((y == 0).any()):
            raise DataError(f"{name}: integer division by zero")
        if trunc and bool(((x == smallest) & (y == -1)).any()):
            raise DataError(f"{name}: {smallest} // -1 overflows")

    return [_DataCheck((self, other), divisors, not trunc)]


def _masked_scatter_checks(a: dict[str, Any], value: Callable[[Any], Any]) -> list[_DataCheck]:
    def enough(self: torch.Tensor, mask: torch.Tensor, source: torch.Tensor) -> None:
        if mask.dtype != torch.bool:
            return  # the op rejects it itself
        needed = int(torch.broadcast_to(mask, torch.broadcast_shapes(self.shape, mask.shape)).sum())
        if needed > source.numel():
            raise DataError(f"aten::masked_scatter.default: the mask selects {needed} elements, the source has {source.numel()}")

    return [_DataCheck((a.get("self"), a.get("mask"), a.get("source")), enough, False)]


DATA_CHECKED_OPS = frozenset(_INDEX_RULES) | frozenset(_INT_DIVISION) | {"aten::masked_scatter.default"}


def _data_checks(
    name: str, op: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any],
    value: Callable[[Any], Any] = lambda v: v,
) -> list[_DataCheck]:  # fmt: skip
    """The data checks of one call; `value` maps an argument (an fx.Node when
    planning) to its tensor, to read sizes and dtypes."""
    a = _bind(op, args, kwargs)
    if name in _INDEX_RULES:
        return _index_checks(name, a, value)
    if name in _INT_DIVISION:
        return _division_checks(name, a, value)
    if name == "aten::masked_scatter.default":
        return _masked_scatter_checks(a, value)
    return []


def check_data(name: str, *args: Any, **kwargs: Any) -> None:
    """What the unfused graph runs in front of each data-checked op."""
    op = ops.resolve(name)
    assert isinstance(op, torch._ops.OpOverload)
    for c in _data_checks(name, op, args, kwargs):
        if all(isinstance(t, torch.Tensor) for t in c.operands):
            c.test(*c.operands)


class OutOfTime(Exception):
    """The unfused graph stopped between two ops: `budget` says whether the
    server's --max-call-seconds passed (else the caller's deadline)."""

    def __init__(self, budget: bool) -> None:
        super().__init__("call budget passed" if budget else "deadline passed")
        self.budget = budget


_limits = threading.local()  # (deadline, budget end) of the call this thread runs


class time_limits:  # noqa: N801 - used as the context manager it replaces
    """Within: the unfused graph stops at its next op once either time.monotonic()
    passes. A class, not a generator function: it is entered on every call, and
    contextlib's machinery cost more than the rest of a small call's bookkeeping."""

    __slots__ = ("_ends",)

    def __init__(self, deadline: float | None, budget_end: float | None) -> None:
        self._ends = (deadline, budget_end) if deadline is not None or budget_end is not None else None

    def __enter__(self) -> None:
        _limits.ends = self._ends

    def __exit__(self, *exc: object) -> None:
        _limits.ends = None


def between_ops() -> None:
    """What the unfused graph runs after each op: stops it once its time is up.
    (An op is not interrupted; a graph of many ops stops within one op's time.)"""
    ends = getattr(_limits, "ends", None)
    if ends is None:
        return
    now = time.monotonic()
    deadline, budget_end = ends
    if budget_end is not None and now > budget_end:
        raise OutOfTime(budget=True)
    if deadline is not None and now > deadline:
        raise OutOfTime(budget=False)


def with_data_checks(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The same graph, with `check_data` in front of every data-checked op and
    `between_ops` after every op; it shares `module`'s constants. This is the
    unfused path: a failed check is an ordinary error, never a device-side
    assert or a signal, and a call whose time is up stops between two ops."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in module.graph.nodes:
        is_op = node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
        if is_op:
            name = ops.op_name(node.target)
            if name in DATA_CHECKED_OPS:
                graph.call_function(
                    check_data,
                    (name, *torch.fx.map_arg(node.args, env.__getitem__)),
                    torch.fx.map_arg(dict(node.kwargs), env.__getitem__),
                )
        env[node] = graph.node_copy(node, env.__getitem__)
        if is_op:
            graph.call_function(between_ops)
    graph.lint()
    return torch.fx.GraphModule(module, graph, class_name="FuseportCheckedGraph")


# --------------------------------------------------------------------------- argument validators


def _ints(v: Any) -> list[int]:
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def _strides(name: str, a: dict[str, Any]) -> None:
    """empty_strided and as_strided: meta kernels accept negative strides and
    reads past the end of a storage, which the fused path would then do for real."""
    size, stride = _ints(a["size"]), _ints(a["stride"])
    if len(size) != len(stride):
        raise ValueError(f"{len(size)} sizes but {len(stride)} strides")
    if any(s < 0 for s in stride):
        raise ValueError(f"negative strides are not supported, got {stride}")
    if any(s < 0 for s in size):
        raise ValueError(f"negative sizes are not supported, got {size}")
    extent = 0 if 0 in size else 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if name == "aten::as_strided.default":
        x = a["self"]
        offset = a.get("storage_offset")
        offset = x.storage_offset() if offset is None else int(offset)
        if offset < 0:
            raise ValueError(f"negative storage offset {offset}")
        # A decoded input's storage is the whole request message; planning
        # sees one of its own exact size, as eager semantics would.
        available = x.untyped_storage().nbytes() // x.element_size()
        if extent and offset + extent > available:
            raise ValueError(
                f"sizes {size}, strides {stride} and offset {offset} need {offset + extent} "
                f"elements, but the storage holds {available}"
            )
    elif extent * 8 >= 2**63:
        raise ValueError(f"sizes {size} and strides {stride} need {extent} elements, past int64")


def _channels(what: dict[str, Any], channels: int) -> None:
    for name, t in what.items():
        if isinstance(t, torch.Tensor) and t.numel() != channels:
            raise ValueError(f"{name} has {t.numel()} elements for {channels} channels")


def _batch_norm_no_stats(a: dict[str, Any]) -> None:
    if not a["training"]:
        raise ValueError("without running statistics, training must be true")  # eager segfaults
    x = a["input"]
    if x.numel() == 0:
        raise ValueError("the input has no elements to take statistics of")  # eager refuses, Inductor gave NaN
    _channels({"weight": a.get("weight"), "bias": a.get("bias")}, x.shape[1] if x.dim() > 1 else 1)


def _group_norm(a: dict[str, Any]) -> None:
    _channels({"weight": a.get("weight"), "bias": a.get("bias")}, int(a["C"]))  # eager refuses, Inductor read


def _elu(a: dict[str, Any]) -> None:
    """Inductor multiplies alpha by scale before it looks at x: with 1e38 for
    both, elu(0) was NaN where eager gives 0. Parameters whose product the
    input's dtype cannot hold are refused, on both paths."""
    x = a["self"]
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        return
    largest = torch.finfo(x.dtype).max
    alpha, scale, input_scale = (float(a[n]) for n in ("alpha", "scale", "input_scale"))
    for name, v in (("alpha * scale", alpha * scale), ("scale", scale), ("input_scale", input_scale)):
        if not abs(v) <= largest:  # NaN fails too
            raise ValueError(f"{name} = {v} is not a finite {x.dtype}")


def _dropout(a: dict[str, Any]) -> None:
    p = a.get("p")
    if isinstance(p, (int, float)) and not 0 <= p <= 1:
        raise ValueError(f"p must be in 0..1, got {p}")


def _batch_norm_no_training(a: dict[str, Any]) -> None:
    x = a["input"]
    names = ("weight", "bias", "running_mean", "running_var")
    _channels({n: a.get(n) for n in names}, x.shape[1] if x.dim() > 1 else 1)  # eager reads past them


def _fft(a: dict[str, Any]) -> None:
    rank = a["self"].dim()
    dims = _ints(a["dim"])
    if any(not -rank <= d < rank for d in dims) or len({d % max(rank, 1) for d in dims}) != len(dims):
        raise ValueError(f"dims {dims} are not distinct dims of a rank-{rank} tensor")  # eager segfaults
    if int(a["normalization"]) not in (0, 1, 2):
        raise ValueError(f"normalization {a['normalization']} is not 0, 1 or 2")
    if "last_dim_size" in a and int(a["last_dim_size"]) < 1:
        raise ValueError(f"last_dim_size {a['last_dim_size']} must be at least 1")


def _grid_sampler(a: dict[str, Any]) -> None:
    for name in ("interpolation_mode", "padding_mode"):
        if int(a[name]) not in (0, 1, 2):
            raise ValueError(f"{name} {a[name]} is not 0, 1 or 2")  # eager returns uninitialised memory


def _col2im(a: dict[str, Any]) -> None:
    for name in ("output_size", "kernel_size", "dilation", "padding", "stride"):
        values, low = _ints(a[name]), 0 if name in ("output_size", "padding") else 1
        if any(not low <= v < 2**31 for v in values):
            raise ValueError(f"{name} {values} must be in {low}..2**31-1")  # eager's arithmetic wraps


def _index_put(a: dict[str, Any]) -> None:
    """Eager refuses values that do not broadcast to what the indices select;
    Inductor's kernel did not check and wrote them anyway."""
    self, indices, values = a["self"], a["indices"], a["values"]
    if not isinstance(values, torch.Tensor) or any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
    ):
        return  # a mask selects a number of elements only its values tell
    selected = torch.ops.aten.index.Tensor(self, indices).shape
    if torch.broadcast_shapes(values.shape, selected) != selected:
        raise ValueError(f"values of shape {list(values.shape)} do not broadcast to the indexed shape {list(selected)}")


def _distance(a: dict[str, Any]) -> None:
    if not float(a["p"]) >= 0:
        raise ValueError(f"p must be >= 0, got {a['p']}")


def _int_pow(a: dict[str, Any]) -> None:
    """Eager refuses an integer tensor to a negative integer power; Triton's kernel
    on CUDA computed one (0 where eager has no answer), so both paths refuse it."""
    x, e = a["self"], a["exponent"]
    if isinstance(x, torch.Tensor) and not (x.dtype.is_floating_point or x.dtype.is_complex):
        if isinstance(e, int) and e < 0:
            raise ValueError(f"a {x.dtype} tensor to the negative integer power {e}: integers to negative integer powers are not allowed")


_VALIDATORS: dict[str, Callable[[dict[str, Any]], None]] = {
    "aten::pow.Tensor_Scalar": _int_pow,
    "aten::empty_strided.default": lambda a: _strides("aten::empty_strided.default", a),
    "aten::as_strided.default": lambda a: _strides("aten::as_strided.default", a),
    "aten::_native_batch_norm_legit.no_stats": _batch_norm_no_stats,
    "aten::_native_batch_norm_legit_no_training.default": _batch_norm_no_training,
    "aten::_fft_r2c.default": _fft,
    "aten::_fft_c2r.default": _fft,
    "aten::grid_sampler_2d.default": _grid_sampler,
    "aten::col2im.default": _col2im,
    "aten::index_put.default": _index_put,
    "aten::native_group_norm.default": _group_norm,
    "aten::elu.default": _elu,
    "aten::native_dropout.default": _dropout,
    "aten::_pdist_forward.default": _distance,
    "aten::_cdist_forward.default": _distance,
}


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class _InputCheck:
    """A data check whose operands are all graph inputs or constants: made before launch."""

    operands: tuple[tuple[str, Any], ...]  # ("input", position) or ("constant", attribute name)
    test: Callable[..., None]


@dataclass(frozen=True)
class Plan:
    """What the graph does for one set of input sizes.

    `error` is set when the graph cannot run on them (then nothing else
    counts). `output_bytes` is None where sizes depend on data (``nonzero``,
    ``.item()``) and planning stopped there. `unfused` says why the fused path
    must not run these inputs ("" when it may). `outputs` are the graph's
    results as planned (meta tensors, Python numbers), None where `output_bytes` is."""

    error: str | None = None
    output_bytes: int | None = None
    largest_bytes: int = 0
    largest_what: str = ""
    # The most bytes the unfused graph holds allocated at once (intermediates and
    # results, by liveness over the graph; views allocate nothing), and the work
    # it does: bytes its ops read and write, and the floating-point operations
    # of matrix products and convolutions. None where planning stopped (sizes
    # that depend on data): then nothing bounds them.
    peak_bytes: int | None = None
    work_bytes: int | None = None
    flops: int | None = None
    input_checks: tuple[_InputCheck, ...] = ()
    unfused: str = ""
    # A data check reads a value the graph computes (checked in front of its op on
    # the unfused path, or on the CPU by the fused kernel itself): it may be a view
    # of an input, so an input a client can rewrite mid-call must not be read there.
    checks_computed: bool = False
    outputs: tuple[Any, ...] | None = None
    # Set (the op, and torch's words) when a tensor of these sizes would have more
    # bytes or elements than 64 bits count: planning stops there, and the call is
    # refused as too large (largest_bytes is then OVERFLOW_BYTES), not as an error.
    overflow: str = ""
    # The first op of UNBOUNDED_WORK_OPS the graph runs ("" for none): work_bytes and
    # flops do not bound what it computes, so the call is never light.
    unbounded_work: str = ""

    def check_inputs(self, args: Sequence[Any], module: torch.nn.Module) -> None:
        """Makes the data checks of inputs (on the host) and constants; raises DataError."""
        for c in self.input_checks:
            values = [args[x] if kind == "input" else getattr(module, x) for kind, x in c.operands]
            c.test(*values)


class _Stop(Exception):
    """Planning cannot follow the graph further: sizes depend on data."""


_UNFUSED = (
    "a value this graph computes itself is checked op by op, on the unfused path "
    "({op}: an unchecked value there is a device-side assert on CUDA, or a signal)"
)


class Planner:
    """Plans one graph (as built: no data checks) for the stacks it gets, with a bounded cache."""

    def __init__(self, module: torch.fx.GraphModule, float_inputs: Sequence[int], device: torch.device) -> None:
        self.module = module
        self.cpu = device.type == "cpu"
        self._nodes = list(module.graph.nodes)
        self._placeholders = [n for n in self._nodes if n.op == "placeholder"]
        # Where each node's value is last read (the output node: never freed).
        position = {n: i for i, n in enumerate(self._nodes)}
        self._last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in self._nodes}
        self._meta_constants: dict[str, torch.Tensor] = {}
        self._cache: OrderedDict[tuple[Any, ...], Plan] = OrderedDict()
        self._lock = threading.Lock()
        # Float inputs change sizes only through these ops' Scalar arguments
        # (an arange's end, an upsample's scale); otherwise plans ignore their values.
        shaped = {"aten::arange.start_step", "aten::upsample_bilinear2d.vec", "aten::upsample_nearest2d.vec"}
        uses = {ops.op_name(n.target) for n in self._nodes if isinstance(n.target, torch._ops.OpOverload)}
        self._float_keys = frozenset(float_inputs) if uses & shaped else frozenset()

    @overload
    def plan(self, args: Sequence[Any]) -> Plan: ...
    @overload
    def plan(self, args: Sequence[Any], cached_only: bool) -> Plan | None: ...

    def plan(self, args: Sequence[Any], cached_only: bool = False) -> Plan | None:
        """The plan for these sizes; with `cached_only`, None unless planned before
        (planning runs the graph on meta tensors: its cost grows with the graph)."""
        key = tuple(
            (tuple(a.shape), a.stride(), a.dtype)
            if isinstance(a, torch.Tensor)
            else (a if not isinstance(a, float) or i in self._float_keys else None)
            for i, a in enumerate(args)
        )
        with self._lock:
            plan = self._cache.get(key)
            if plan is not None:
                self._cache.move_to_end(key)
                return plan
        if cached_only:
            return None
        plan = self._plan(args)
        with self._lock:
            self._cache[key] = plan
            if len(self._cache) > _PLANS_PER_GRAPH:
                self._cache.popitem(last=False)
        return plan

    # ------------------------------------------------------------------ meta run

    def _plan(self, args: Sequence[Any]) -> Plan:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            plan = self._walk(args)
        if plan.error is None and plan.peak_bytes is not None:
            plan = dataclasses.replace(plan, flops=int(counter.get_total_flops()))
        return plan

    def _walk(self, args: Sequence[Any]) -> Plan:
        env: dict[torch.fx.Node, Any] = {}
        origin: dict[torch.fx.Node, tuple[str, Any]] = {}  # the input or constant a node is
        for i, node in enumerate(self._placeholders):
            a = args[i]
            env[node] = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=META) if isinstance(a, torch.Tensor) else a
            origin[node] = ("input", i)
        checks: list[_InputCheck] = []
        largest, largest_what = 0, ""
        unbounded = ""
        unfused = ""
        computed = False
        usage = _Usage(self._last_use)

        def value(v: Any) -> Any:
            return env[v] if isinstance(v, torch.fx.Node) else v

        for pos, node in enumerate(self._nodes):
            if node.op == "get_attr":
                env[node] = self._meta_constant(node.target)
                origin[node] = ("constant", node.target)
            elif node.op == "call_function":
                a = torch.fx.map_arg(node.args, env.__getitem__)
                k = torch.fx.map_arg(dict(node.kwargs), env.__getitem__)
                name = ops.op_name(node.target) if isinstance(node.target, torch._ops.OpOverload) else ""
                if not unbounded and name in UNBOUNDED_WORK_OPS:
                    unbounded = name
                try:
                    if name in _VALIDATORS:
                        try:
                            _VALIDATORS[name](_bind(node.target, a, k))
                        except (ValueError, TypeError, KeyError, IndexError) as e:
                            raise ValueError(f"{name}: {e}") from None
                    if name in DATA_CHECKED_OPS:
                        for c in _data_checks(name, node.target, node.args, dict(node.kwargs), value):
                            if not self._before_launch(c, origin, checks):
                                computed = True
                                unfused = unfused or (
                                    "" if self.cpu and c.cpu_fused_safe else _UNFUSED.format(op=name)
                                )
                    out = _run_meta(node.target, a, k)
                except _Stop:
                    if not unfused and any(_data_checked(n) for n in self._nodes[pos:]):
                        unfused = _UNFUSED.format(op="after a size that depends on data")
                    return Plan(largest_bytes=largest, largest_what=largest_what, input_checks=tuple(checks),
                                unfused=unfused, checks_computed=True)  # fmt: skip
                except Exception as e:  # noqa: BLE001 - whatever the op raises on these arguments
                    if isinstance(e, RuntimeError) and any(w in str(e) for w in _OVERFLOW_WORDS):
                        # Not a shape error: sizes this large are a resource no device has.
                        what = f"{_where(node)} ({_first_line(e)})"
                        return Plan(largest_bytes=OVERFLOW_BYTES, largest_what=what, overflow=what)
                    return Plan(error=f"{_where(node)}: {_first_line(e)}")
                env[node] = out
                usage.op(node, pos, _tensors(a) + _tensors(k), out)
                for t in _fresh(out):
                    nbytes = t.untyped_storage().nbytes()
                    if nbytes > largest:
                        largest, largest_what = nbytes, f"{_where(node)} ({list(t.shape)}, {t.dtype})"
            elif node.op == "output":
                results = torch.fx.map_arg(node.args[0], env.__getitem__)
                total = sum(t.numel() * t.element_size() for t in _tensors(results))
                return Plan(output_bytes=total, largest_bytes=largest, largest_what=largest_what,
                            input_checks=tuple(checks), unfused=unfused, checks_computed=computed,
                            outputs=tuple(results) if isinstance(results, (tuple, list)) else (results,),
                            peak_bytes=usage.peak(), work_bytes=usage.work, unbounded_work=unbounded)  # fmt: skip
        return Plan(unfused=unfused, checks_computed=True)

    def _before_launch(self, c: _DataCheck, origin: dict[torch.fx.Node, tuple[str, Any]], checks: list[_InputCheck]) -> bool:
        """Records a check of inputs and constants for before launch; False when
        an operand is computed by the graph (only the unfused path can check it)."""
        operands = []
        for t in c.operands:
            if not isinstance(t, torch.fx.Node):
                return False
            where = origin.get(t)
            if where is None:
                return False
            operands.append(where)
        checks.append(_InputCheck(tuple(operands), c.test))
        return True

    def _meta_constant(self, target: str) -> torch.Tensor:
        if target not in self._meta_constants:
            t = getattr(self.module, target)
            self._meta_constants[target] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=META)
        return self._meta_constants[target]


class _Usage:
    """What a planned run allocates and touches: each op's fresh results are held
    from the op until the last read of them or of any view of them (results of
    the graph: to the end); views allocate nothing. Work counts the bytes each op
    reads (its tensor arguments as viewed: an expanded view reads all it shows)
    and writes."""

    def __init__(self, last_use: dict[torch.fx.Node, int]) -> None:
        self._last_use = last_use
        self.work = 0
        self._owner: dict[int, torch.fx.Node] = {}  # id of a base tensor -> the node that made it
        self._held: dict[torch.fx.Node, tuple[int, int, int]] = {}  # node -> (from, until, bytes)

    def op(self, node: torch.fx.Node, pos: int, inputs: list[torch.Tensor], out: Any) -> None:
        outputs = _tensors(out)
        if isinstance(node.target, torch._ops.OpOverload):  # not getitem: it picks, it does no work
            self.work += sum(t.numel() * t.element_size() for t in (*inputs, *outputs))
        until = self._last_use[node]
        for t in outputs:
            if id(t) in self._owner:
                # The same tensor again (getitem of a multi-output op): its maker
                # holds it as long as this node's readers read it, no second count.
                owner = self._owner[id(t)]
                start, end, nbytes = self._held[owner]
                self._held[owner] = (start, max(end, until), nbytes)
                continue
            base = t._base if t._is_view() else None
            owner = self._owner.get(id(base)) if base is not None else None
            if owner is not None:
                # A view keeps its base's memory alive as long as it is read.
                start, end, nbytes = self._held[owner]
                self._held[owner] = (start, max(end, until), nbytes)
            elif base is None:
                self._owner[id(t)] = node
                start, end, nbytes = self._held.get(node, (pos, until, 0))
                self._held[node] = (start, end, nbytes + t.untyped_storage().nbytes())

    def peak(self) -> int:
        events: list[tuple[int, int]] = []
        for start, end, nbytes in self._held.values():
            events.append((start, nbytes))
            events.append((end + 1, -nbytes))  # freed after its last reader ran
        live = peak = 0
        for _, delta in sorted(events):
            live += delta
            peak = max(peak, live)
        return peak


def _data_checked(node: torch.fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and ops.op_name(node.target) in DATA_CHECKED_OPS


def warm_up() -> None:
    """Imports what the first plan would: many meta kernels are torch's Python
    references, whose wrapper imports torch._dynamo (and sympy) on first use,
    6 s on the 2-core machine that the first call of a fresh server waited
    for. Run in the background at start (server/app.py), so a server's first
    call finds it done, or waits only for what is left."""
    try:
        import torch._dynamo  # noqa: F401
    except Exception:  # noqa: BLE001 - the first call then imports it, as before
        log.exception("warm-up import failed")


def _run_meta(target: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> Any:
    args = list(_on_meta(args))
    kwargs = _on_meta(kwargs)
    if isinstance(target, torch._ops.OpOverload):
        # A factory op without a device argument allocates on the CPU, for
        # real: every op that takes a device gets the meta device.
        for pos, a in enumerate(target._schema.arguments):
            if a.name in ("device", "pin_memory"):
                value = META if a.name == "device" else None
                if pos < len(args) and not a.kwarg_only:
                    args[pos] = value
                else:
                    kwargs[a.name] = value
    try:
        return target(*args, **kwargs)
    except NotImplementedError as e:
        raise _Stop() from e  # no meta kernel, or one whose result size depends on data
    except RuntimeError as e:
        if "meta" in str(e).lower():  # .item() and friends
            raise _Stop() from e
        raise


def _on_meta(value: Any) -> Any:
    if isinstance(value, torch.device):
        return META
    if isinstance(value, (list, tuple)):
        return type(value)(_on_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_meta(v) for k, v in value.items()}
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _fresh(value: Any) -> list[torch.Tensor]:
    """The tensors an op allocated (not views of its inputs)."""
    return [t for t in _tensors(value) if not t._is_view()]


def _where(node: torch.fx.Node) -> str:
    name = ops.op_name(node.target) if isinstance(node.target, torch._ops.OpOverload) else str(node.target)
    return f"{name} ({node.name})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def device_capacity(device: torch.device) -> int:
    """Bytes of memory the device has: no single tensor can be larger."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
