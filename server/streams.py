"""Memory held by streamed calls whose stack is still arriving: one budget per serving process, a share per token.

A streamed stack's destination is allocated whole when its header arrives
(wire.stream.Assembler), and stays until the stream is complete or ends: a
client that sends a header and stops would otherwise hold it for as long as it
keeps the call open. --stream-idle-seconds ends such a call (the servicer);
this module bounds what all such calls hold at once, so that stalled or slow
streams cannot take the memory the others need. Each header reserves the bytes
it declares before anything is allocated; a reservation is given back when the
stack is complete (it is then the call's, bounded by --max-call-bytes) or the
stream ends any other way.

Identities: with tokens, each token's streams together may hold at most
--max-stream-buffer-bytes-per-token (a client id is the caller's own choice and
counts for nothing here). Without tokens every caller is the same identity, and
the process-wide budget is the only bound.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from fuseport.server.resident import Owner
from fuseport.wire.errors import InvalidStack, ResourceExhausted

__all__ = ["Hold", "StreamBuffers", "default_buffer_bytes", "host_memory_bytes"]

# cgroup v2, then v1: a container's memory limit (the host's memory is not the container's).
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def host_memory_bytes() -> int:
    """The memory this process may use: physical memory, or its cgroup's limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():  # "max" (v2) is no limit; v1 says "no limit" with a huge number
            total = min(total, int(raw))
    return total


def default_buffer_bytes(processes: int = 1) -> int:
    """--max-stream-buffer-bytes when unset: half the memory this host lets the
    server use, shared among its serving processes (each holds its own streams)."""
    return max(1 << 20, host_memory_bytes() // 2 // max(1, processes))


class StreamBuffers:
    """The bytes incomplete streams of this serving process hold, in total and per token."""

    def __init__(self, limit: int, per_token: int) -> None:
        self.limit = limit
        self.per_token = per_token
        self.held = 0
        self.idle_ends = 0  # streams ended by --stream-idle-seconds (counted by the servicer)
        self._by_token: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def hold(self, owner: Owner) -> Hold:
        """What one stream of `owner` holds: nothing until its header is checked."""
        return Hold(self, owner.token)

    def _take(self, token: bytes, nbytes: int) -> None:
        with self._lock:
            if self.held + nbytes > self.limit:
                raise ResourceExhausted(
                    f"the streamed stack declares {nbytes} bytes, but streamed calls still arriving on this "
                    f"serving process hold {self.held} of the {self.limit} bytes they may hold together "
                    "(--max-stream-buffer-bytes); refused before allocating: send it again once others are done"
                )
            mine = self._by_token.get(token, 0)
            if token and mine + nbytes > self.per_token:
                raise ResourceExhausted(
                    f"the streamed stack declares {nbytes} bytes, but this token's streamed calls still arriving "
                    f"hold {mine} of the {self.per_token} bytes one token's may hold together "
                    "(--max-stream-buffer-bytes-per-token); refused before allocating"
                )
            self.held += nbytes
            if token:
                self._by_token[token] = mine + nbytes

    def _give_back(self, token: bytes, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes
            if token:
                left = self._by_token[token] - nbytes
                if left:
                    self._by_token[token] = left
                else:
                    del self._by_token[token]


class Hold:
    """One stream's reservation: `take` once its header is checked, `release` (any
    number of times, from any thread) when its stack is complete or it ended.
    Released is final: a header still being checked on a worker when its stream
    ended (cancelled, or idle) takes nothing, or it would hold its bytes for good."""

    __slots__ = ("_buffers", "_lock", "_nbytes", "_released", "_token")

    def __init__(self, buffers: StreamBuffers, token: bytes) -> None:
        self._buffers = buffers
        self._token = token
        self._nbytes = 0
        self._released = False
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        """Reserves `nbytes` (the header's declared total), or ResourceExhausted naming the flag."""
        with self._lock:
            if self._released:
                raise InvalidStack("stream: the call ended while its header was being read")
            if nbytes > 0:
                self._buffers._take(self._token, nbytes)
                self._nbytes += nbytes

    def release(self) -> None:
        with self._lock:
            nbytes, self._nbytes, self._released = self._nbytes, 0, True
        if nbytes:
            self._buffers._give_back(self._token, nbytes)
