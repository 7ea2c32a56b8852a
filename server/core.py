"""The core of the server: register, execute, describe. It knows nothing of gRPC."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fuseport.server.devices import Placement, is_device_failure, is_out_of_memory, resolve_device
from fuseport.server.executor import Executor, Outcome, State
from fuseport.server.registry import KernelSpec, Registry
from fuseport.server.settings import Settings
from fuseport.wire import _pb
from fuseport.wire.errors import InternalError, ResourceExhausted, SignatureMismatch

__all__ = ["Core", "Result"]

log = logging.getLogger(__name__)


@dataclass
class Result:
    """A finished Execute/Fallback: the new stack, which path ran and why."""

    stack: list[Any]
    path: int
    reason: int
    detail: str
    run_us: int


class Core:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.placement = Placement(self.device)
        self.registry = Registry(settings.store_dir, self.device)
        self.executor = Executor(
            self.placement,
            compile_mode=settings.compile_mode,
            max_kernels=settings.max_kernels,
            max_arg_specs=settings.max_arg_specs,
        )
        # Set by the app: called (from a worker thread) when the device fails.
        self.on_device_failure: Callable[[], None] | None = None
        self.registry.load()

    # ------------------------------------------------------------------ RPCs

    def register(self, graph: _pb.graph.Graph) -> tuple[int, bool]:
        return self.registry.register(graph)

    def execute(
        self,
        key: int,
        stack: list[Any],
        *,
        fused: bool = True,
        wait: bool = False,
        deadline: float | None = None,
    ) -> Result:
        """runFusion / runFallback: pops the kernel's inputs off the top of the
        stack, pushes its outputs; the values below come back untouched."""
        spec = self.registry.get(key)
        n = len(spec.signature.inputs)
        if len(stack) < n:
            raise SignatureMismatch(
                f"kernel {key} takes {n} inputs but the stack holds {len(stack)} values"
            )
        base = len(stack) - n
        below, args = stack[:base], [
            _check_input(spec, i, stack[base + i], base + i) for i in range(n)
        ]
        start = time.perf_counter_ns()
        try:
            with self.placement.request_scope():
                outcome: Outcome = self.executor.run(
                    spec, self.placement.to_device(args), fused=fused, wait=wait, deadline=deadline
                )
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
        return Result(below + outputs, outcome.path, outcome.reason, outcome.detail, run_us)

    def describe(self, key: int, include_source: bool = False) -> _pb.service.KernelInfo:
        return self._info(self.registry.get(key), include_source, with_arg_specs=True)

    def list(self) -> list[_pb.service.KernelInfo]:
        return [self._info(s, False, with_arg_specs=False) for s in self.registry.specs()]

    def unregister(self, key: int) -> bool:
        # Registry first: once the key is gone no new request can compile for it.
        removed = self.registry.remove(key)
        self.executor.forget(key)
        return removed

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

    def _info(self, spec: KernelSpec, include_source: bool, with_arg_specs: bool) -> _pb.service.KernelInfo:
        fused, fallback = self.executor.counts(spec.key)
        info = _pb.service.KernelInfo(
            key=spec.key,
            inputs=list(spec.graph.inputs),
            num_outputs=len(spec.graph.outputs),
            num_nodes=len(spec.graph.nodes),
            ops=list(spec.ops),
            fused_runs=fused,
            fallback_runs=fallback,
            device=str(self.device),
        )
        if with_arg_specs:
            for e in self.executor.entries(spec.key):
                info.arg_specs.add(
                    arg_spec=str(e.arg_spec),
                    state=e.state.value,
                    error=e.error,
                    compile_seconds=e.compile_seconds if e.state is not State.COMPILING else 0.0,
                    fused_runs=e.fused_runs,
                    fallback_runs=e.fallback_runs,
                    source=e.source if include_source else "",
                )
        return info


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Scalar input kinds: what to call them, and which Python values they accept.
_SCALARS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "bool": ("a bool", lambda v: isinstance(v, bool)),
    "int": ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a float", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
}


def _check_input(spec: KernelSpec, i: int, value: Any, pos: int) -> Any:
    """The stack value for input `i`, checked against the declared input
    (the signature was validated when the graph was registered)."""
    decl = spec.signature.inputs[i]
    where = f"stack[{pos}] (input {i} {decl.name!r} of kernel {spec.key})"
    if decl.kind == "tensor":
        assert decl.dtype is not None and decl.shape is not None
        if not isinstance(value, torch.Tensor):
            raise SignatureMismatch(f"{where}: expected a tensor, got {_kind_name(value)}")
        if value.dtype != decl.dtype:
            raise SignatureMismatch(
                f"{where}: expected a {_dtype_name(decl.dtype)} tensor, got {_dtype_name(value.dtype)}"
            )
        if len(decl.shape) != value.dim():
            raise SignatureMismatch(f"{where}: expected rank {len(decl.shape)}, got shape {list(value.shape)}")
        for d, (w, got) in enumerate(zip(decl.shape, value.shape)):
            if w >= 0 and w != got:
                raise SignatureMismatch(
                    f"{where}: dim {d} must be {w} (the graph was specialised on it), got shape {list(value.shape)}"
                )
        return value
    expected, accepts = _SCALARS[decl.kind]
    if not accepts(value):
        raise SignatureMismatch(f"{where}: expected {expected}, got {_kind_name(value)}")
    if decl.kind == "float":
        value = float(value)
    if decl.static and value != decl.static_value:
        raise SignatureMismatch(
            f"{where}: this input is static (the graph was specialised on it when captured): "
            f"only {decl.static_value!r} is accepted, got {value!r}; register the kernel again with this value"
        )
    return value


def _kind_name(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {_dtype_name(value.dtype)} tensor"
    if value is None:
        return "None"
    return f"a {type(value).__name__}"
