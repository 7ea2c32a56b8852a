"""What a kernel call is between the core and its callers: `Call` (checked and planned), `Result` (done), and what counts as light.

The core makes and runs them (server/core.py); the batcher (server/batching.py),
which the core makes, groups and runs them too. Both import them from here, so
that neither imports the other for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fuseport.server.checks import Plan
    from fuseport.server.registry import Variant
    from fuseport.server.resident import Owner

__all__ = ["LIGHT_BYTES", "LIGHT_FLOPS", "Call", "Result", "light_work"]

# A call whose plan touches at most this many bytes and does at most this much
# matrix arithmetic is light (Core.light): it may run on the event loop, where
# handing it to a worker thread and back costs more than the work. Sized so that
# the worst light call takes well under a millisecond of one CPU core (a pass
# over 1 MiB: ~0.1 ms; 16 MFLOP: ~0.3 ms).
LIGHT_BYTES = 1 << 20
LIGHT_FLOPS = 16 << 20


def light_work(plan: Plan) -> bool:
    """Whether the plan bounds this call's work below LIGHT_BYTES touched and LIGHT_FLOPS
    (False where it cannot tell: sizes that depend on data, or an op whose work its bytes
    do not bound, checks.UNBOUNDED_WORK_OPS)."""
    return (
        plan.work_bytes is not None
        and not plan.unbounded_work
        and plan.work_bytes <= LIGHT_BYTES
        and (plan.flops or 0) <= LIGHT_FLOPS
    )


@dataclass
class Call:
    """A call checked and planned, not yet run (Core.prepare -> Core.run)."""

    key: int
    below: list[Any]  # the stack under the kernel's inputs: comes back untouched
    variant: Variant
    args: list[Any]
    plan: Plan
    fused: bool
    owner: Owner
    keep: bool
    started: int  # perf_counter_ns when preparing began
    prepare_ns: int = 0  # how long preparing took
    entry: Any = None  # the executor's entry for the args, once light() looked it up
    handles: bool = False  # some inputs were resident handles (never batched: see server/batching.py)
    # Who the caller is for fair shares and penalties (plumbing.identity_of; b"": nobody in particular).
    who: bytes = b""
    # Results stay where the kernel made them (a device): the caller writes them into a
    # shared-memory region itself (SharedMemory.place), one copy instead of two.
    on_device: bool = False


@dataclass
class Result:
    """A finished Execute/Fallback: the new stack, which path and variant ran and why."""

    stack: list[Any]
    path: int
    reason: int
    detail: str
    run_us: int
    variant: int
    # The ids of the handles this call kept (keep=True): freed again should its response
    # never reach the caller (encoding failed, the caller gave up while it ran).
    kept: list[str] = field(default_factory=list)
