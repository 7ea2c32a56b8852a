"""Running kernels: ArgSpecs, the bounded cache of fused kernels, background compiles, fallback.

Like the legacy fuser's runFusion, a fused kernel is looked up by the ArgSpec of
the inputs (per tensor: dtype, rank, memory order and which dims are 0 or 1;
per int or bool: its kind; per float: its value; plus the device). Sizes are
not part of it: kernels are compiled with dynamic shapes. A new ArgSpec starts
a compile on the compile thread (at most _MAX_PENDING_COMPILES queued) and the
request runs the fallback meanwhile (unless it asked to wait).
Whatever stops the fused kernel from running (compile error, recompile limit,
an error at run time that the fallback does not share) is recorded on the
ArgSpec's entry and served by the fallback from then on.
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx._symbolic_trace import is_fx_tracing

from fuseport.server.checks import DataError, OutOfTime
from fuseport.server.compile import Compiled, CompileFailed, Compiler, Job, LoadRefused, short_error
from fuseport.server.compile.inprocess import InProcessCompiler
from fuseport.server.compile.torch_config import configure_compiler
from fuseport.server.devices import Placement, is_out_of_memory
from fuseport.server.registry import Variant
from fuseport.wire import _pb
from fuseport.wire._tracing import TRACE_LOCK
from fuseport.wire.errors import DeadlineExceeded, ExecutionFailed, ResourceExhausted

__all__ = ["ArgSpec", "Entry", "Executor", "ExecutorEvents", "State", "arg_spec_of"]

log = logging.getLogger(__name__)

Reason = _pb.service.FallbackReason

# Compiles queued at once; past it a new ArgSpec runs the fallback and asks again next time.
_MAX_PENDING_COMPILES = 32

_DTYPE_SHORT = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "b8", torch.complex64: "c64", torch.complex128: "c128",
}  # fmt: skip

# While any thread of the process is inside a torch.fx trace (every compile has
# some, every export is one), Dynamo refuses to run compiled code: it raises
# this. That says nothing of the kernel: the call runs unfused, the ArgSpec stays.
_NESTED_TRACE = "symbolically trace a dynamo-optimized function"
_TRACING = "a compile in this process is tracing; this call ran unfused"
_DISCARDED = "the kernel was unregistered while this compile ran; its result was discarded"


class _QuietFxTracing(logging.Filter):
    """Drops torch's one-time "is_fx_tracing will return true for both fx.symbolic_trace and
    torch.export ..." warning. torch logs it (torch.fx._symbolic_trace, WARNING) the first time
    anyone calls is_fx_tracing(), and the executor calls it before a torch.compile kernel's
    first fused call: it reached the operator's terminal after the first compile although it
    is advice to torch's callers about an API, and the executor wants exactly what the
    function answers (any trace at all, export included). Only that message is dropped: the
    logger's other records still go through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("is_fx_tracing will return true")


logging.getLogger("torch.fx._symbolic_trace").addFilter(_QuietFxTracing())


@dataclass(frozen=True)
class ArgSpec:
    """What a fused kernel is specialised on. `inputs` holds, per input, either
    (dtype, rank, dim order, size classes) for a tensor or the scalar's kind."""

    device: str
    inputs: tuple[Any, ...]

    def __str__(self) -> str:
        parts = []
        for item in self.inputs:
            if isinstance(item, str):
                parts.append(item)
                continue
            dtype, rank, order, sizes = item
            name = _DTYPE_SHORT.get(dtype, str(dtype).removeprefix("torch."))
            if order is None:
                layout = "s"  # strided: not dense in any order
            else:
                layout = "c" if order == tuple(range(rank)) else "p" + "".join(map(str, order))
            parts.append(f"{name}[{','.join(sizes)}]{layout}")
        return f"{self.device}; " + ", ".join(parts)


_IDENTITY = tuple(tuple(range(n)) for n in range(9))


def _dim_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """Dims from outermost to innermost in memory (size-1 dims keep their place),
    or None if the tensor is not dense in that order (a slice with gaps, an
    expanded view): compiled code assumes the dense strides of its order."""
    if t.is_contiguous():  # the common case, decided in C
        return _IDENTITY[t.dim()] if t.dim() < len(_IDENTITY) else tuple(range(t.dim()))
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d) if t.shape[d] > 1 else 0, d)))
    step = 1
    for d in reversed(order):
        if t.shape[d] > 1 and t.stride(d) != step:
            return None
        step *= t.shape[d]
    return order


def arg_spec_of(args: Sequence[Any], device: torch.device) -> ArgSpec:
    items: list[Any] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sizes = tuple("0" if s == 0 else "1" if s == 1 else "n" for s in a.shape)
            items.append((a.dtype, a.dim(), _dim_order(a), sizes))
        elif isinstance(a, float):
            items.append(f"float={a!r}")  # see torch_config.configure_compiler
        elif isinstance(a, bool) or (isinstance(a, int) and a in (0, 1)):
            # Compiled as constants, as sizes 0 and 1 are (the ShapeEnv specialises them).
            items.append(f"{type(a).__name__}={a!r}")
        else:
            items.append(type(a).__name__)
    return ArgSpec(device=str(device), inputs=tuple(items))


class State(enum.Enum):
    COMPILING = _pb.service.COMPILE_STATE_COMPILING
    READY = _pb.service.COMPILE_STATE_READY
    FAILED = _pb.service.COMPILE_STATE_FAILED


@dataclass(eq=False)
class Entry:
    """One fused kernel (or the memory of why there is none) for (variant, ArgSpec)."""

    key: int  # the variant's content key
    arg_spec: ArgSpec
    state: State = State.COMPILING
    compiled: Compiled | None = None
    reason: int = _pb.service.FALLBACK_REASON_COMPILING
    error: str = ""
    source: str = ""
    compile_seconds: float = 0.0
    compiled_by: str = ""  # the compiler that made it (and why, for the in-process fallback)
    from_cache: bool = False  # loaded from the artifact cache, not compiled here
    fused_runs: int = 0
    fallback_runs: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def fail(self, reason: int, error: str) -> None:
        self.compiled = None
        self.reason = reason
        self.error = error
        self.state = State.FAILED


@dataclass
class Outcome:
    outputs: list[Any]
    path: int
    reason: int = _pb.service.FALLBACK_REASON_UNSPECIFIED
    detail: str = ""


@dataclass(frozen=True)
class _Run:
    """Which kernel a run counts for, and which of its variants runs."""

    key: int
    variant: Variant


def _variant_name(spec: _Run) -> str:
    return "it" if spec.variant.key == spec.key else f"variant {spec.variant.key}"


def _strided(arg_spec: ArgSpec) -> bool:
    return any(not isinstance(item, str) and item[2] is None for item in arg_spec.inputs)


class ExecutorEvents:
    """What the executor tells as it happens, for whoever counts (server/metrics.py
    overrides these); here they do nothing, so an executor without a listener
    pays one call per compile or eviction. Called from the compile thread or
    under the cache lock: they must be quick and must not raise."""

    def compiled(self, seconds: float, ok: bool) -> None:
        """A compile ended: a fused kernel is ready (ok) or the ArgSpec is served unfused."""

    def evicted(self) -> None:
        """A compiled kernel left the cache to keep it within its bounds."""

    def loaded(self, ok: bool) -> None:
        """An artifact was read from the artifact cache: loaded (ok), or refused as damaged."""


class Executor:
    def __init__(
        self,
        placement: Placement,
        compile_mode: str = "default",
        max_kernels: int = 256,
        max_arg_specs: int = 16,
        *,
        compiler: Compiler | None = None,
    ) -> None:
        """`compiler`: the strategy (compile.make_compiler); None: torch.compile in process.
        With compile mode "off" nothing is ever compiled."""
        self.placement = placement
        self.compile_mode = compile_mode
        self.max_kernels = max_kernels
        self.max_arg_specs = max_arg_specs
        self._in_process = InProcessCompiler(placement, compile_mode)
        self.compiler = compiler if compiler is not None else self._in_process
        self._entries: OrderedDict[tuple[int, ArgSpec], Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._counts: dict[int, list[int]] = {}
        self._fallbacks_said: set[tuple[int, int]] = set()  # (key, reason) logged at INFO
        self.events = ExecutorEvents()
        # One compile at a time: a single thread keeps compiles (and, in process,
        # Dynamo's global lock) from starving request threads.
        self._compile_thread = ThreadPoolExecutor(1, thread_name_prefix="fuseport-compile")
        if compile_mode != "off":
            # The first meta-device op imports torch's Python meta kernels (sympy
            # and more: seconds, tens on a busy CPU), and every call is planned
            # on the meta device (server/checks.py): paid now, not by the first request.
            meta = torch.empty(2, 2, device="meta")
            torch.relu(meta * 2 + meta)
            # The compiler's imports and set-up too (Inductor's loader for artifacts:
            # seconds), before the server says SERVING: a restarted server's first call
            # of a known ArgSpec then loads its artifact in milliseconds and runs fused
            # (it waited 3.7 s behind this import when it ran in the background).
            # torch.compile in process warms up on the compile thread instead (10-20 s
            # of C++ header on CPU: requests run the fallback meanwhile).
            if self.compiler is self._in_process:
                self._compile_thread.submit(self.compiler.warm_up)
            else:
                self.compiler.warm_up()

    # ------------------------------------------------------------------ running

    def run(
        self,
        key: int,
        variant: Variant,
        args: list[Any],
        *,
        fused: bool,
        unfused: str = "",
        wait: bool = False,
        deadline: float | None = None,
        entry: Entry | None = None,
    ) -> Outcome:
        """Runs `variant` of kernel `key` on device-resident `args`: fused when it
        can, else the fallback. `unfused` says why these inputs must take the
        unfused path (its data checks are the only ones that apply), if they must.
        `entry`: the args' entry, when the caller looked it up already (`known`):
        used as it is, even if evicted meanwhile, so that nothing is loaded here."""
        spec = _Run(key, variant)
        if not fused:
            return self._fallback(spec, args, _pb.service.FALLBACK_REASON_REQUESTED, "", None)
        if self.compile_mode == "off":
            return self._fallback(spec, args, _pb.service.FALLBACK_REASON_DISABLED, "compile mode is off", None)
        if unfused:
            return self._fallback(spec, args, _pb.service.FALLBACK_REASON_UNSUPPORTED, unfused, None)
        if entry is None:
            entry = self._entry(spec, args)
        if entry.state is State.COMPILING and wait:  # where the caller did not wait_compiled first
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not entry.done.wait(timeout):
                raise DeadlineExceeded(f"deadline passed while kernel {key} compiled")
        fn = entry.compiled  # once: another thread may fail the entry meanwhile
        if entry.state is not State.READY or fn is None:
            detail = "fused kernel is compiling" if entry.state is State.COMPILING else entry.error
            return self._fallback(spec, args, entry.reason, detail, entry)
        for cond in fn.conditions:
            if not cond.holds(args):
                # What the compiler assumed of the sizes does not hold for these:
                # the kernel could compute something else (or read out of bounds).
                detail = f"the fused kernel was compiled for sizes where {cond.text}; these are not"
                return self._fallback(spec, args, _pb.service.FALLBACK_REASON_UNSUPPORTED, detail, entry)
        if not fn.dynamo:
            return self._call_fused(spec, args, entry, fn)
        configure_compiler()  # a torch.compile kernel: a guard failure may recompile here
        # Dynamo refuses to run its code while a trace runs.
        if is_fx_tracing():
            if not wait:
                return self._fallback(spec, args, _pb.service.FALLBACK_REASON_COMPILING, _TRACING, entry)
            # The caller waits for the fused kernel. fuseport's own traces (compiles,
            # captures) hold TRACE_LOCK: taking it waits them out and keeps new ones off.
            with TRACE_LOCK:
                return self._call_fused(spec, args, entry, fn)
        return self._call_fused(spec, args, entry, fn)

    def _call_fused(self, spec: _Run, args: list[Any], entry: Entry, fn: Compiled) -> Outcome:
        try:
            outputs = fn.call(args)
        except Exception as e:
            if is_out_of_memory(e):
                self._out_of_memory(spec, e)
            if is_fx_tracing() or _NESTED_TRACE in str(e):  # a trace began after the check
                return self._fallback(spec, args, _pb.service.FALLBACK_REASON_COMPILING, _TRACING, entry)
            return self._after_fused_error(spec, args, entry, e)
        self._count(spec.key, entry, fused=True)
        return Outcome(list(outputs), _pb.service.PATH_FUSED)

    def _after_fused_error(self, spec: _Run, args: list[Any], entry: Entry, e: Exception) -> Outcome:
        dynamo = sys.modules.get("torch._dynamo")  # not imported where only artifacts run
        if dynamo is not None and isinstance(e, dynamo.exc.FailOnRecompileLimitHit):
            reason = _pb.service.FALLBACK_REASON_RECOMPILE_LIMIT
        else:
            reason = _pb.service.FALLBACK_REASON_RUNTIME_ERROR
        # If the fallback fails too, the inputs are at fault (shapes that do
        # not broadcast, ...) and the kernel stays in service.
        outcome = self._fallback(spec, args, reason, short_error(e), entry)
        entry.fail(reason, short_error(e))
        log.warning(
            "kernel %d [%s]: fused kernel failed where the fallback did not; this ArgSpec "
            "is served by the fallback from now on: %s",
            spec.key,
            entry.arg_spec,
            short_error(e),
        )
        log.debug("fused failure", exc_info=e)
        return outcome

    def wait_compiled(self, key: int, variant: Variant, args: list[Any], deadline: float | None) -> Entry | None:
        """The fused kernel's entry for `args`, once its compile (started here if none
        has) is over: what `run(wait=True)` waits for, waited for apart, so that a
        call's time limits count its run, not the wait. None with compiling off."""
        if self.compile_mode == "off":
            return None
        entry = self._entry(_Run(key, variant), args)
        if entry.state is State.COMPILING:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not entry.done.wait(timeout):
                raise DeadlineExceeded(f"deadline passed while kernel {key} compiled")
        return entry

    def _fallback(
        self, spec: _Run, args: list[Any], reason: int, detail: str, entry: Entry | None
    ) -> Outcome:
        try:
            outputs = spec.variant.fallback.forward(*args)  # not __call__: see _compile
        except OutOfTime:
            raise  # the call's time is up (Core.run says whose), not the kernel's failure
        except Exception as e:
            if is_out_of_memory(e):
                self._out_of_memory(spec, e)
            raise ExecutionFailed(f"kernel {spec.key} failed on these inputs: {short_error(e)}") from e
        self._count(spec.key, entry, fused=False)
        if reason not in (_pb.service.FALLBACK_REASON_REQUESTED,):
            # Once per kernel and reason at INFO; every call at DEBUG. Per call it was
            # 10k lines a minute with --compile-mode off (the metrics count them all).
            said = (spec.key, reason)
            first = said not in self._fallbacks_said
            if first:
                if len(self._fallbacks_said) >= 100_000:
                    self._fallbacks_said.clear()
                self._fallbacks_said.add(said)
            log.log(logging.INFO if first else logging.DEBUG,
                    "kernel %d: fallback (%s) %s", spec.key, Reason.Name(reason), detail)  # fmt: skip
        return Outcome(list(outputs), _pb.service.PATH_FALLBACK, reason, detail)

    def _out_of_memory(self, spec: _Run, e: BaseException) -> None:
        self.placement.release_memory()
        raise ResourceExhausted(
            f"{self.placement.device} out of memory running kernel {spec.key}; memory was released: {short_error(e)}"
        ) from e

    def _count(self, key: int, entry: Entry | None, *, fused: bool) -> None:
        with self._lock:  # += from several threads would lose counts
            counts = self._counts.setdefault(key, [0, 0])
            counts[0 if fused else 1] += 1
            if entry is not None:
                if fused:
                    entry.fused_runs += 1
                else:
                    entry.fallback_runs += 1

    # ------------------------------------------------------------------ cache

    def _entry(self, spec: _Run, args: list[Any]) -> Entry:
        arg_spec = arg_spec_of(args, self.placement.device)
        vkey = spec.variant.key
        ident = (vkey, arg_spec)
        with self._lock:
            entry = self._entries.get(ident)
            if entry is not None:
                self._entries.move_to_end(ident)
                return entry
            pending = sum(e.state is State.COMPILING for e in self._entries.values())
            if pending >= _MAX_PENDING_COMPILES:
                # Not stored: a later request of this ArgSpec tries again. Keeps
                # a client that sends ever new ArgSpecs (a float input with a
                # new value each call) from queueing compiles without end.
                busy = Entry(vkey, arg_spec)
                busy.fail(
                    _pb.service.FALLBACK_REASON_COMPILING,
                    f"{pending} compiles are queued; this one waits its turn",
                )
                return busy
            entry = Entry(vkey, arg_spec)
            self._entries[ident] = entry
            self._evict(vkey)
        if self._load(spec, entry):
            return entry
        log.info("kernel %d: compiling %s for [%s]", spec.key, _variant_name(spec), arg_spec)
        self._compile_thread.submit(self._compile, spec, entry, args, self.placement.share(args))
        return entry

    def _evict(self, key: int) -> None:
        """Drops least recently used entries past the bounds (never one compiling)."""
        for bound, only_key in ((self.max_arg_specs, True), (self.max_kernels, False)):
            # Listed afresh for each bound: the first pass may have removed some.
            candidates = [k for k in self._entries if not only_key or k[0] == key]
            excess = len(candidates) - bound
            for ident in candidates:
                if excess <= 0:
                    break
                if self._entries[ident].state is not State.COMPILING:
                    log.info("kernel %d: evicting compiled kernel for [%s]", ident[0], ident[1])
                    del self._entries[ident]
                    self.events.evicted()
                    excess -= 1

    # ------------------------------------------------------------------ compiling

    def _load(self, spec: _Run, entry: Entry) -> bool:
        """Makes `entry` READY from the compiler's cache (an artifact compiled by
        this process, an earlier one, or another sharing the cache): milliseconds, no compile."""
        try:
            compiled = self.compiler.load(Job(spec.key, spec.variant, entry.arg_spec))
        except LoadRefused as e:
            log.warning("kernel %d [%s]: %s; compiling again", spec.key, entry.arg_spec, e)
            self.events.loaded(False)
            return False
        if compiled is None:
            return False
        self._ready(spec, entry, compiled)
        entry.done.set()
        self.events.loaded(True)
        return True

    def _ready(self, spec: _Run, entry: Entry, compiled: Compiled) -> None:
        entry.compiled = compiled
        entry.source = compiled.source
        entry.compiled_by = entry.compiled_by or compiled.compiled_by
        entry.from_cache = compiled.from_cache
        entry.reason = _pb.service.FALLBACK_REASON_UNSPECIFIED
        entry.state = State.READY
        how = "loaded" if compiled.from_cache else f"compiled in {entry.compile_seconds:.1f} s"
        log.info("kernel %d: %s for [%s] (%s)", spec.key, how, entry.arg_spec, entry.compiled_by)

    def _compile(self, spec: _Run, entry: Entry, sample: list[Any], receive: Any) -> None:
        """On the compile thread: the strategy's compile, torch.compile in process
        for what the strategy cannot take, then the entry is READY or FAILED."""
        start = time.perf_counter()
        job = Job(spec.key, spec.variant, entry.arg_spec)
        compiled: Compiled | None = None
        try:
            try:
                if self.compiler is not self._in_process and _strided(entry.arg_spec):
                    raise CompileFailed(
                        "a tensor input is not dense in its dim order", retry_in_process=True
                    )
                compiled = self.compiler.compile(job, sample, receive)
            except CompileFailed as e:
                if not e.retry_in_process:
                    raise
                log.info("kernel %d [%s]: torch.compile in process: %s", spec.key, entry.arg_spec, e)
                entry.compiled_by = f"{self._in_process.name}: {e}"
                compiled = self._in_process.compile(job, sample, receive)
            if compiled.dynamo:
                # The sample ran fused to compile. Inductor computes where eager
                # refuses the ArgSpec itself (a bitwise op on floats, softmax on
                # ints): bits, not an answer. The error stands on both paths.
                refused = self._unfused_error(spec, sample)
                if refused is not None and not isinstance(refused, DataError):
                    raise CompileFailed(f"the unfused graph refuses these inputs: {short_error(refused)}")
            entry.compile_seconds = time.perf_counter() - start
            with self._lock:  # against forget(): installed only if still in the cache
                current = self._entries.get((entry.key, entry.arg_spec)) is entry
                if current:
                    self._ready(spec, entry, compiled)
            if not current:
                # Unregistered while it compiled (forget() dropped the entry): the kernel
                # is gone, so nothing is installed and nothing says "compiled". Callers
                # still waiting on the entry run the fallback they hold.
                entry.fail(_pb.service.FALLBACK_REASON_COMPILE_FAILED, _DISCARDED)
                log.info(
                    "kernel %d: compile for [%s] discarded after %.1f s: the kernel was unregistered meanwhile",
                    spec.key, entry.arg_spec, entry.compile_seconds,
                )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - any compile failure is served by the fallback
            entry.compile_seconds = time.perf_counter() - start
            ran_sample = self.compiler is self._in_process or bool(entry.compiled_by)
            if compiled is None and ran_sample and self._unfused_error(spec, sample) is not None:
                # Compiled in process on the request's own inputs, which were bad
                # (shapes that do not broadcast): that says nothing of the kernel.
                # Forget the entry so that the next request compiles again.
                with self._lock:
                    if self._entries.get((entry.key, entry.arg_spec)) is entry:
                        del self._entries[(entry.key, entry.arg_spec)]
                entry.fail(
                    _pb.service.FALLBACK_REASON_COMPILE_FAILED, f"the inputs it was compiled with were invalid: {e}"
                )
            else:
                entry.fail(_pb.service.FALLBACK_REASON_COMPILE_FAILED, str(e) if isinstance(e, CompileFailed) else short_error(e))
                log.info("kernel %d: compile failed for [%s]: %s", spec.key, entry.arg_spec, entry.error)
                log.debug("compile failure", exc_info=e)
        finally:
            # Counted before the waiting callers are woken: whoever they tell sees the count.
            # A discarded compile is neither outcome (nothing failed; nothing is ready).
            if entry.error != _DISCARDED:
                self.events.compiled(entry.compile_seconds, entry.state is State.READY)
            entry.done.set()

    def _unfused_error(self, spec: _Run, sample: list[Any]) -> Exception | None:
        """What the unfused graph raises on the compile's sample, if anything.
        A DataError is about these values only; anything else about the ArgSpec."""
        try:
            with self.placement.request_scope():
                spec.variant.fallback.forward(*sample)
                self.placement.synchronize()
        except Exception as e:  # noqa: BLE001 - any failure of the unfused graph is the answer
            return e
        return None

    # ------------------------------------------------------------------ inspection

    def known(self, variant: Variant, args: Sequence[Any]) -> Entry | None:
        """The entry of these inputs' ArgSpec if this process has one already (loaded,
        compiling or failed); None if a call would first load or start a compile."""
        arg_spec = arg_spec_of(args, self.placement.device)
        with self._lock:
            return self._entries.get((variant.key, arg_spec))

    def entries(self, variant: int) -> list[Entry]:
        """The ArgSpecs of one variant (by its content key)."""
        with self._lock:
            return [e for (k, _), e in self._entries.items() if k == variant]

    def cache_states(self) -> dict[State, int]:
        """How many cached entries are in each state (compiling, ready, failed)."""
        with self._lock:
            states = [e.state for e in self._entries.values()]
        return {state: states.count(state) for state in State}

    def counts(self, key: int) -> tuple[int, int]:
        fused, fallback = self._counts.get(key, (0, 0))
        return fused, fallback

    def forget(self, key: int, variants: Sequence[int]) -> None:
        """Frees the compiled kernels of `variants` and kernel `key`'s counts (Unregister)."""
        gone = set(variants)
        with self._lock:
            for ident in [i for i in self._entries if i[0] in gone]:
                del self._entries[ident]
        self._counts.pop(key, None)

    def shutdown(self) -> None:
        """Stops compiling; calls waiting for a compile get the fallback at once."""
        self._compile_thread.shutdown(wait=False, cancel_futures=True)
        self.compiler.close()
        with self._lock:
            waiting = [e for e in self._entries.values() if e.state is State.COMPILING]
        for entry in waiting:
            entry.fail(_pb.service.FALLBACK_REASON_COMPILE_FAILED, "the server is shutting down")
            entry.done.set()
