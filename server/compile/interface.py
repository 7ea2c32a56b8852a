"""The compile room's one interface: what the executor asks of a compiler (`Compiler`) and what it gets back.

Every strategy (standalone.py, inprocess.py) implements `Compiler`; the package's
`make_compiler` picks one. Kept apart from the package's __init__ so that the
strategies, which the package imports, do not import the package back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fuseport.server.registry import Variant
    from fuseport.wire.sizes import Condition

__all__ = ["CompileFailed", "Compiled", "Compiler", "Job", "LoadRefused", "short_error"]


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
