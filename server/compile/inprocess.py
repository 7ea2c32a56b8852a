"""torch.compile in the serving process: the fallback strategy (and `--compiler inprocess`)."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch

from fuseport.server.compile.interface import Compiled, CompileFailed, Compiler, Job, short_error
from fuseport.server.compile.torch_config import configure_compiler, prepare_inductor
from fuseport.server.devices import Placement, is_out_of_memory
from fuseport.wire._tracing import TRACE_LOCK

__all__ = ["InProcessCompiler"]

log = logging.getLogger(__name__)


class InProcessCompiler(Compiler):
    """Compiles by running the kernel once, through Dynamo, on the request's own inputs."""

    name = "torch.compile (in-process)"

    def __init__(self, placement: Placement, mode: str) -> None:
        self.placement = placement
        self.mode = mode

    def compile(self, job: Job, sample: list[Any], receive: Callable[[], None]) -> Compiled:
        prepare_inductor()
        configure_compiler()
        sources: list[str] = []
        # A module of its own: Dynamo keeps its cache on the module's code,
        # so each ArgSpec has its own guards and its own recompile budget.
        # Built on the variant's module, it shares its weights (no copies).
        built = job.variant.module
        module = torch.fx.GraphModule(built, copy.deepcopy(built.graph))
        mode = None if self.mode == "default" else self.mode
        from torch._inductor.graph import GraphLowering

        try:
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
                # It compiles, then runs the kernel on the caller's inputs on the device (and
                # autotuning's benchmark runs with them): light calls wait off the loop meanwhile.
                with self.placement.holding():
                    fn(*sample)
                    self.placement.synchronize()
        except Exception as e:
            if is_out_of_memory(e):
                self.placement.release_memory()
            raise CompileFailed(short_error(e)) from e
        return Compiled(lambda args: fn(*args), self.name, "\n\n".join(sources), dynamo=True)

    def warm_up(self) -> None:
        prepare_inductor()
        configure_compiler()
        start = time.perf_counter()
        try:
            with TRACE_LOCK, self.placement.request_scope():
                x = torch.ones(8, device=self.placement.device)
                torch.compile(lambda t: t * 2 + 1, dynamic=True, fullgraph=True)(x)
                self.placement.synchronize()
            log.info("compiler warmed up in %.1f s", time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - a real compile will report the problem
            log.warning("compiler warm-up failed: %s", short_error(e))
