"""Runaway penalties: a caller whose kernel ran away and retired a serving process is refused heavy calls for a while.

A kernel that runs on past its call's limit and --overrun-grace-seconds retires
its serving process (server/watchdog.py): only the process's end stops it. A
caller that could do that again at once would keep every process retiring
(each restart takes seconds to a minute), so the caller is penalised: for
--runaway-penalty-seconds its calls are RESOURCE_EXHAUSTED (Core.prepare), before
they take a worker. A token's calls all, light ones too: a call the plan takes for
light runs on a worker where this process has not met its sizes yet, and a plan can
be wrong about an op's cost (issue 20's re-probe retired processes that way while
penalised, through a pooling op the plan then took for light). Without tokens the
identity is a host (TOKEN_IDENTITY marks the others), whose other callers the server
cannot tell apart: there only the calls that are not light are refused, so that one
caller's runaway leaves the others on its host their light calls. Each further runaway doubles the time (at most
MAX_SECONDS); a caller with no runaway for FORGET_SECONDS after its penalty
ended starts again at the base.

The penalty must outlive the process it retired and reach the other serving
processes of the supervisor (and of any server on the same store), so it is a
small file: `<store-dir>/penalties/<name>`, written by the retiring process
(atomically, under a lock for the count), and read by every process for a call
whose caller's file is there: each process lists the directory at most every
LIST_SECONDS, so that a call costs a set lookup, not a file system call. `<name>` is a hash of the caller's identity (its token's
digest, or its host): neither a token nor an address is on disk. Wall-clock
time, since monotonic clocks are per boot and the files outlive processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fuseport.wire.errors import ResourceExhausted

__all__ = ["FORGET_SECONDS", "MAX_SECONDS", "TOKEN_IDENTITY", "Penalties"]

log = logging.getLogger(__name__)

MAX_SECONDS = 86400.0
FORGET_SECONDS = 86400.0
# How a token's identity starts (plumbing.identity_of); a host's starts b"host:".
TOKEN_IDENTITY = b"token:"
# How stale a process's view of who is penalised may be (a penalty another process wrote).
LIST_SECONDS = 0.5


class Penalties:
    """The penalties of the callers of the servers on one store (see the module's doc)."""

    def __init__(self, directory: Path, base_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.dir = directory
        self.base = base_seconds
        self._clock = clock
        self._names: frozenset[str] = frozenset()  # the files in `dir`, as last listed
        self._listed_at = float("-inf")

    def _path(self, identity: bytes) -> Path:
        return self.dir / _name(identity)

    def _listed(self) -> frozenset[str]:
        now = time.monotonic()
        if now - self._listed_at >= LIST_SECONDS:
            try:
                self._names = frozenset(os.listdir(self.dir))
            except OSError:  # no penalty written yet (or an unreadable directory: nobody is refused)
                self._names = frozenset()
            self._listed_at = now
        return self._names

    def check(self, identity: bytes, key: int) -> None:
        """ResourceExhausted, naming the flag and the time left, while `identity` is penalised."""
        if not identity or not self.base or _name(identity) not in self._listed():
            return
        try:
            state = json.loads(self._path(identity).read_bytes())
            until, strikes = float(state["until"]), int(state["strikes"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring an unreadable penalty file for a caller: %s", e)
            return
        left = until - self._clock()
        if left > 0:
            raise ResourceExhausted(
                f"kernel {key}: refused for {left:.0f} s more: a kernel this caller ran went on past its call's "
                f"limit and retired a serving process ({strikes} time{'s' * (strikes != 1)}), so its calls are "
                "refused for a while (--runaway-penalty-seconds, doubled on each repeat); bound its calls' "
                "work, or set deadlines they can keep"
            )

    def strike(self, identity: bytes, key: int) -> float:
        """Records a runaway of `identity`'s call to kernel `key`: the seconds it is now penalised for."""
        if not identity or not self.base:
            return 0.0
        path = self._path(identity)
        with self._locked():
            now = self._clock()
            strikes = 0
            with contextlib.suppress(FileNotFoundError, OSError, ValueError, KeyError, TypeError):
                state = json.loads(path.read_bytes())
                if now - float(state["until"]) < FORGET_SECONDS:
                    strikes = int(state["strikes"])
            seconds = min(MAX_SECONDS, self.base * 2.0 ** min(strikes, 40))
            until = max(now + seconds, 0.0)
            tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
            tmp.write_text(json.dumps({"strikes": strikes + 1, "until": until, "kernel": key}))
            os.replace(tmp, path)
        self._listed_at = float("-inf")  # this process sees its own penalty at once
        log.warning(
            "kernel %d: its caller's calls are refused for %g s on every serving process of "
            "this store (runaway %d of this caller; --runaway-penalty-seconds)", key, seconds, strikes + 1,
        )  # fmt: skip
        return seconds

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Two processes retiring at once for the same caller both count.
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=4096)
def _name(identity: bytes) -> str:
    return hashlib.sha256(b"fuseport-penalty\0" + identity).hexdigest()[:32]
