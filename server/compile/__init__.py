"""Compilation, in a room of its own: one small `Compiler` interface, one implementation per strategy.

The executor asks a compiler for a kernel of (variant, ArgSpec) and gets a
`Compiled` back: a callable, the size conditions it holds under, how it was
made. It never learns how (the way vLLM's compilation/compiler_interface.py
keeps strategies behind one interface):

- `StandaloneCompiler` (the default, CPU and CUDA): Inductor's standalone
  artifacts, compiled in a worker process, kept in the artifact cache and
  loaded (not compiled) by every serving process and after every restart.
  A call is Inductor's compiled module behind fuseport's own checks: no
  Dynamo frame, no guards.
- `InProcessCompiler`: torch.compile in the serving process (Dynamo guards
  every call). The fallback for what the worker cannot compile, and the
  whole strategy with `--compiler inprocess`.

`make_compiler` chooses once, from the settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fuseport.server.artifacts import ArtifactCache
    from fuseport.server.devices import Placement
    from fuseport.server.registry import Variant
    from fuseport.wire.sizes import Condition

__all__ = ["CompileFailed", "Compiled", "Compiler", "Job", "LoadRefused", "make_compiler", "short_error"]


def short_error(e: BaseException) -> str:
    """First line of an exception, for responses and Describe (the full text goes to the log)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


@dataclass(frozen=True)
class Job:
    """What to compile: one variant of a kernel for one ArgSpec."""

    kernel: int
    variant: Variant
    arg_spec: Any  # executor.ArgSpec: device, and per input its kind/dtype/dim order/size classes


@dataclass
class Compiled:
    """A kernel ready to call: `call(args)` takes the graph's inputs in order."""

    call: Callable[[Sequence[Any]], Sequence[Any]]
    compiled_by: str
    source: str = ""
    from_cache: bool = False
    # Sizes the kernel holds for (what its compiler assumed): checked before every call.
    conditions: tuple[Condition, ...] = field(default=())
    # Runs through Dynamo: a guard may recompile, and it refuses to run while a trace runs.
    dynamo: bool = False


class CompileFailed(Exception):
    """No kernel for this ArgSpec. `retry_in_process`: the strategy cannot take
    it (the worker refused it) but torch.compile in process may."""

    def __init__(self, message: str, *, retry_in_process: bool = False) -> None:
        super().__init__(message)
        self.retry_in_process = retry_in_process


class LoadRefused(Exception):
    """A cached artifact that exists but must not be used (damaged, not ours): compile again."""


class Compiler:
    """One compile strategy. `compile` runs on the executor's compile thread,
    one at a time; `load` on the thread that first meets the ArgSpec."""

    name = ""

    def load(self, job: Job) -> Compiled | None:
        """The kernel from a cache, if this strategy keeps one; None if none is there."""
        return None

    def compile(self, job: Job, sample: list[Any], receive: Callable[[], None]) -> Compiled:
        """Compiles for `sample` (the request's own inputs, on the device; call
        `receive()` before reading their data). Raises CompileFailed."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """Imports and first-use set-up, run once in the background at start."""

    def close(self) -> None:
        """Stops whatever the strategy started (a worker process)."""


def make_compiler(
    strategy: str,
    placement: Placement,
    mode: str,
    *,
    artifacts: ArtifactCache | None,
    timeout: float,
    budget: float = 0.0,
) -> Compiler:
    """The settings' strategy: "standalone" (needs the artifact cache) or "inprocess".
    `budget`: --max-call-seconds (0: none), which bounds the compile worker's test runs."""
    from fuseport.server.compile.inprocess import InProcessCompiler

    if strategy == "inprocess":
        return InProcessCompiler(placement, mode)
    from fuseport.server.compile.standalone import StandaloneCompiler

    assert artifacts is not None
    return StandaloneCompiler(placement, mode, artifacts, timeout, budget)
