"""Calls past their time: answered at their limit, and a kernel that will not stop retires its serving process.

A call's limit is the earlier of its caller's deadline and --max-call-seconds
from the start of its run. The unfused graph stops itself at its next op once
the limit passes (checks.between_ops), but one op, and a fused kernel (one
launch of Inductor's code, with the GIL released), cannot be interrupted: its
worker thread runs on to the kernel's end, however long that is. So:

- At the limit, the caller is answered at once (DEADLINE_EXCEEDED or
  RESOURCE_EXHAUSTED naming --max-call-seconds) through the `answer` its
  servicer gave, without waiting for the kernel. When the kernel does return,
  `finish` says the call was answered: the run's results are dropped there,
  never kept as resident values nor sent.
- At the limit plus --overrun-grace-seconds, a kernel still running is a
  runaway: nothing but the end of the process stops it, and it holds a worker
  and the device's cores meanwhile. `on_runaway` is told (once): the server
  then retires as it does after a device fault (health NOT_SERVING, drain,
  exit with its own status) and its supervisor, or the container's restart
  policy, starts a fresh one.

One thread watches every run that has a limit; it sleeps until the earliest
limit (or runaway time) among them, and not at all while none has one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fuseport.wire.errors import DeadlineExceeded, FuseportError, ResourceExhausted

__all__ = ["Watch", "Watchdog", "past_limit"]

log = logging.getLogger(__name__)

# A watch's states: its kernel runs (limit not passed), it ended in time, its
# caller was answered at the limit (the kernel runs on), it ran past the grace too.
_RUNNING, _FINISHED, _ANSWERED, _RUNAWAY = range(4)


@dataclass(eq=False)
class Watch:
    """One run with a limit, from its start on a worker to its end."""

    key: int
    started: float  # time.monotonic()
    limit: float
    budget: float  # --max-call-seconds when that is the limit; 0.0: the caller's deadline is
    answer: Callable[[FuseportError], None] | None
    who: bytes = b""  # the caller's identity (penalised should it run away: server/penalties.py)
    state: int = _RUNNING

    def error(self) -> FuseportError:
        """What the caller hears once the limit passed with the kernel still running."""
        return past_limit(self.key, self.budget)


def past_limit(key: int, budget: float) -> FuseportError:
    """What a call hears when its limit passed while it ran: `budget` (--max-call-seconds)
    when that was the limit, 0.0 when the caller's deadline was. Whether the kernel was
    stopped between two ops (Core.run) or answered while it runs on (the watchdog)."""
    if budget:
        return ResourceExhausted(
            f"kernel {key}: this call ran past the {budget:g} s one call may take (--max-call-seconds) and was stopped"
        )
    return DeadlineExceeded(f"kernel {key}: the call's deadline passed while it ran; it was stopped")


class Watchdog:
    """Watches runs (see the module's doc). `on_runaway(watch)` is called from
    the watchdog's thread for each runaway that retires the process (the first
    retires it; each names a caller whose kernel ran away)."""

    def __init__(
        self, grace: float, on_runaway: Callable[[Watch], None], *, retire_on_deadline: bool = True
    ) -> None:
        """`retire_on_deadline`: whether a kernel running on past its caller's own
        deadline (not --max-call-seconds) retires the process too. A single serving
        process (no supervisor, no sibling to take its calls) does not: a caller's
        short deadline on an ordinary kernel must not take the whole server away;
        the kernel runs to its end on its worker, its results dropped. Past
        --max-call-seconds, the operator's bound, it retires either way."""
        self.grace = grace
        self.on_runaway = on_runaway
        self.retire_on_deadline = retire_on_deadline
        self._cond = threading.Condition(threading.Lock())
        self._running: set[Watch] = set()
        self._wake_at = float("inf")  # when the thread wakes next (inf: only when told)
        self._thread: threading.Thread | None = None
        self._closed = False
        # Counted for metrics and Describe (read without the lock: ints, one writer).
        self.overruns = {"deadline": 0, "budget": 0}
        self.overruns_by_key: dict[int, int] = {}
        self.runaways = 0

    def watch(
        self,
        key: int,
        deadline: float | None,
        budget_end: float | None,
        budget: float,
        answer: Callable[[FuseportError], None] | None,
        who: bytes = b"",
    ) -> Watch | None:
        """Starts watching a run (None when it has no limit at all)."""
        if deadline is None and budget_end is None:
            return None
        now = time.monotonic()
        if budget_end is not None and (deadline is None or budget_end <= deadline):
            w = Watch(key, now, budget_end, budget, answer, who)
        else:
            assert deadline is not None
            w = Watch(key, now, deadline, 0.0, answer, who)
        with self._cond:
            self._running.add(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="fuseport-watchdog", daemon=True)
                self._thread.start()
            if w.limit < self._wake_at:
                self._wake_at = w.limit  # the loop, if not asleep yet, sees it changed
                self._cond.notify()
        return w

    def finish(self, w: Watch) -> bool:
        """The run is over (or its results are ready): False when its caller was
        answered already at the limit, so its results must be dropped. Idempotent."""
        with self._cond:
            self._running.discard(w)
            if w.state == _RUNNING:
                w.state = _FINISHED
            return w.state == _FINISHED

    def forget(self, key: int) -> None:
        self.overruns_by_key.pop(key, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            answers: list[Watch] = []
            runaways: list[Watch] = []
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                wake = float("inf")
                for w in self._running:
                    if w.state == _RUNNING:
                        if now < w.limit:
                            wake = min(wake, w.limit)
                            continue
                        w.state = _ANSWERED
                        answers.append(w)
                    if w.state == _ANSWERED:
                        if now < w.limit + self.grace:
                            wake = min(wake, w.limit + self.grace)
                        else:
                            w.state = _RUNAWAY  # said once; the process's end stops it
                            runaways.append(w)
                self._wake_at = wake
            for w in answers:
                self._overran(w, now)
            for w in runaways:
                self._runaway(w, now)
            with self._cond:
                # Unless a watch that ends sooner came meanwhile (it lowered _wake_at).
                if not self._closed and self._wake_at == wake:
                    self._cond.wait(None if wake == float("inf") else max(0.0, wake - time.monotonic()))

    def _overran(self, w: Watch, now: float) -> None:
        limit = "budget" if w.budget else "deadline"
        self.overruns[limit] += 1
        self.overruns_by_key[w.key] = self.overruns_by_key.get(w.key, 0) + 1
        log.warning(
            "kernel %d: the call's %s passed %.2f s into its run, which goes on (a kernel is not "
            "interrupted): the caller is answered now and the results will be dropped; should it "
            "still run %g s from now (--overrun-grace-seconds), this serving process retires (for a "
            "caller's deadline: only under a supervisor)",
            w.key, "--max-call-seconds" if w.budget else "deadline", now - w.started, self.grace,
        )  # fmt: skip
        if w.answer is not None:
            try:
                w.answer(w.error())
            except Exception:  # noqa: BLE001 - the caller may be gone; the watch goes on
                log.exception("answering an overrun call failed")

    def _runaway(self, w: Watch, now: float) -> None:
        if not w.budget and not self.retire_on_deadline:
            log.warning(
                "kernel %d: still running %.1f s after its caller's deadline (--overrun-grace-seconds %g); a "
                "single serving process does not retire for a caller's deadline: it runs to its end, its "
                "results dropped (--max-call-seconds bounds every call; --processes adds a supervisor)",
                w.key, now - w.limit, self.grace,
            )  # fmt: skip
            return
        self.runaways += 1
        if self.runaways > 1:
            # The process retires already; its caller ran a runaway all the same.
            log.error("kernel %d: also still running %.1f s past its call's limit", w.key, now - w.limit)
        else:
            log.error(
                "kernel %d: still running %.1f s after its call's %s passed (--overrun-grace-seconds %g); a "
                "kernel cannot be interrupted, so this serving process retires: health NOT_SERVING, drain, "
                "exit status 4 (a supervisor or the container's restart policy starts a fresh one)",
                w.key, now - w.limit, "--max-call-seconds" if w.budget else "deadline", self.grace,
            )  # fmt: skip
        try:
            self.on_runaway(w)
        except Exception:  # noqa: BLE001 - logged; the watchdog must not die
            log.exception("retiring after a runaway kernel failed")
