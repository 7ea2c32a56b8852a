"""A client's connections to its target: N channels of their own, calls spread over them, handles sent home.

Behind one port, `fuseport serve --processes N` runs N serving processes, and
the kernel hands each new TCP connection to one of them: one channel (one
connection) reaches one process, so a multi-threaded program sharing one client
gets one process's throughput. `Client(..., connections=N)` opens N channels.
gRPC Python shares a subchannel (the TCP connection) between channels of equal
arguments, so each of ours takes `grpc.use_local_subchannel_pool`: N channels,
N connections, which the kernel spreads over the processes as it spreads
any others (by a hash of the addresses: two connections may reach one process).

What belongs to a process follows the connection that reached it:

* a resident handle (RemoteTensor) lives in the process that made it, whose
  id is the handle id's prefix ("<server>.<secret>"); the connection whose call
  made it is that process's home here, and every later call naming it goes
  there (another process would answer HandleElsewhere);
* a shared-memory session is opened through one connection and named only in
  calls on that connection (`Connection.shared`);
* RenewLease and FreeHandles of every handle go to each connection that made
  handles; FetchHandles and FreeHandles of some ids are split by home
  (`handle_calls`) and their answers joined in order.

Everything else (Register, Describe, List, Unregister, health, calls without
handles) may take any connection: the store is shared. The connection with
the fewest calls in flight takes it, ties in turn.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from grpc_health.v1 import health_pb2_grpc

from fuseport.client.resident import RemoteTensor
from fuseport.client.shm import SharedSession
from fuseport.wire import _pb

__all__ = ["HANDLE_METHODS", "SERVICE", "Connection", "Connections", "HandleCalls", "check_connections"]

SERVICE = "fuseport.v1.KernelService"
_UNARY = (
    "Register", "Execute", "Fallback", "Describe", "List", "Unregister",
    "FetchHandles", "FreeHandles", "RenewLease", "OpenSharedMemory",
)  # fmt: skip
# Methods about a client's handles: they go where the handles live (handle_calls).
HANDLE_METHODS = frozenset({"FetchHandles", "FreeHandles", "RenewLease"})


def check_connections(count: object) -> int:
    """`count` as a number of connections; ValueError (TypeError) naming it when it is none."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"connections={count!r}: expected an int >= 1")
    if count < 1:
        raise ValueError(f"connections={count}: a client needs at least one connection (1 is the default)")
    return count


class Connection:
    """One channel of a client (one TCP connection per address of the target,
    so one serving process behind a shared port) and its stubs, with what
    belongs to that process: the client's shared-memory session through it.

    The `shared*` fields are the client's to use (client.py keeps its
    decisions); AsyncClient's `opening`, `pending` and `gate` are set by it."""

    def __init__(self, index: int, channel: Any) -> None:
        self.index = index
        self.channel = channel
        self.methods = {name: channel.unary_unary(f"/{SERVICE}/{name}") for name in _UNARY}
        self.stream_methods = {
            name: channel.stream_stream(f"/{SERVICE}/{name}Stream") for name in ("Execute", "Fallback")
        }
        # Register of a large graph: its constants as chunks, one RegisterResponse back.
        self.register_stream = channel.stream_unary(f"/{SERVICE}/RegisterStream")
        self.health = health_pb2_grpc.HealthStub(channel)
        self.inflight = 0  # calls on it now (under Connections' lock)
        # The shared-memory session opened through this connection (None: none yet, or given up).
        self.shared: SharedSession | None = None
        self.shared_lock = threading.Lock()
        self.shared_retry_at = 0.0
        # AsyncClient's: one opener at a time, a session still opening, the session's slot semaphore.
        self.opening: Any = None
        self.pending: Any = None
        self.gate: Any = None

    def __repr__(self) -> str:
        return f"Connection({self.index}, inflight={self.inflight})"


@dataclass(frozen=True)
class HandleCalls:
    """A handle method's request split by the connection of the handles' process:
    `parts` is (connection, request, positions of its ids in the caller's request);
    `join` makes one response of theirs, in the caller's order."""

    parts: list[tuple[Connection, bytes, list[int]]]
    method: str

    def join(self, responses: Sequence[bytes]) -> bytes:
        if len(responses) == 1:
            return responses[0]
        if self.method == "FetchHandles":
            values: list[Any] = [None] * sum(len(p) for _, _, p in self.parts)
            for (_, _, positions), raw in zip(self.parts, responses, strict=True):
                got = _pb.service.FetchHandlesResponse.FromString(raw).values
                for i, v in zip(positions, got, strict=True):
                    values[i] = v
            return _pb.service.FetchHandlesResponse(values=values).SerializeToString()  # type: ignore[no-any-return]
        if self.method == "FreeHandles":
            freed = [_pb.service.FreeHandlesResponse.FromString(r) for r in responses]
            joined = _pb.service.FreeHandlesResponse(
                freed=sum(f.freed for f in freed), freed_bytes=sum(f.freed_bytes for f in freed)
            )
            return joined.SerializeToString()  # type: ignore[no-any-return]
        # RenewLease: what the client holds, summed over the processes; the
        # shortest lease (the renewal interval follows it); limits are each process's.
        usages = [_pb.service.RenewLeaseResponse.FromString(r).usage for r in responses]
        usage = _pb.service.ResidentUsage()
        usage.CopyFrom(usages[0])
        usage.handles = sum(u.handles for u in usages)
        usage.bytes = sum(u.bytes for u in usages)
        usage.lease_seconds = min(u.lease_seconds for u in usages)
        return _pb.service.RenewLeaseResponse(usage=usage).SerializeToString()  # type: ignore[no-any-return]


def _process_of(handle_id: str) -> str:
    """The serving process a handle id names (its prefix; server/resident.py makes ids)."""
    return handle_id.partition(".")[0]


class Connections:
    """A client's channels: `count` of them (see the module's docstring).

    With one (the default) there is nothing to choose: `first` takes every
    call, with no lock, no counting and the channel options as given."""

    def __init__(
        self,
        count: int,
        open_channel: Callable[[list[tuple[str, Any]]], Any],
        options: Sequence[tuple[str, Any]],
    ) -> None:
        check_connections(count)
        opts = list(options)
        if count > 1:
            # Else gRPC gives every channel of these arguments the same subchannel: one connection.
            opts.append(("grpc.use_local_subchannel_pool", 1))
        self.all: list[Connection] = []
        try:
            for i in range(count):
                self.all.append(Connection(i, open_channel(opts)))
        except BaseException:
            for c in self.all:
                c.channel.close()
            raise
        self.first = self.all[0]
        self.many = count > 1
        self._lock = threading.Lock()
        self._next = 0  # where the next tie is broken: calls take the connections in turn
        # Serving process (a handle id's prefix) -> the connection whose call made handles there.
        self._homes: dict[str, Connection] = {}

    def __len__(self) -> int:
        return len(self.all)

    def acquire(self, stack: Sequence[Any] = ()) -> Connection:
        """The connection for a call, counted in flight until `release`: the home of
        the stack's RemoteTensors, else the one with the fewest calls in flight."""
        if not self.many:
            return self.first
        home = self._home_of(stack)
        with self._lock:
            if home is None:
                n = len(self.all)
                # The first least busy from `_next` on: idle connections take calls in turn.
                at = min(range(self._next, self._next + n), key=lambda i: self.all[i % n].inflight) % n
                home = self.all[at]
                self._next = (at + 1) % n
            home.inflight += 1
        return home

    def release(self, conn: Connection) -> None:
        if self.many:
            with self._lock:
                conn.inflight -= 1

    def learn(self, conn: Connection, stack: Sequence[Any]) -> None:
        """Records `conn` as the home of the processes that made the RemoteTensors
        in `stack` (a call's result on it)."""
        if not self.many:
            return
        for rt in _remote(stack):
            self._homes[_process_of(rt.id)] = conn  # a dict store: atomic under the GIL

    def holding(self) -> list[Connection]:
        """The connections whose calls made handles (RenewLease and FreeHandles-all go to each)."""
        homes = list(self._homes.values())
        return [c for c in self.all if c in homes]

    def handle_calls(self, method: str, request: bytes) -> HandleCalls:
        """Where a FetchHandles, FreeHandles or RenewLease request goes: to the
        home of each of its handles (ids of one home in one request), or to each
        connection holding handles when it names none (RenewLease, free all).
        Ids of a process this client does not know go to any connection (which
        answers HandleElsewhere or HandleNotFound for them)."""
        if not self.many:
            return HandleCalls([(self.first, request, [])], method)
        ids: list[str] = []
        if method == "FetchHandles":
            fetch = _pb.service.FetchHandlesRequest.FromString(request)
            ids = list(fetch.ids)
        elif method == "FreeHandles":
            free = _pb.service.FreeHandlesRequest.FromString(request)
            ids = [] if free.all else list(free.ids)
        if not ids:
            holding = self.holding() or [self.first]
            return HandleCalls([(c, request, []) for c in holding], method)
        groups: dict[int, tuple[Connection, list[int]]] = {}
        for i, hid in enumerate(ids):
            conn = self._homes.get(_process_of(hid), self.first)
            groups.setdefault(conn.index, (conn, []))[1].append(i)
        if len(groups) == 1:
            ((conn, positions),) = groups.values()
            return HandleCalls([(conn, request, positions)], method)
        parts = []
        for conn, positions in groups.values():
            some = [ids[i] for i in positions]
            if method == "FetchHandles":
                body = _pb.service.FetchHandlesRequest(ids=some, free=fetch.free).SerializeToString()
            else:
                body = _pb.service.FreeHandlesRequest(ids=some).SerializeToString()
            parts.append((conn, body, positions))
        return HandleCalls(parts, method)

    def _home_of(self, stack: Sequence[Any]) -> Connection | None:
        """The connection of the first RemoteTensor in `stack` whose process is known
        (a stack with handles of two processes cannot run anywhere: that process answers so)."""
        if not self._homes:
            return None
        for rt in _remote(stack):
            home = self._homes.get(_process_of(rt.id))
            if home is not None:
                return home
        return None

    def channels(self) -> list[Any]:
        """Every channel, for the client to close (blocking or awaited)."""
        return [c.channel for c in self.all]


def _remote(stack: Sequence[Any]) -> list[RemoteTensor]:
    """The RemoteTensors of a stack, at any depth."""
    out: list[RemoteTensor] = []
    for v in stack:
        if isinstance(v, RemoteTensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(_remote(v))
    return out
