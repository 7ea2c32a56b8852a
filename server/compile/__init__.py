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

`make_compiler` chooses once, from the settings. The interface itself is in
interface.py, which the strategies import (not this package: it imports them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fuseport.server.compile.inprocess import InProcessCompiler
from fuseport.server.compile.interface import (
    Compiled,
    CompileFailed,
    Compiler,
    Job,
    LoadRefused,
    short_error,
)
from fuseport.server.compile.standalone import StandaloneCompiler
from fuseport.server.compile.torch_config import set_compile_threads

if TYPE_CHECKING:
    from fuseport.server.artifacts import ArtifactCache
    from fuseport.server.devices import Placement

__all__ = ["CompileFailed", "Compiled", "Compiler", "Job", "LoadRefused", "make_compiler", "short_error"]


def make_compiler(
    strategy: str,
    placement: Placement,
    mode: str,
    *,
    artifacts: ArtifactCache | None,
    timeout: float,
    budget: float = 0.0,
    threads: int = 1,
) -> Compiler:
    """The settings' strategy: "standalone" (needs the artifact cache) or "inprocess".
    `budget`: --max-call-seconds (0: none), which bounds the compile worker's test runs;
    `threads`: --compile-threads, Inductor's compile processes, in the worker and (for
    torch.compile in process, whichever thread compiles) in this process."""
    set_compile_threads(threads)
    if strategy == "inprocess":
        return InProcessCompiler(placement, mode)
    assert artifacts is not None
    return StandaloneCompiler(placement, mode, artifacts, timeout, budget, threads)
