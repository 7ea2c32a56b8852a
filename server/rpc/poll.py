"""The serving loop's busy poll: after a call that ran on the event loop ends, the
loop keeps turning (a callback that queues itself again) for a while instead of
sleeping in epoll, so that the next call of a client calling back to back finds it
awake.

Why: a thread that slept pays for its wake-up and for its cold caches. On the 2-core
CPU machine a small call's own work (decode, core.execute, encode; in process, no
gRPC) costs 64-86 us back to back, 140-256 us after a sleep of 0.5-2 ms and 81-128
us after the same time spinning; end to end, a 2 ms poll took a 1 KiB Execute from
1.42-1.76x to 0.93-1.06x the echo (docs/perf.md, "the serving loop polls for the next call").

What it costs is CPU while calls come close together: a poll that catches the next
call spends the gap, one that misses spends its whole window. So the window adapts,
the way Linux's halt polling does for a vCPU: a call that came after the window but
within --busy-poll-us doubles it, one that came later than that halves it (to 0
below _START), and a caught one leaves it. A server whose calls come further apart
than --busy-poll-us stops polling within a few calls; at rest it polls not at all.

It polls only after a call that ran on the loop, and only while no call of this
process is in flight. Threads need the GIL that each turn of a polling loop takes:
a call on a worker (a heavy kernel, a large message, shared memory, whose socket
thread also handles the client's packets between calls) measured no faster with
polling and 40-70% more server CPU per call, and a streamed call is many messages.

On a CUDA server a poll also keeps the GPU from idling (`warm`, --busy-poll-gpu-us):
every so often a turn queues a one-element kernel on the loop's stream, never waited
for: the price a small call pays after an idle gap is the GPU's, not the CPU's (docs/perf.md,
"the price of an idle GPU", scripts/cuda_small_call.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger("fuseport.server")

# The smallest window worth polling, and where a window that grows starts.
_START = 50e-6


class BusyPoll:
    """Told of each call's start (`begin`) and end (`end`) on the serving loop."""

    __slots__ = (
        "active", "caught", "clock", "idle_since", "max", "missed", "next_warm", "polled", "spinning", "started",
        "until", "warm", "warm_every", "warmed", "window",
    )  # fmt: skip

    def __init__(
        self,
        max_us: int,
        clock: Callable[[], float] = time.monotonic,
        warm: Callable[[], bool] | None = None,
        warm_every_us: int = 0,
    ) -> None:
        """`warm`, with `warm_every_us`: called every `warm_every_us` while polling (the
        device's keep-warm kernel, see the module doc); it says whether it queued one."""
        self.clock = clock
        self.warm = warm if warm_every_us else None
        self.warm_every = warm_every_us / 1e6 if self.warm is not None else 0.0  # 0: never (a CPU server)
        self.next_warm = 0.0
        self.warmed = 0  # keep-warm kernels queued, for the metrics
        self.max = max_us / 1e6
        self.window = self.max  # optimistic: a first burst of calls is caught at once
        self.active = 0
        # When the last call in flight ended, if it may poll after it: the next call's
        # gap from it adapts the window.
        self.idle_since: float | None = None
        self.until = 0.0
        self.spinning = False
        # The first turn of the current poll: time before it is the call's own (its
        # response sent, its bookkeeping), not polling.
        self.started: float | None = None
        # What it did, for the metrics (fuseport_busy_poll_*): calls that found the loop
        # polling, polls whose window ran out with no call, and seconds spent polling.
        self.caught = 0
        self.missed = 0
        self.polled = 0.0

    def begin(self) -> None:
        self.active += 1
        now = self.clock()
        if self.started is not None:
            self.polled += now - self.started
            self.started = None
        if self.idle_since is None:
            return
        gap = now - self.idle_since
        self.idle_since = None
        if gap <= self.window:
            self.caught += 1
        elif gap <= self.max:
            self.window = min(self.max, max(2 * self.window, _START))
        else:
            self.window = self.window / 2 if self.window / 2 >= _START else 0.0

    def end(self, loop: asyncio.AbstractEventLoop, ran_on_loop: bool = True) -> None:
        """A call ended; `ran_on_loop`: it did all its work on the loop (see the module doc)."""
        self.active -= 1
        if self.active > 0 or not self.max:
            return
        if not ran_on_loop:
            self.idle_since = None  # the next call's gap says nothing of a poll
            return
        now = self.clock()
        self.idle_since = now
        if not self.window:
            return
        self.until = now + self.window
        self.next_warm = now + self.warm_every  # the call that just ended kept it busy
        if not self.spinning:
            self.spinning = True
            loop.call_soon(self._turn, loop)

    def _turn(self, loop: asyncio.AbstractEventLoop) -> None:
        # Each turn of the loop between two of these polls its file descriptors
        # without waiting: the poller thread's wake-up for a new call is seen at once.
        now = self.clock()
        if self.active == 0 and now < self.until:
            if self.started is None:
                self.started = now
            if self.warm is not None and now >= self.next_warm:
                self.next_warm = now + self.warm_every
                try:
                    if self.warm():
                        self.warmed += 1
                except Exception as e:  # a device that faulted: the poll goes on without it
                    log.warning("the busy poll stops keeping the GPU warm: %s", e)
                    self.warm = None
            loop.call_soon(self._turn, loop)
            return
        self.spinning = False
        if self.active == 0:
            self.missed += 1  # the window ran out with no call
        if self.started is not None:
            self.polled += now - self.started
            self.started = None
