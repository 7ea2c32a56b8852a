"""The workers shared fairly among callers: a call waits for a worker in its caller's queue, and the caller holding fewest goes first.

Every call that needs a worker thread (Plumbing.on_worker, and off_loop for a
kernel: every method, a stream's chunks included, not only those that run
kernels, or one caller's Registers of large graphs could take every worker)
first takes one of --workers places here, and gives it back when its worker is
free again: when the kernel ends, not when its caller was answered (a kernel
past its limit still holds its thread). Calls that wait are queued per identity (a token, or a
host: plumbing.identity_of), and a place that frees goes to the waiting identity
that holds fewest, ties in turn (round robin), each identity's calls in order.

Nothing stops a kernel once it runs, so fairness when places free up is not
enough: one identity that took every worker with long calls would hold them
until its calls end, and another's call would wait that long. So one identity
holds at most `per_identity` places (--workers-per-identity; by default
--workers minus one): however long one caller's calls run, another caller's call
finds a worker. With more callers than that leaves room for, a call waits for the
next place to free, and then goes ahead of every caller that holds more.

A call that waits holds its request meanwhile (gRPC's buffer of a unary one; a
streamed stack keeps its reservation, server/streams.py), so one identity may
have at most `max_waiting` calls waiting (--max-waiting-calls-per-identity): one
more is RESOURCE_EXHAUSTED at once, and never runs.

A call whose deadline passes while it waits is DEADLINE_EXCEEDED and never
runs. Runs on the event loop only: no lock.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from fuseport.wire.errors import DeadlineExceeded, ResourceExhausted

__all__ = ["WorkerShare"]


class WorkerShare:
    """`workers` places, at most `per_identity` of them held by one identity, which
    may have at most `max_waiting` calls waiting for one."""

    def __init__(self, workers: int, per_identity: int, max_waiting: int = 64) -> None:
        self.workers = workers
        self.per_identity = max(1, min(per_identity, workers))
        self.max_waiting = max(1, max_waiting)
        self.running = 0  # places held
        self.waiting = 0  # calls queued
        self._held: dict[bytes, int] = {}
        # Identity -> its waiting calls; the dict's order is the turn (round robin).
        self._queues: dict[bytes, deque[asyncio.Future[None]]] = {}

    def held(self, identity: bytes) -> int:
        return self._held.get(identity, 0)

    async def acquire(self, identity: bytes, deadline: float | None) -> None:
        """Returns once `identity` holds a place for this call (release it after);
        DeadlineExceeded if `deadline` (time.monotonic) passes first."""
        if not self._queues and self.running < self.workers and self.held(identity) < self.per_identity:
            self._take(identity)  # nobody waits: no future, no turn of the loop
            return
        queue = self._queues.get(identity)
        if queue is not None and len(queue) >= self.max_waiting:
            raise ResourceExhausted(
                f"this caller already has {len(queue)} calls waiting for a worker, the most one caller may "
                f"(--max-waiting-calls-per-identity; {self.held(identity)} of the {self.workers} workers are "
                "this caller's): refused at once, it did not run; send it again once earlier calls are done"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(identity, deque()).append(waiter)
        self.waiting += 1
        self._dispatch()
        if waiter.done():
            return
        try:
            if deadline is None:
                await waiter
            else:
                await asyncio.wait_for(asyncio.shield(waiter), max(0.0, deadline - time.monotonic()))
        except BaseException as e:
            if waiter.done() and not waiter.cancelled():
                self.release(identity)  # given a place at the moment it gave up
            else:
                waiter.cancel()
                self._drop(identity, waiter)
            if isinstance(e, TimeoutError):
                raise DeadlineExceeded(
                    f"the call's deadline passed while it waited for a worker ({self.running} of {self.workers} "
                    f"busy, {self.held(identity)} of them this caller's, who may hold {self.per_identity}: "
                    "--workers, --workers-per-identity); it did not run"
                ) from None
            raise

    def release(self, identity: bytes) -> None:
        """A place `identity` held is free again: the next waiting call takes it."""
        n = self._held[identity] - 1
        if n:
            self._held[identity] = n
        else:
            del self._held[identity]
        self.running -= 1
        self._dispatch()

    def _take(self, identity: bytes) -> None:
        self._held[identity] = self.held(identity) + 1
        self.running += 1

    def _drop(self, identity: bytes, waiter: asyncio.Future[None]) -> None:
        queue = self._queues.get(identity)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self.waiting -= 1
            if not queue:
                del self._queues[identity]

    def _dispatch(self) -> None:
        while self.running < self.workers and self._queues:
            chosen: bytes | None = None
            fewest = self.per_identity
            for identity in self._queues:  # in turn: the first of those holding fewest
                held = self.held(identity)
                if held < fewest:
                    chosen, fewest = identity, held
            if chosen is None:
                return  # every waiting identity holds its share: it waits for one of its own
            queue = self._queues.pop(chosen)
            waiter = queue.popleft()
            self.waiting -= 1
            if queue:
                self._queues[chosen] = queue  # to the end of the turn
            if waiter.done():
                # Cancelled (its call's task was, while it awaited the waiter), and its
                # handler not yet run to drop it: a place given to it would never come back.
                continue
            self._take(chosen)
            waiter.set_result(None)
