"""Dynamic batching, proven from the graph: whether calls of one variant at one set of sizes may run as one launch.

A batch stacks the tensor inputs of B calls along a new leading dimension and
runs one kernel over the stack. That is right only when every output of that
kernel is the B outputs of the separate calls, stacked: slice j of each output
depends on slice j of the inputs alone. Batchers that trust a declaration of
the batch dimension mix requests silently when it is wrong; here the claim is
derived from the graph and then checked (`prove`):

1. The variant is traced at the call's concrete sizes (make_fx, fake tensors),
   scalars fixed to the call's values: a plain ATen graph in which size reads
   are constants (``aten::sym_size`` has no batching rule; at fixed sizes it
   needs none). A graph whose shapes depend on data fails here.
2. That graph is transformed by ``torch.func.vmap`` over a new leading dim of
   every tensor input and traced again. vmap refuses what it cannot batch
   (data-dependent control flow, ``.item()``, in-place writes into an input,
   ops without a batching rule); random ops are refused before (a batch would
   draw other numbers than separate calls), and so are graphs that write in
   place into an input or a constant (shared state).
3. The claim is checked on the traced batched graph: every output must have
   the batch dim leading, at two batch sizes, with each call's own output shape
   behind it (vmap guarantees this by construction; the check does not trust it).
4. The batched graph is captured (wire.capture) into the graph IR: a variant of
   its own (its content key; the batch dim symbolic) that the executor compiles
   and serves like any other, unfused until its fused kernel is ready.
5. The captured graph is run once on the call's own inputs: a batch of the call
   twice, and a batch of the call and a permutation of its values. Slice 0 must
   equal the call run alone (within tolerance) and be bit-identical in both
   batches (what slice 1 holds does not reach slice 0), and slice 1 must equal
   the permuted inputs run alone.

A verdict is cached per (variant, sizes and scalar values): the proof runs once,
in the background, and calls run unbatched until it is done. The part that
groups concurrent calls and launches them (`Batcher`) is at the end; it knows
nothing of gRPC either.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fuseport.server.calls import LIGHT_BYTES, LIGHT_FLOPS, Call, Result
from fuseport.server.checks import time_limits
from fuseport.server.compile.interface import short_error
from fuseport.wire._tracing import TRACE_LOCK
from fuseport.wire.errors import DeadlineExceeded, FuseportError

if TYPE_CHECKING:
    from fuseport.server.devices import Placement
    from fuseport.server.executor import Executor
    from fuseport.server.registry import Registry, Variant
    from fuseport.server.settings import Settings
    from fuseport.server.tenants import Tenants

__all__ = ["BatchEvents", "Batcher", "Host", "NotBatchable", "Verdict", "check_batch_leading", "prove", "sizes_key"]

log = logging.getLogger(__name__)

# Verdicts kept (per process): each is one variant at one set of sizes, and holds
# one call's inputs (at most a small request's) and the batched graphs.
_MAX_VERDICTS = 1024
# Sizes proven per variant: a proof costs a second or two of this process's CPU, so a
# client that sends ever new sizes gets that many proofs, and its calls run unbatched after.
_MAX_SIZES_PER_VARIANT = 16
# Proofs waiting for the prover thread at once; past it a call runs unbatched and asks again later.
_MAX_PENDING_PROOFS = 4
# Batch sizes the traced batched graph is checked at (step 3).
_CHECK_SIZES = (2, 3)


@dataclass(frozen=True)
class Verdict:
    """Whether calls of one variant at one set of sizes may be batched; if not, why.

    The batched graph is captured with its batch dim symbolic where export keeps
    it so (`dynamic`: one variant serves every batch size); where an op's
    batching rule pins it, batches are padded up to a power of two (with
    copies of a call of the batch: valid inputs whose results are dropped) and
    each such size has a variant of its own, captured when first needed."""

    batchable: bool
    reason: str = ""  # why not (Describe shows it); "" when batchable
    tensors: tuple[
        int, ...
    ] = ()  # the positions of the tensor inputs, in the order the batched graph takes them
    sizes: str = ""  # the sizes it was proven at, readable
    dynamic: bool = False
    # Batch size (0: any, when dynamic) -> the batched graph as a variant of its own.
    variants: dict[int, Variant] = field(default_factory=dict)
    # Captures and checks the batched graph for one batch size (not dynamic); None once done.
    capture: Callable[[int], Variant] | None = None

    def variant_for(self, size: int) -> tuple[Variant | None, int]:
        """(the variant that runs a batch of `size` calls, the size it takes); None
        when that size's variant is not captured yet."""
        if self.dynamic:
            return self.variants.get(0), size
        padded = 1 << (size - 1).bit_length()
        return self.variants.get(padded), padded


def sizes_key(args: Sequence[Any]) -> tuple[Any, ...]:
    """What a verdict is for, besides the variant: each tensor's shape, each scalar's
    value (floats by repr, so that NaN finds its own verdict)."""
    return tuple(
        a.shape if isinstance(a, torch.Tensor) else repr(a) if isinstance(a, float) else (type(a), a)
        for a in args
    )


def _describe_sizes(args: Sequence[Any]) -> str:
    return ", ".join(
        f"[{','.join(map(str, a.shape))}]" if isinstance(a, torch.Tensor) else repr(a) for a in args
    )


class NotBatchable(Exception):
    """Why a graph is not batched (a Verdict's reason)."""


def prove(
    variant: Variant,
    args: Sequence[Any],
    build: Callable[[Any], Variant],
    opted_out: str = "",
) -> Verdict:
    """The verdict for `variant` called with `args` (one call's inputs, as they
    run: on the device). `build` turns a captured Graph into a Variant (the
    registry's, not stored). `opted_out`: why the kernel is not batched whatever
    the graph (Register's batching=False), if it is not."""
    shown = _describe_sizes(args)
    if opted_out:
        return Verdict(False, opted_out, sizes=shown)
    try:
        with TRACE_LOCK, torch.no_grad():
            tensors, capture_at = _prove(variant, list(args), build)
            batched = capture_at(2)
    except NotBatchable as e:
        return Verdict(False, str(e), sizes=shown)
    except Exception as e:  # noqa: BLE001 - whatever the proof cannot do, the kernel is not batched
        log.debug("batching proof failed", exc_info=e)
        return Verdict(False, f"the proof failed: {short_error(e)}", sizes=shown)
    # One graph for every batch size only where every stacked input's batch dim stayed symbolic.
    dynamic = all(d.shape is not None and d.shape[0] == -1 for d in batched.signature.inputs)
    if dynamic:
        return Verdict(True, "", tensors, shown, True, {0: batched})

    def capture(size: int) -> Variant:
        with TRACE_LOCK, torch.no_grad():
            return capture_at(size)

    return Verdict(True, "", tensors, shown, False, {2: batched}, capture)


def _prove(
    variant: Variant, args: list[Any], build: Callable[[Any], Variant]
) -> tuple[tuple[int, ...], Callable[[int], Variant]]:
    from torch.fx.experimental.proxy_tensor import make_fx

    from fuseport.wire.capture import capture

    if variant.random_ops:
        raise NotBatchable(
            f"it draws random numbers ({', '.join(variant.random_ops)}): one launch would draw other numbers "
            "than separate calls"
        )
    tensors = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    if not tensors:
        raise NotBatchable("it takes no tensor input: there is nothing to stack")
    module = variant.module

    def per_call(*ts: torch.Tensor) -> Any:
        full = list(args)
        for i, t in zip(tensors, ts):
            full[i] = t
        return module(*full)

    own = [args[i] for i in tensors]
    # 1. At these sizes: size reads become constants, shapes that depend on data fail.
    try:
        concrete = make_fx(per_call, tracing_mode="fake")(*own)
    except Exception as e:
        raise NotBatchable(
            f"it cannot be traced at these sizes (shapes that depend on data?): {short_error(e)}"
        ) from e
    _refuse_shared_writes(concrete)
    expected = _output_shapes(concrete)
    if expected is None:
        raise NotBatchable("an output is not a tensor: there is no slice to give each call")
    batched_fn = torch.func.vmap(concrete, in_dims=0, out_dims=0)
    # 2 and 3: vmap transforms it, and every output has the batch dim leading.
    for b in _CHECK_SIZES:
        stacked = [torch.empty((b, *t.shape), dtype=t.dtype, device=t.device) for t in own]
        try:
            traced = make_fx(batched_fn, tracing_mode="fake")(*stacked)
        except Exception as e:
            raise NotBatchable(f"vmap cannot batch it: {short_error(e)}") from e
        _refuse_shared_writes(traced)
        check_batch_leading(traced, expected, b)
    permuted = [_permuted(t) for t in own]

    def capture_at(size: int) -> Variant:
        # 4. The batched graph in the graph IR: what the executor compiles and serves.
        examples = [torch.stack([t, p, *[t] * (size - 2)]) for t, p in zip(own, permuted)]
        try:
            graph = capture(batched_fn, examples)
            batched = build(graph)
        except FuseportError as e:
            raise NotBatchable(f"the batched graph cannot be captured: {e}") from e
        if len(batched.signature.inputs) != len(tensors) or any(
            d.kind != "tensor" or not d.shape or d.shape[0] not in (-1, size)
            for d in batched.signature.inputs
        ):
            raise NotBatchable("the captured batched graph takes other inputs than the stacked tensors")
        # 5. Checked on the call's own values, through the graph that will serve.
        _check_slices(variant, args, tensors, batched, own, permuted, size)
        return batched

    return tensors, capture_at


def check_batch_leading(traced: torch.fx.GraphModule, expected: Sequence[tuple[int, ...]], size: int) -> None:
    """Every output of the batched graph `traced` (a batch of `size`) is the batch dim
    over the call's own output shape (`expected`); raises NotBatchable otherwise."""
    shapes = _output_shapes(traced)
    if shapes is None or len(shapes) != len(expected):
        raise NotBatchable("the batched graph returns other values than the graph")
    for k, (got, want) in enumerate(zip(shapes, expected)):
        if got != (size, *want):
            raise NotBatchable(
                f"output {k} of a batch of {size} has shape {list(got)}, not the batch dim leading over "
                f"{list(want)}: slices would mix"
            )


def _refuse_shared_writes(gm: torch.fx.GraphModule) -> None:
    """In-place writes into an input or a constant (or a view of one): state the
    calls of a batch would share."""
    base: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            base[node] = node
            continue
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        first = next((a for a in node.args if isinstance(a, torch.fx.Node)), None)
        if any(r.alias_info is not None for r in schema.returns) and first is not None and first in base:
            base[node] = base[first]  # a view (or an in-place result) of an input or a constant
        for arg, value in zip(schema.arguments, node.args):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.fx.Node):
                if value in base:
                    raise NotBatchable(
                        f"{node.target} writes in place into {base[value].op} {base[value].target}: "
                        "state the calls of a batch would share"
                    )


def _output_shapes(gm: torch.fx.GraphModule) -> list[tuple[int, ...]] | None:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    shapes = []
    for node in values:
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return None
        if not all(isinstance(s, int) for s in val.shape):
            raise NotBatchable(
                "an output's shape depends on the data: calls of one size may not give one shape"
            )
        shapes.append(tuple(val.shape))
    return shapes


def _permuted(t: torch.Tensor) -> torch.Tensor:
    """The same values in another order: every value stays valid for what it
    was valid for (an index in range, a divisor not zero), but slices differ."""
    flat = t.reshape(-1)
    if flat.numel() < 2:
        return t.clone()
    g = torch.Generator().manual_seed(flat.numel())
    order = torch.randperm(flat.numel(), generator=g).to(t.device)
    return flat[order].reshape(t.shape).clone()


def _check_slices(
    variant: Variant,
    args: list[Any],
    tensors: tuple[int, ...],
    batched: Variant,
    own: list[torch.Tensor],
    permuted: list[torch.Tensor],
    size: int,
) -> None:
    def alone(ts: list[torch.Tensor]) -> list[torch.Tensor] | None:
        full = list(args)
        for i, t in zip(tensors, ts):
            full[i] = t
        try:
            return list(variant.fallback.forward(*full))
        except Exception:  # noqa: BLE001 - inputs the graph refuses prove nothing either way
            return None

    reference = alone(own)
    if reference is None:
        raise NotBatchable("the graph refuses the inputs the proof was given; proven again on other inputs")
    twice = batched.fallback.forward(*[torch.stack([t] * size) for t in own])
    mixed = batched.fallback.forward(*[torch.stack([t, p, *[t] * (size - 2)]) for t, p in zip(own, permuted)])
    other = alone(permuted)
    for k, ref in enumerate(reference):
        if not torch.equal(twice[k][0], mixed[k][0]) and not _same_nan(twice[k][0], mixed[k][0]):
            raise NotBatchable(f"output {k}: slice 0 changed with the other slice's inputs: slices mix")
        if not _close(twice[k][0], ref) or not _close(twice[k][1], ref):
            raise NotBatchable(f"output {k}: a batched slice differs from the call run alone")
        if other is not None and not _close(mixed[k][1], other[k]):
            raise NotBatchable(f"output {k}: slice 1 differs from its inputs run alone")


def _same_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.is_floating_point() and bool(torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The op harness's tolerance (tests/test_ops.py): exact for integers and bools."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not (a.is_floating_point() or a.is_complex()):
        return bool(torch.equal(a, b))
    low = a.dtype in (torch.float16, torch.bfloat16)
    tol = {"rtol": 1.6e-2, "atol": 1e-5} if low else {"rtol": 1e-3, "atol": 1e-4}
    return bool(torch.allclose(a, b, equal_nan=True, **tol))


# --------------------------------------------------------------------------- the batcher


class BatchEvents:
    """What the batcher tells as it happens (server/metrics.py counts it); nothing here.
    Called on the event loop: it must be quick and must not raise."""

    def launched(self, size: int, waited: Sequence[float]) -> None:
        """A batchable kernel ran `size` calls in one launch (1 included); each call
        waited `waited[i]` seconds in the window."""


class Host(Protocol):
    """What the batcher uses of the core that makes it (server/core.py's Core):
    named here, so that the batcher does not import the core back."""

    settings: Settings
    placement: Placement
    executor: Executor
    tenants: Tenants

    def batching_off(self, key: int, registry: Registry | None = None) -> str: ...

    def run(self, call: Call, *, wait: bool = False, deadline: float | None = None) -> Result: ...


@dataclass
class _Member:
    call: Call
    deadline: float | None
    future: asyncio.Future[Result]
    joined: float  # perf_counter when it joined the window


@dataclass
class _Group:
    members: list[_Member] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class Batcher:
    """Groups small Execute calls proven batchable and runs each group as one
    launch. Lives on the event loop: `batch_key` is the one check a call pays
    when it is not batched (a dict lookup of its variant and sizes); `submit`
    waits out the window (or a full batch) and returns the call's own Result or
    raises its own error."""

    def __init__(self, core: Host, window_us: int, max_batch: int) -> None:
        self.core = core
        self.window = window_us / 1e6
        self.max_batch = max_batch
        self.events = BatchEvents()
        self._verdicts: OrderedDict[tuple[Any, ...], Verdict] = OrderedDict()
        self._proving: set[tuple[Any, ...]] = set()
        # (namespace, kernel, variant) -> proofs made (_MAX_SIZES_PER_VARIANT)
        self._proven: dict[tuple[Any, ...], int] = {}
        self._lock = threading.Lock()
        # One proof (and one capture of a padded size) at a time, off the event loop.
        self._prover = ThreadPoolExecutor(1, thread_name_prefix="fuseport-batch-proof")
        self._open: dict[tuple[Any, ...], _Group] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ deciding

    def batch_key(self, call: Call) -> tuple[Any, ...] | None:
        """The group this call may join, or None: run it as it is."""
        if not call.fused or call.keep or call.handles or call.plan.unfused:
            return None
        if not all(a.is_contiguous() for a in call.args if isinstance(a, torch.Tensor)):
            # Stacking makes every call's slice contiguous: a kernel whose values depend on
            # its input's layout (as_strided, the order a sum adds in) would be given
            # another tensor than its caller sent, and the proof saw one layout only.
            return None
        # Per caller's namespace and kernel, not only per graph: the opt-out is a kernel's
        # (Register's batching=False, in its namespace), one namespace's calls never share
        # a launch with another's, and Describe shows a namespace only its own verdicts.
        bkey = (call.owner.tenant, call.key, call.variant.key, sizes_key(call.args))
        verdict = self._verdicts.get(bkey)
        if verdict is None:
            self._start_proof(bkey, call)
            return None
        return bkey if verdict.batchable else None

    def _start_proof(self, bkey: tuple[Any, ...], call: Call) -> None:
        with self._lock:
            if bkey in self._proving or len(self._proving) >= _MAX_PENDING_PROOFS:
                return
            if self._proven.get(bkey[:3], 0) >= _MAX_SIZES_PER_VARIANT:
                return
            self._proving.add(bkey)
        self._prover.submit(self._prove, bkey, call)

    def _prove(self, bkey: tuple[Any, ...], call: Call) -> None:
        try:
            placement = self.core.placement
            with placement.request_scope():
                args = placement.to_device(list(call.args))
                # The opt-out is stored in the namespace that serves the kernel to this caller.
                registry = self.core.tenants.find(call.owner.tenant, call.key)
                verdict = prove(call.variant, args, registry.build_variant, self.core.batching_off(call.key, registry))
        except Exception as e:  # noqa: BLE001 - a proof that breaks leaves the calls unbatched
            log.exception("batching proof of kernel %d failed", call.key)
            verdict = Verdict(False, f"the proof failed: {short_error(e)}", sizes=_describe_sizes(call.args))
        try:
            with self._lock:
                # Again, with forget() held off: a kernel opted out while it was being proven
                # (Register sets its marker, then forgets its verdicts) keeps out of batches.
                registry = self.core.tenants.find(call.owner.tenant, call.key)
                if verdict.batchable and (off := self.core.batching_off(call.key, registry)):
                    verdict = Verdict(False, off, sizes=verdict.sizes)
                self._verdicts[bkey] = verdict
                self._proven[bkey[:3]] = self._proven.get(bkey[:3], 0) + 1
                while len(self._verdicts) > _MAX_VERDICTS:
                    self._verdicts.popitem(last=False)
            if verdict.batchable:
                log.info("kernel %d: batchable at sizes %s", call.key, verdict.sizes)
            else:
                log.info("kernel %d: not batched at sizes %s: %s", call.key, verdict.sizes, verdict.reason)
        finally:
            with self._lock:
                self._proving.discard(bkey)

    def _capture_size(self, bkey: tuple[Any, ...], verdict: Verdict, size: int) -> None:
        try:
            if size not in verdict.variants and verdict.capture is not None:
                verdict.variants[size] = verdict.capture(size)
        except Exception as e:  # noqa: BLE001 - that size runs its calls one by one
            log.info("batched graph for %d calls not captured: %s", size, short_error(e))
            verdict.variants.setdefault(size, None)  # type: ignore[arg-type]
        finally:
            with self._lock:
                self._proving.discard((bkey, size))

    def verdicts(self, tenant: bytes, key: int, variants: Sequence[int]) -> list[tuple[int, Verdict]]:
        """(variant key, verdict) for each verdict of kernel `key`'s calls from namespace
        `tenant` on these variants, for Describe."""
        wanted = set(variants)
        with self._lock:
            return [(k[2], v) for k, v in self._verdicts.items() if k[:2] == (tenant, key) and k[2] in wanted]

    def forget(self, variants: Sequence[int]) -> list[int]:
        """Drops the verdicts of these variants (their kernel's batching changed, or it
        is gone), in every namespace; returns the keys of their batched graphs, whose
        compiled kernels go too."""
        gone = set(variants)
        batched: list[int] = []
        with self._lock:
            for k in [k for k in self._verdicts if k[2] in gone]:
                batched += [v.key for v in self._verdicts.pop(k).variants.values() if v is not None]
            for k in [k for k in self._proven if k[2] in gone]:
                del self._proven[k]
        return batched

    def close(self) -> None:
        # Waits for a proof or capture under way (a second or two at most): tracing
        # must not run on against the torch state of whatever this process does next.
        self._prover.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ batching

    async def submit(self, bkey: tuple[Any, ...], call: Call, deadline: float | None, pool: Any) -> Result:
        loop = asyncio.get_running_loop()
        member = _Member(call, deadline, loop.create_future(), time.perf_counter())
        group = self._open.get(bkey)
        if group is None:
            group = self._open[bkey] = _Group()
            group.timer = loop.call_later(self.window, self._flush, bkey, group, pool)
        group.members.append(member)
        if len(group.members) >= self.max_batch:
            assert group.timer is not None
            group.timer.cancel()
            self._flush(bkey, group, pool)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            # The caller's own deadline: it stops waiting, and its batch goes on without it.
            return await asyncio.wait_for(member.future, timeout)
        except TimeoutError:
            raise DeadlineExceeded("the call's deadline passed while it waited for its batch") from None

    def _flush(self, bkey: tuple[Any, ...], group: _Group, pool: Any) -> None:
        if self._open.get(bkey) is group:
            del self._open[bkey]
        members = [m for m in group.members if not m.future.done()]  # gone: cancelled or past their deadline
        if not members:
            return
        now = time.perf_counter()
        self.events.launched(len(members), [now - m.joined for m in members])
        task = asyncio.get_running_loop().create_task(self._launch(bkey, members, pool))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _launch(self, bkey: tuple[Any, ...], members: list[_Member], pool: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            if len(members) == 1:
                outcomes = [self._run_one(members[0])]  # light (the caller checked): here
            else:
                verdict = self._verdicts.get(bkey)
                variant, size = verdict.variant_for(len(members)) if verdict else (None, 0)
                if verdict is not None and variant is None and size not in verdict.variants:
                    self._start_capture(bkey, verdict, size)
                batch = None if variant is None else self._stacked(verdict, variant, members, size)  # type: ignore[arg-type]
                if batch is None:
                    outcomes = [self._run_one(m) for m in members]
                elif self._inline(variant, batch, members):  # type: ignore[arg-type]
                    outcomes = self._run_batch(variant, batch, members)  # type: ignore[arg-type]
                else:
                    outcomes = await loop.run_in_executor(pool, self._run_batch, variant, batch, members)
        except BaseException as e:  # noqa: BLE001 - every caller hears of it
            outcomes = [e] * len(members)
        for m, out in zip(members, outcomes):
            if m.future.done():
                continue
            if isinstance(out, BaseException):
                m.future.set_exception(out)
            else:
                m.future.set_result(out)

    def _start_capture(self, bkey: tuple[Any, ...], verdict: Verdict, size: int) -> None:
        with self._lock:
            if (bkey, size) in self._proving:
                return
            self._proving.add((bkey, size))
        self._prover.submit(self._capture_size, bkey, verdict, size)

    def _stacked(
        self, verdict: Verdict, variant: Variant, members: list[_Member], size: int
    ) -> list[torch.Tensor] | None:
        """The members' tensor inputs stacked (padded to `size` with copies of the last
        call's), or None where the batched graph does not take them."""
        rows = [m.call.args for m in members]
        rows += [rows[-1]] * (size - len(rows))
        stacked = [torch.stack([r[i] for r in rows]) for i in verdict.tensors]
        for decl, t in zip(variant.signature.inputs, stacked):
            assert decl.shape is not None
            if decl.dtype != t.dtype or len(decl.shape) != t.dim():
                return None
            if any(w >= 0 and w != got for w, got in zip(decl.shape, t.shape)):
                return None
        if not all(cond.holds(stacked) for cond in variant.signature.conditions):
            return None
        return stacked

    def _inline(self, variant: Variant, batch: list[torch.Tensor], members: list[_Member]) -> bool:
        """Whether the launch is light enough for the event loop (as Core.light asks of one call)."""
        rows = batch[0].shape[0]
        plan = members[0].call.plan
        if (plan.work_bytes or 0) * rows > LIGHT_BYTES or (plan.flops or 0) * rows > LIGHT_FLOPS:
            return False
        if self.core.settings.compile_mode == "off":
            return True
        entry = self.core.executor.known(variant, batch)
        return entry is not None and not (entry.compiled is not None and entry.compiled.dynamo)

    def _run_one(self, member: _Member) -> Result | BaseException:
        try:
            return self.core.run(member.call, deadline=member.deadline)
        except Exception as e:  # noqa: BLE001 - the caller's own error, raised to it
            return e

    def _run_batch(self, variant: Variant, batch: list[torch.Tensor], members: list[_Member]) -> list[Any]:
        """One launch for every member; where it fails, each member runs alone
        (its own result, or its own error: a bad input fails its call only)."""
        core = self.core
        started = time.perf_counter_ns()
        deadlines = [m.deadline for m in members]
        deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
        budget = core.settings.max_call_seconds
        budget_end = time.monotonic() + budget if budget else None
        first = members[0].call
        try:
            with core.placement.request_scope(), time_limits(deadline, budget_end):
                outcome = core.executor.run(first.key, variant, core.placement.to_device(batch), fused=True)
                outputs = core.placement.to_host(outcome.outputs)
                core.placement.synchronize()
        except Exception as e:  # noqa: BLE001 - the members say whose fault it was, one by one
            log.info(
                "kernel %d: a batch of %d failed (%s); its calls run one by one",
                first.key,
                len(members),
                short_error(e),
            )
            return [self._run_one(m) for m in members]
        elapsed = time.perf_counter_ns() - started
        return [
            Result(
                m.call.below + [o[j] for o in outputs],
                outcome.path,
                outcome.reason,
                outcome.detail,
                (m.call.prepare_ns + elapsed) // 1000,
                m.call.variant.key,
            )  # fmt: skip
            for j, m in enumerate(members)
        ]
