"""The core of the server: register, execute, describe. It knows nothing of gRPC."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fuseport.server.artifacts import ArtifactCache
from fuseport.server.checks import DataError, Plan, device_capacity
from fuseport.server.devices import Placement, is_device_failure, is_out_of_memory, resolve_device
from fuseport.server.executor import Executor, Outcome, State
from fuseport.server.registry import Kernel, Quotas, Registry, Summary, Variant
from fuseport.server.settings import Settings
from fuseport.wire import _pb
from fuseport.wire.errors import (
    ExecutionFailed,
    InternalError,
    NoMatchingVariant,
    ResourceExhausted,
    SignatureMismatch,
)
from fuseport.wire.graph import InputSpec

__all__ = ["Core", "Result"]

log = logging.getLogger(__name__)


@dataclass
class Result:
    """A finished Execute/Fallback: the new stack, which path and variant ran and why."""

    stack: list[Any]
    path: int
    reason: int
    detail: str
    run_us: int
    variant: int


class Core:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.capacity = device_capacity(self.device)
        self.placement = Placement(self.device)
        self.registry = Registry(
            settings.store_dir,
            self.device,
            Quotas(
                max_variants=settings.max_variants,
                max_graph_bytes=settings.max_graph_bytes,
                max_store_bytes=settings.max_store_bytes,
                max_store_kernels=settings.max_store_kernels,
            ),
        )
        self.executor = Executor(
            self.placement,
            compile_mode=settings.compile_mode,
            max_kernels=settings.max_kernels,
            max_arg_specs=settings.max_arg_specs,
            artifacts=(
                ArtifactCache(settings.artifact_path, settings.artifact_cache_bytes)
                if settings.compiler == "aot" and settings.compile_mode != "off"
                else None
            ),
            compile_timeout=settings.compile_timeout_seconds,
        )
        # Set by the app: called (from a worker thread) when the device fails.
        self.on_device_failure: Callable[[], None] | None = None
        self.registry.load()

    # ------------------------------------------------------------------ RPCs

    def register(self, graph: _pb.graph.Graph, variant_of: int | None = None) -> tuple[int, bool, int]:
        """(kernel key, created, the graph's own key)."""
        return self.registry.register(graph, variant_of)

    def execute(
        self,
        key: int,
        stack: list[Any],
        *,
        fused: bool = True,
        wait: bool = False,
        deadline: float | None = None,
        variants: Sequence[int] = (),
    ) -> Result:
        """runFusion / runFallback: pops the kernel's inputs off the top of the
        stack, pushes its outputs; the values below come back untouched.

        Before either path runs: the first variant (of `variants`, when given)
        that covers the inputs is chosen, its plan for these sizes is checked
        (shape errors, result size, index inputs), the same for both paths."""
        kernel = self.registry.get(key)
        n = kernel.arity
        if len(stack) < n:
            raise SignatureMismatch(
                f"kernel {key} takes {n} input{'s' * (n != 1)} but the stack holds "
                f"{len(stack)} value{'s' * (len(stack) != 1)}"
            )
        base = len(stack) - n
        variant, args = _select(kernel, stack[base:], base, variants)
        plan = variant.planner.plan(args)
        if plan.error is not None:
            raise ExecutionFailed(f"kernel {key} failed on these inputs: {plan.error}")
        self._check_budget(key, plan, args)
        try:
            plan.check_inputs(args, variant.module)
        except DataError as e:
            raise ExecutionFailed(f"kernel {key} failed on these inputs: {e}") from None
        start = time.perf_counter_ns()
        try:
            with self.placement.request_scope():
                outcome: Outcome = self.executor.run(
                    key, variant, self.placement.to_device(args),
                    fused=fused, unfused=plan.unfused, wait=wait, deadline=deadline,
                )  # fmt: skip
                outputs = self.placement.to_host(outcome.outputs)
                self.placement.synchronize()
        except Exception as e:
            if is_device_failure(e):
                self._device_failed(e)
            if not is_out_of_memory(e):
                raise
            # Out of memory moving inputs or results (the executor handles its own).
            self.placement.release_memory()
            raise ResourceExhausted(
                f"{self.device} out of memory moving data for kernel {key}; memory was released"
            ) from e
        run_us = (time.perf_counter_ns() - start) // 1000
        return Result(stack[:base] + outputs, outcome.path, outcome.reason, outcome.detail, run_us, variant.key)

    def _check_budget(self, key: int, plan: Plan, args: Sequence[Any]) -> None:
        """Refuses, before anything is allocated, what could only fail later or
        take more than one call may."""
        budget = self.settings.max_call_bytes
        if budget:
            # What a call holds at least at once: its inputs, its results, and on the
            # unfused path its largest intermediate beside them (planned on meta tensors).
            inputs = sum(a.untyped_storage().nbytes() for a in args if isinstance(a, torch.Tensor))
            needs = inputs + (plan.output_bytes or 0) + plan.largest_bytes
            if needs > budget:
                raise ResourceExhausted(
                    f"kernel {key}: this call needs at least {needs} bytes (inputs {inputs}, results "
                    f"{plan.output_bytes if plan.output_bytes is not None else 'unknown'}, largest tensor "
                    f"{plan.largest_bytes}), over the {budget} bytes one call may use (--max-call-bytes); "
                    "refused before running"
                )
        limit = self.settings.max_message_bytes
        if plan.output_bytes is not None and plan.output_bytes > limit:
            raise ResourceExhausted(
                f"kernel {key}: the result would be {plan.output_bytes} bytes, over the message limit "
                f"of {limit} bytes (--max-message-bytes); refused before running"
            )
        if plan.largest_bytes > self.capacity:
            raise ResourceExhausted(
                f"{self.device} out of memory for kernel {key}: {plan.largest_what} needs "
                f"{plan.largest_bytes} bytes, more than the device's {self.capacity}; refused before running"
            )

    def describe(self, key: int, include_source: bool = False) -> _pb.service.KernelInfo:
        kernel = self.registry.get(key)
        return self._info(key, kernel.variants, include_source, with_arg_specs=True)

    def list(self) -> list[_pb.service.KernelInfo]:
        return [self._info(key, variants, False, with_arg_specs=False) for key, variants in self.registry.kernels()]

    def unregister(self, key: int) -> bool:
        # Registry first: once the key is gone no new request can compile for it.
        kernel = self.registry.remove(key)
        if kernel is None:
            return False
        still_used = set(self.registry.variant_keys())
        self.executor.forget(key, [v.key for v in kernel.variants if v.key not in still_used])
        return True

    def close(self) -> None:
        self.executor.shutdown()

    def _device_failed(self, e: BaseException) -> None:
        """The device is unusable for this process: say so, and have the server
        stop (health NOT_SERVING, drain, exit non-zero) so that its supervisor
        starts a fresh one. Registered kernels are on disk and survive that."""
        log.error("device %s failed; this server must restart: %s", self.device, e)
        if self.on_device_failure is not None:
            self.on_device_failure()
        raise InternalError(
            f"device {self.device} failed and this server is restarting: {str(e).splitlines()[0]}"
        ) from e

    # ------------------------------------------------------------------ helpers

    def _info(
        self, key: int, variants: Sequence[Variant | Summary], include_source: bool, with_arg_specs: bool
    ) -> _pb.service.KernelInfo:
        fused, fallback = self.executor.counts(key)
        first = variants[0]
        info = _pb.service.KernelInfo(
            key=key,
            inputs=list(first.graph.inputs),
            num_outputs=len(first.graph.outputs),
            num_nodes=len(first.graph.nodes),
            ops=sorted({op for v in variants for op in v.ops}),
            fused_runs=fused,
            fallback_runs=fallback,
            device=str(self.device),
            random_ops=sorted({op for v in variants for op in v.random_ops}),
        )
        for v in variants:
            info.variants.add(
                variant=v.key,
                inputs=list(v.graph.inputs),
                conditions=[c.text for c in v.signature.conditions],
                num_nodes=len(v.graph.nodes),
            )
            if not with_arg_specs:
                continue
            for e in self.executor.entries(v.key):
                info.arg_specs.add(
                    arg_spec=str(e.arg_spec),
                    state=e.state.value,
                    error=e.error,
                    compile_seconds=e.compile_seconds if e.state is not State.COMPILING else 0.0,
                    fused_runs=e.fused_runs,
                    fallback_runs=e.fallback_runs,
                    source=e.source if include_source else "",
                    variant=v.key,
                    compiled_by=e.compiled_by,
                    from_cache=e.from_cache,
                )
        return info


def _select(
    kernel: Kernel, values: list[Any], base: int, allowed: Sequence[int]
) -> tuple[Variant, list[Any]]:
    """The first variant that covers `values` (the kernel's inputs, from stack
    position `base`), and the values as it takes them; NoMatchingVariant naming
    why each candidate does not."""
    wanted = set(allowed)
    candidates = [v for v in kernel.variants if not wanted or v.key in wanted]
    if not candidates:
        raise NoMatchingVariant(
            f"kernel {kernel.key} has none of the {len(wanted)} variants this client runs; "
            "the client captures one for these inputs"
        )
    failures: list[tuple[Variant, str]] = []
    for v in candidates:
        args, why = _match(kernel.key, v, values, base)
        if why is None:
            return v, args
        failures.append((v, why))
    if len(failures) == 1:
        raise NoMatchingVariant(failures[0][1])
    shown = "; ".join(f"variant {v.key}: {why}" for v, why in failures[:4])
    more = f"; and {len(failures) - 4} more" if len(failures) > 4 else ""
    raise NoMatchingVariant(f"no variant of kernel {kernel.key} covers these inputs: {shown}{more}")


def _match(key: int, variant: Variant, values: list[Any], base: int) -> tuple[list[Any], str | None]:
    sig = variant.signature
    args = []
    for i, (decl, value) in enumerate(zip(sig.inputs, values)):
        value, why = _check_input(decl, value)
        if why is not None:
            return [], f"stack[{base + i}] (input {i} {decl.name!r} of kernel {key}): {why}"
        args.append(value)
    for cond in sig.conditions:
        if not cond.holds(args):
            names = [d.name for d in sig.inputs]
            return [], (
                f"kernel {key}: {cond.text} does not hold ({cond.values(args, names)}): "
                "the graph was captured for inputs that meet it"
            )
    return args, None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Scalar input kinds: what to call them, and which Python values they accept.
_SCALARS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "bool": ("a bool", lambda v: isinstance(v, bool)),
    "int": ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a float", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
}


def _check_input(decl: InputSpec, value: Any) -> tuple[Any, str | None]:
    """The stack value as the input takes it, or why it does not fit the declared input."""
    if decl.kind == "tensor":
        assert decl.dtype is not None and decl.shape is not None
        if not isinstance(value, torch.Tensor):
            return value, f"expected a tensor, got {_kind_name(value)}"
        if value.dtype != decl.dtype:
            return value, f"expected a {_dtype_name(decl.dtype)} tensor, got {_dtype_name(value.dtype)}"
        if len(decl.shape) != value.dim():
            return value, f"expected rank {len(decl.shape)}, got shape {list(value.shape)}"
        for d, (w, got) in enumerate(zip(decl.shape, value.shape)):
            if w >= 0 and w != got:
                return value, (
                    f"dim {d} must be {w} (the graph was specialised on it), got shape {list(value.shape)}"
                )
        return value, None
    expected, accepts = _SCALARS[decl.kind]
    if not accepts(value):
        return value, f"expected {expected}, got {_kind_name(value)}"
    if decl.kind == "float":
        value = float(value)
    if decl.static and value != decl.static_value:
        return value, (
            f"this input is static (the graph was specialised on it when captured): "
            f"only {decl.static_value!r} is accepted, got {value!r}"
        )
    return value, None


def _kind_name(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {_dtype_name(value.dtype)} tensor"
    if value is None:
        return "None"
    return f"a {type(value).__name__}"
