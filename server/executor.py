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

import copy
import enum
import logging
import os
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from torch.fx._symbolic_trace import is_fx_tracing

from fuseport.server._files import is_disk_full
from fuseport.server.artifacts import ArtifactCache, ArtifactError, device_capability
from fuseport.server.checks import DataError
from fuseport.server.compiler import CompileCrashed, CompileTimedOut, CompileWorker, package_source
from fuseport.server.devices import Placement, is_out_of_memory
from fuseport.server.registry import Variant
from fuseport.wire import _pb, dtypes
from fuseport.wire._tracing import TRACE_LOCK
from fuseport.wire.errors import DeadlineExceeded, ExecutionFailed, ResourceExhausted

__all__ = ["ArgSpec", "Entry", "Executor", "ExecutorEvents", "State", "arg_spec_of"]

log = logging.getLogger(__name__)

Path = _pb.service.Path
Reason = _pb.service.FallbackReason

# Compiles queued at once; past it a new ArgSpec runs the fallback and asks again next time.
_MAX_PENDING_COMPILES = 32

_DTYPE_SHORT = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "b8", torch.complex64: "c64", torch.complex128: "c128",
}  # fmt: skip


# Ops whose Inductor lowering computes something else than the ATen kernel
# does, found by tests/test_ops.py's differential runs (torch 2.13, CPU):
# float remainder and fmod through a / b overflow for tiny divisors (1 % 1e-45
# gave -inf, eager 0) and disagree on infinities (1 % inf: nan, eager 1); the
# rounding modes of div disagree on zero and infinite divisors. Inductor calls
# the ATen kernel for these instead (the rest of the graph still fuses).
_EAGER_KERNELS = (
    "div.Tensor_mode", "div.Scalar_mode", "remainder.Tensor", "remainder.Scalar", "fmod.Tensor", "fmod.Scalar",
    # acosh(x) as log(x + sqrt(x*x - 1)) is inf past 1e19 (eager: 89.4 at 1e38);
    # the sampler's decomposition reads NaN coordinates as 0.
    "acosh.default", "grid_sampler_2d.default",
)  # fmt: skip
# Part of the key of Inductor's on-disk cache: code compiled before these
# rules (by an older fuseport, or by plain torch) is never reused.
_CACHE_TAG = "fuseport-kernels-3"
_kernels_registered = False
# While any thread of the process is inside a torch.fx trace (every compile has
# some, every export is one), Dynamo refuses to run compiled code: it raises
# this. That says nothing of the kernel: the call runs unfused, the ArgSpec stays.
_NESTED_TRACE = "symbolically trace a dynamo-optimized function"
_TRACING = "a compile in this process is tracing; this call ran unfused"


def _register_eager_kernels() -> None:
    """Once per process: Inductor's lowering table is global."""
    global _kernels_registered
    if _kernels_registered:
        return
    from torch._inductor import decomposition, lowering

    for name in _EAGER_KERNELS:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.aten, packet), overload)
        decomposition.decompositions.pop(op, None)
        lowering.make_fallback(op, warn=False, override_decomp=True)
    _kernels_registered = True


def _configure_compiler() -> None:
    """Dynamo's settings for this thread (and asyncio task). torch's config
    values set by assignment live in ContextVars: a setting made on one thread
    is not seen by another, so every thread that compiles or calls a compiled
    kernel (where a guard failure recompiles) runs this first; it costs one read
    when the settings are already in place."""
    if torch._dynamo.config.specialize_float:
        return
    # A guard failure past the recompile limit must raise, not silently run
    # eager code that we would report as FUSED.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    # Equal sizes in the first call must not become an equality guard (duck
    # shaping): a (4, 4) input would otherwise recompile for (4, 8).
    import torch.fx.experimental._config as fx_config

    fx_config.use_duck_shape = False
    # A float input compiled as a symbolic value can be silently baked in at
    # the value of the first call (clamp(x * a, max=a) keeps the first a:
    # pytorch/pytorch#194976, #197889; torch 2.11-2.14 on CPU and CUDA). So
    # floats are compiled as constants, guarded, and the ArgSpec holds the
    # value: each value compiles in the background like any new ArgSpec.
    torch._dynamo.config.specialize_float = True
    if hasattr(torch.compiler.config, "cache_key_tag"):
        torch.compiler.config.cache_key_tag = _CACHE_TAG


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
            dtype, _rank, order, sizes = item
            name = _DTYPE_SHORT.get(dtype, str(dtype).removeprefix("torch."))
            layout = "c" if order == tuple(range(len(order))) else "p" + "".join(map(str, order))
            parts.append(f"{name}[{','.join(sizes)}]{layout}")
        return f"{self.device}; " + ", ".join(parts)


def _dim_order(t: torch.Tensor) -> tuple[int, ...]:
    """Dims from outermost to innermost in memory; size-1 dims keep their place."""
    return tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d) if t.shape[d] > 1 else 0, d)))


def arg_spec_of(args: Sequence[Any], device: torch.device) -> ArgSpec:
    items: list[Any] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sizes = tuple("0" if s == 0 else "1" if s == 1 else "n" for s in a.shape)
            items.append((a.dtype, a.dim(), _dim_order(a), sizes))
        elif isinstance(a, float):
            items.append(f"float={a!r}")  # see _configure_compiler
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
    fn: Callable[..., Any] | None = None
    reason: int = Reason.FALLBACK_REASON_COMPILING
    error: str = ""
    source: str = ""
    compile_seconds: float = 0.0
    compiled_by: str = ""  # "aoti", or why torch.compile made it in this process
    from_cache: bool = False  # loaded from the artifact cache, not compiled here
    fused_runs: int = 0
    fallback_runs: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def fail(self, reason: int, error: str) -> None:
        self.fn = None
        self.reason = reason
        self.error = error
        self.state = State.FAILED


@dataclass
class Outcome:
    outputs: list[Any]
    path: int
    reason: int = Reason.FALLBACK_REASON_UNSPECIFIED
    detail: str = ""


@dataclass(frozen=True)
class _Run:
    """Which kernel a run counts for, and which of its variants runs."""

    key: int
    variant: Variant


def _variant_name(spec: _Run) -> str:
    return "it" if spec.variant.key == spec.key else f"variant {spec.variant.key}"


def _short(e: BaseException) -> str:
    """First line of an exception, for responses (full text goes to the log)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


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


def _aot_unsuitable(arg_spec: ArgSpec, compile_mode: str) -> str:
    """Why this ArgSpec cannot take the AOTInductor path ("" if it can)."""
    if compile_mode == "reduce-overhead":
        return "compile mode reduce-overhead uses CUDA graphs, which AOTInductor does not make"
    for item in arg_spec.inputs:
        if isinstance(item, str):
            if not item.startswith("float="):
                # An int or bool would be baked in by export at the value of
                # the first call, and the ArgSpec does not hold it.
                return f"an input of kind {item} (AOTInductor takes tensors and floats)"
        elif item[2] != tuple(range(item[1])):
            return (
                "a non-contiguous tensor input (AOTInductor's code assumes the strides it was compiled for)"
            )
    return ""


class Executor:
    def __init__(
        self,
        placement: Placement,
        compile_mode: str = "default",
        max_kernels: int = 256,
        max_arg_specs: int = 16,
        *,
        artifacts: ArtifactCache | None = None,
        compile_timeout: float = 600.0,
    ) -> None:
        # With a cache, kernels compile in a worker process into AOTInductor
        # artifacts; without one (compiler "inprocess"), torch.compile here.
        self.artifacts = artifacts if compile_mode != "off" else None
        self._worker = CompileWorker(compile_timeout) if self.artifacts is not None else None
        if self._worker is not None:
            # AOTInductor checks each call's sizes, strides and dtypes against
            # what it was compiled for only when this is set (read once per
            # library): a call that breaks an assumption raises, never reads
            # out of bounds.
            os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"
            self._capability = device_capability(placement.device)
            self._worker.start()
            # The first meta-device op imports torch's Python meta kernels (sympy
            # and more: seconds, tens on a busy CPU), and every call is planned
            # on the meta device (server/checks.py). Importing Inductor paid for it
            # before; now nothing would until the first request, which must not
            # wait (a warm restart runs its first call fused within a second).
            meta = torch.empty(2, 2, device="meta")
            torch.relu(meta * 2 + meta)
        if compile_mode != "off" and self._worker is None:
            # Both import Dynamo and Inductor: seconds of CPU that a server which
            # never compiles here need not spend at start (with a compile worker,
            # only an ArgSpec compiled in-process imports them, on first use).
            _register_eager_kernels()
            _configure_compiler()
        self.placement = placement
        self.compile_mode = compile_mode
        self.max_kernels = max_kernels
        self.max_arg_specs = max_arg_specs
        self._entries: OrderedDict[tuple[int, ArgSpec], Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._counts: dict[int, list[int]] = {}
        self._fallbacks_said: set[tuple[int, int]] = set()  # (key, reason) logged at INFO
        self.events = ExecutorEvents()
        # One compile at a time: Dynamo compiles under a global lock anyway, and
        # a single thread keeps compiles from starving request threads.
        self._compiler = ThreadPoolExecutor(1, thread_name_prefix="fuseport-compile")
        if compile_mode != "off" and self._worker is None:
            # Inductor's first compile in a process imports and builds much (the
            # C++ header on CPU: 10-20 s); done now, in the background, it does
            # not stall the first real compile or requests behind it. (The
            # compile worker warms itself up.)
            self._compiler.submit(self._warm_up)

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
    ) -> Outcome:
        """Runs `variant` of kernel `key` on device-resident `args`: fused when it
        can, else the fallback. `unfused` says why these inputs must take the
        unfused path (its data checks are the only ones that apply), if they must."""
        spec = _Run(key, variant)
        if not fused:
            return self._fallback(spec, args, Reason.FALLBACK_REASON_REQUESTED, "", None)
        if self.compile_mode == "off":
            return self._fallback(spec, args, Reason.FALLBACK_REASON_DISABLED, "compile mode is off", None)
        if self._worker is None:
            _configure_compiler()
        if unfused:
            return self._fallback(spec, args, Reason.FALLBACK_REASON_UNSUPPORTED, unfused, None)
        entry = self._entry(spec, args)
        if entry.state is State.COMPILING and wait:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not entry.done.wait(timeout):
                raise DeadlineExceeded(f"deadline passed while kernel {key} compiled")
        fn = entry.fn  # once: another thread may fail the entry meanwhile
        if entry.state is not State.READY or fn is None:
            detail = "fused kernel is compiling" if entry.state is State.COMPILING else entry.error
            return self._fallback(spec, args, entry.reason, detail, entry)
        if entry.compiled_by != "aoti" and self._worker is not None:
            _configure_compiler()  # a torch.compile kernel: a guard failure may recompile here
        # Dynamo refuses to run its code while a trace runs; AOTInductor's code is not Dynamo's.
        if entry.compiled_by != "aoti" and is_fx_tracing():
            if not wait:
                return self._fallback(spec, args, Reason.FALLBACK_REASON_COMPILING, _TRACING, entry)
            # The caller waits for the fused kernel. fuseport's own traces (compiles,
            # captures) hold TRACE_LOCK: taking it waits them out and keeps new ones off.
            with TRACE_LOCK:
                return self._call_fused(spec, args, entry, fn)
        return self._call_fused(spec, args, entry, fn)

    def _call_fused(self, spec: _Run, args: list[Any], entry: Entry, fn: Callable[..., Any]) -> Outcome:
        try:
            outputs = fn(*args)
        except Exception as e:
            if is_out_of_memory(e):
                self._out_of_memory(spec, e)
            if is_fx_tracing() or _NESTED_TRACE in str(e):  # a trace began after the check
                return self._fallback(spec, args, Reason.FALLBACK_REASON_COMPILING, _TRACING, entry)
            return self._after_fused_error(spec, args, entry, e)
        self._count(spec.key, entry, fused=True)
        return Outcome(list(outputs), Path.PATH_FUSED)

    def _after_fused_error(self, spec: _Run, args: list[Any], entry: Entry, e: Exception) -> Outcome:
        dynamo = sys.modules.get("torch._dynamo")  # not imported where only AOTInductor runs
        if dynamo is not None and isinstance(e, dynamo.exc.FailOnRecompileLimitHit):
            reason = Reason.FALLBACK_REASON_RECOMPILE_LIMIT
        else:
            reason = Reason.FALLBACK_REASON_RUNTIME_ERROR
        # If the fallback fails too, the inputs are at fault (shapes that do
        # not broadcast, ...) and the kernel stays in service.
        outcome = self._fallback(spec, args, reason, _short(e), entry)
        entry.fail(reason, _short(e))
        log.warning(
            "kernel %d [%s]: fused kernel failed where the fallback did not; this ArgSpec "
            "is served by the fallback from now on: %s",
            spec.key,
            entry.arg_spec,
            _short(e),
        )
        log.debug("fused failure", exc_info=e)
        return outcome

    def _fallback(
        self, spec: _Run, args: list[Any], reason: int, detail: str, entry: Entry | None
    ) -> Outcome:
        try:
            outputs = spec.variant.fallback.forward(*args)  # not __call__: see _compile
        except Exception as e:
            if is_out_of_memory(e):
                self._out_of_memory(spec, e)
            raise ExecutionFailed(f"kernel {spec.key} failed on these inputs: {_short(e)}") from e
        self._count(spec.key, entry, fused=False)
        if reason not in (Reason.FALLBACK_REASON_REQUESTED,):
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
        return Outcome(list(outputs), Path.PATH_FALLBACK, reason, detail)

    def _out_of_memory(self, spec: _Run, e: BaseException) -> None:
        self.placement.release_memory()
        raise ResourceExhausted(
            f"{self.placement.device} out of memory running kernel {spec.key}; memory was released: {_short(e)}"
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
                    Reason.FALLBACK_REASON_COMPILING,
                    f"{pending} compiles are queued; this one waits its turn",
                )
                return busy
            entry = Entry(vkey, arg_spec)
            self._entries[ident] = entry
            self._evict(vkey)
        if self._load_artifact(spec, entry):
            return entry
        log.info("kernel %d: compiling %s for [%s]", spec.key, _variant_name(spec), arg_spec)
        self._compiler.submit(self._compile, spec, entry, args, self.placement.share(args))
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

    # ------------------------------------------------------------------ artifacts

    def _artifact_name(self, spec: _Run, arg_spec: ArgSpec) -> str:
        assert self.artifacts is not None
        return self.artifacts.key(
            {
                "variant": spec.variant.key,
                # Everything but the device's name: its capability stands for it.
                "inputs": [
                    item if isinstance(item, str) else [str(x) for x in item] for item in arg_spec.inputs
                ],
                "device": self._capability,
                "mode": self.compile_mode,
            }
        )

    def _load_artifact(self, spec: _Run, entry: Entry) -> bool:
        """Makes `entry` READY from an artifact compiled before (by this process,
        an earlier one, or another sharing the cache). A load reads and hashes
        the file and maps a shared library: milliseconds, no compile."""
        if self.artifacts is None or _aot_unsuitable(entry.arg_spec, self.compile_mode):
            return False
        name = self._artifact_name(spec, entry.arg_spec)
        try:
            artifact = self.artifacts.load(name)
            if artifact is None:
                return False
            fn = self._aot_fn(artifact.data, entry.arg_spec, len(spec.variant.graph.outputs))
        except Exception as e:  # noqa: BLE001 - a bad artifact is compiled again, never fatal
            log.warning(
                "kernel %d [%s]: artifact %s refused, compiling again: %s",
                spec.key,
                entry.arg_spec,
                name,
                _short(e),
            )
            # A full disk (the loader's private copy in the temp directory) says
            # nothing against the artifact: it stays for when there is room.
            if not isinstance(e, ArtifactError) and not is_disk_full(e):
                self.artifacts.remove(name)
            self.events.loaded(False)
            return False
        entry.fn = fn
        entry.source = package_source(artifact.data)
        entry.compiled_by = "aoti"
        entry.from_cache = True
        entry.reason = Reason.FALLBACK_REASON_UNSPECIFIED
        entry.state = State.READY
        entry.done.set()
        self.events.loaded(True)
        log.info("kernel %d: loaded artifact %s for [%s]", spec.key, name, entry.arg_spec)
        return True

    def _aot_fn(self, data: bytes, arg_spec: ArgSpec, outputs: int) -> Callable[..., Any]:
        device = self.placement.device
        index = device.index if device.type == "cuda" and device.index is not None else -1
        # From the checked bytes, through a private file of our own: the file in
        # the cache could be replaced between the check and a load by name. The
        # C++ loader, not torch._inductor's wrapper: importing Inductor costs the
        # serving process seconds (tens on a busy CPU) that a load does not need.
        fd, path = tempfile.mkstemp(suffix=".pt2", prefix="fuseport-load-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, index)
        finally:
            os.unlink(path)
        tensors = [i for i, item in enumerate(arg_spec.inputs) if not isinstance(item, str)]

        def fused(*args: Any) -> Any:
            # boxed_run takes the list (it frees the inputs as it goes): a new one each call.
            results = loader.boxed_run([args[i] for i in tensors])
            if len(results) != outputs:
                raise RuntimeError(f"the artifact returned {len(results)} values where the graph has {outputs}")
            return results

        return fused

    def _compile(self, spec: _Run, entry: Entry, sample: list[Any], receive: Callable[[], None]) -> None:
        why = (
            "compiler is inprocess"
            if self._worker is None
            else _aot_unsuitable(entry.arg_spec, self.compile_mode)
        )
        if why:
            entry.compiled_by = f"torch.compile (in-process): {why}"
            self._compile_in_process(spec, entry, sample, receive)
            return
        self._compile_aot(spec, entry, sample, receive)

    def _compile_aot(self, spec: _Run, entry: Entry, sample: list[Any], receive: Callable[[], None]) -> None:
        """Compiles in the worker into the artifact cache, then loads the artifact."""
        assert self.artifacts is not None and self._worker is not None
        start = time.perf_counter()
        name = self._artifact_name(spec, entry.arg_spec)
        try:
            tmp = self.artifacts.temp_path()
        except OSError as e:
            # No room in the cache (not even for an empty file: inodes, a quota). Raised
            # here it would end this thread's task unseen and leave the entry COMPILING
            # for good; compiling in process serves the kernel, uncached.
            log.warning("kernel %d: the artifact cache cannot be written, torch.compile in-process: %s", spec.key, e)
            entry.compiled_by = f"torch.compile (in-process): the artifact cache cannot be written: {e}"
            self._compile_in_process(spec, entry, sample, receive, start)
            return
        inputs: list[dict[str, Any]] = []
        for value in sample:
            if isinstance(value, torch.Tensor):
                inputs.append(
                    {"kind": "tensor", "dtype": dtypes.code_for(value.dtype), "shape": list(value.shape)}
                )
            else:
                inputs.append({"kind": "float", "value": float(value)})
        header = {
            "device": str(self.placement.device),
            "package_path": str(tmp),
            "mode": self.compile_mode,
            "inputs": inputs,
        }
        ok = False
        handed_off = False
        try:
            try:
                reply = self._worker.compile(header, spec.variant.graph.SerializeToString(deterministic=True))
            except (CompileCrashed, CompileTimedOut) as e:
                entry.compiled_by = "aoti"
                entry.fail(Reason.FALLBACK_REASON_COMPILE_FAILED, str(e))
                log.warning("kernel %d: compile for [%s] failed: %s", spec.key, entry.arg_spec, e)
                return
            if not reply.get("ok"):
                error = str(reply.get("error", "unknown error"))[:300]
                log.info(
                    "kernel %d: AOTInductor cannot compile [%s], torch.compile in-process: %s",
                    spec.key,
                    entry.arg_spec,
                    error,
                )
                entry.compiled_by = f"torch.compile (in-process): AOTInductor failed: {error}"
                # Counted as one compile, by the in-process path's own report;
                # it also sets entry.done.
                handed_off = True
                self._compile_in_process(spec, entry, sample, receive, start)
                return
            data = tmp.read_bytes()
            try:
                self.artifacts.commit(
                    name, tmp, {"kernel": spec.key, "variant": spec.variant.key, "arg_spec": str(entry.arg_spec)}
                )
            except OSError as e:
                # A full disk, most likely: the cache is only a cache. The package is
                # compiled and in memory, so it serves this process all the same; other
                # processes and a restart compile it again. (commit left no file.)
                log.warning(
                    "kernel %d: artifact %s for [%s] not cached, served from memory: %s",
                    spec.key,
                    name,
                    entry.arg_spec,
                    e,
                )
            fn = self._aot_fn(data, entry.arg_spec, len(spec.variant.graph.outputs))
            receive()
            with self.placement.request_scope():
                fn(*sample)
                self.placement.synchronize()
            refused = self._unfused_error(spec, sample)
            if refused is not None and not isinstance(refused, DataError):
                entry.fail(
                    Reason.FALLBACK_REASON_COMPILE_FAILED,
                    f"the unfused graph refuses these inputs: {_short(refused)}",
                )
                return
            entry.fn = fn
            entry.source = package_source(data)
            entry.compiled_by = "aoti"
            entry.reason = Reason.FALLBACK_REASON_UNSPECIFIED
            entry.state = State.READY
            ok = True
            log.info(
                "kernel %d: compiled artifact %s for [%s] in %.1f s",
                spec.key,
                name,
                entry.arg_spec,
                time.perf_counter() - start,
            )
        except Exception as e:  # noqa: BLE001 - any compile failure is served by the fallback
            if is_out_of_memory(e):
                self.placement.release_memory()
            entry.fail(Reason.FALLBACK_REASON_COMPILE_FAILED, _short(e))
            log.info("kernel %d: compile failed for [%s]: %s", spec.key, entry.arg_spec, _short(e))
            log.debug("compile failure", exc_info=e)
        finally:
            tmp.unlink(missing_ok=True)
            if not handed_off:  # else the in-process path reported it
                entry.compile_seconds = time.perf_counter() - start
                entry.done.set()
                self.events.compiled(entry.compile_seconds, ok)

    def _compile_in_process(
        self,
        spec: _Run,
        entry: Entry,
        sample: list[Any],
        receive: Callable[[], None],
        start: float | None = None,
    ) -> None:
        """Compiles by running the kernel once on the request's own inputs."""
        if start is None:
            start = time.perf_counter()
        _register_eager_kernels()
        sources: list[str] = []
        _configure_compiler()
        try:
            # A module of its own: Dynamo keeps its cache on the module's code,
            # so each ArgSpec has its own guards and its own recompile budget.
            # Built on the variant's module, it shares its weights (no copies).
            built = spec.variant.module
            module = torch.fx.GraphModule(built, copy.deepcopy(built.graph))
            mode = None if self.compile_mode == "default" else self.compile_mode
            from torch._inductor.graph import GraphLowering

            with (
                TRACE_LOCK,
                mock.patch.object(GraphLowering, "save_output_code", sources.append),
                self.placement.request_scope(),
            ):
                # Inside the lock too: torch.compile made while another thread
                # exports is ignored (export's flag is process-wide), silently.
                # The method, not the module: every torch.fx trace (in each compile,
                # in each export) patches nn.Module.__call__ for the whole process
                # while it runs, and a module called through it on another thread
                # fails ("module is not installed as a submodule"). A run never
                # calls a module, so no trace can reach it.
                fn = torch.compile(module.forward, dynamic=True, fullgraph=True, mode=mode)
                receive()
                fn(*sample)
                self.placement.synchronize()
            refused = self._unfused_error(spec, sample)
            if refused is not None and not isinstance(refused, DataError):
                # Inductor computes where eager refuses the ArgSpec itself (a
                # bitwise op on floats, softmax on ints): bits, not an answer.
                # The error stands on both paths: this ArgSpec runs unfused.
                entry.fail(Reason.FALLBACK_REASON_COMPILE_FAILED, f"the unfused graph refuses these inputs: {_short(refused)}")
                log.info("kernel %d: [%s] runs unfused, which refuses it: %s", spec.key, entry.arg_spec, _short(refused))
                return
            entry.fn = fn
            entry.source = "\n\n".join(sources)
            entry.reason = Reason.FALLBACK_REASON_UNSPECIFIED
            entry.state = State.READY
            log.info("kernel %d: compiled for [%s] in %.1f s", spec.key, entry.arg_spec, time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - any compile failure is served by the fallback
            if is_out_of_memory(e):
                self.placement.release_memory()
            if self._unfused_error(spec, sample) is not None:
                # The request's inputs were bad (shapes that do not broadcast):
                # that says nothing of the kernel. Forget the entry so that the
                # next request for this ArgSpec compiles again.
                with self._lock:
                    if self._entries.get((entry.key, entry.arg_spec)) is entry:
                        del self._entries[(entry.key, entry.arg_spec)]
                entry.fail(Reason.FALLBACK_REASON_COMPILE_FAILED, f"the inputs it was compiled with were invalid: {_short(e)}")
            else:
                entry.fail(Reason.FALLBACK_REASON_COMPILE_FAILED, _short(e))
                log.info("kernel %d: compile failed for [%s]: %s", spec.key, entry.arg_spec, _short(e))
                log.debug("compile failure", exc_info=e)
        finally:
            entry.compile_seconds = time.perf_counter() - start
            entry.done.set()
            self.events.compiled(entry.compile_seconds, entry.state is State.READY)

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

    def _warm_up(self) -> None:
        _configure_compiler()
        start = time.perf_counter()
        try:
            with TRACE_LOCK, self.placement.request_scope():
                x = torch.ones(8, device=self.placement.device)
                torch.compile(lambda t: t * 2 + 1, dynamic=True, fullgraph=True)(x)
                self.placement.synchronize()
            log.info("compiler warmed up in %.1f s", time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - a real compile will report the problem
            log.warning("compiler warm-up failed: %s", _short(e))

    # ------------------------------------------------------------------ inspection

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
        self._compiler.shutdown(wait=False, cancel_futures=True)
        if self._worker is not None:
            self._worker.stop()
        with self._lock:
            waiting = [e for e in self._entries.values() if e.state is State.COMPILING]
        for entry in waiting:
            entry.fail(Reason.FALLBACK_REASON_COMPILE_FAILED, "the server is shutting down")
            entry.done.set()
