"""RemoteTensor: a tensor the server keeps on its device, and the lease that keeps it alive."""

from __future__ import annotations

import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from fuseport.wire import _pb, codec
from fuseport.wire.errors import FuseportError, HandleNotFound

__all__ = ["CLIENT_ID_KEY", "Leases", "RemoteTensor"]

log = logging.getLogger(__name__)

# How long a dropped RemoteTensor's id waits for the client's next call to carry its free
# (ExecuteOptions.free_handles) before the lease thread sends a FreeHandles of its own: a
# chain of calls then frees what it drops at no cost of its own, and a client that stops
# calling holds the memory this much longer.
_CARRY_SECONDS = 0.1
# Ids one call carries at most (about 40 bytes each).
_CARRY_MAX = 1024

# The call metadata naming the client, to which the server binds its handles.
CLIENT_ID_KEY = "fuseport-client-id"

Call = Callable[[str, bytes, "float | None"], bytes]
T = TypeVar("T")
# One call to the server as (method, request, what makes the answer of the
# response): the blocking Client and the lease thread send it and wait,
# AsyncClient awaits it, and both get the same behaviour.
Request = tuple[str, bytes, Callable[[bytes], T]]


class RemoteTensor:
    """A tensor that stays on the server's device (from `execute(..., keep=True)`).

    Put it on a later stack of the same client: the server uses it where it is,
    with no transfer. `fetch()` brings its bytes back; `free()` (or leaving a
    `with` block, or dropping the last reference) releases it on the server.
    While any RemoteTensor of a client is alive, the client renews their lease
    in the background; a client that dies stops renewing, and the server frees
    its handles once the lease (--handle-lease-seconds) runs out."""

    __slots__ = ("__weakref__", "_freed", "_handle", "_leases")

    def __init__(self, handle: codec.Handle, leases: Leases) -> None:
        self._handle = handle
        self._leases = leases
        self._freed = False

    @property
    def id(self) -> str:
        return self._handle.id

    @property
    def dtype(self) -> torch.dtype | None:
        return self._handle.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._handle.shape)

    @property
    def device(self) -> str:
        return self._handle.device

    @property
    def nbytes(self) -> int:
        return self._handle.nbytes

    @property
    def server(self) -> str:
        """The serving process that holds it (a call using it must reach that one)."""
        return self._handle.server

    @property
    def freed(self) -> bool:
        return self._freed

    def fetch(self, *, free: bool = False, timeout: float | None = None) -> torch.Tensor:
        """The tensor's value, on this host (with `free`, released on the server too)."""
        self._leases.check_blocking("fetch")
        handle = self.handle()
        (tensor,) = self._leases.fetch([handle.id], free, timeout)
        if free:
            self._forget()
        return tensor

    def free(self, *, timeout: float | None = None) -> None:
        """Releases it on the server now; a second free does nothing."""
        if self._freed:
            return
        self._leases.check_blocking("free")  # before it is forgotten: a refused free frees nothing
        self._forget()
        self._leases.free([self._handle.id], timeout)

    def handle(self) -> codec.Handle:
        """What travels on a stack: the handle, once checked that it is usable."""
        if self._freed:
            raise HandleNotFound(f"RemoteTensor {self._short()} was freed")
        if self._leases.closed:
            raise HandleNotFound(f"RemoteTensor {self._short()} belongs to a closed client")
        return self._handle

    def _forget(self) -> None:
        self._freed = True
        self._leases.forget(self._handle.id)

    def _short(self) -> str:
        return self._handle.id[:20] + "..."

    def __enter__(self) -> RemoteTensor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __copy__(self) -> RemoteTensor:
        # One handle, one object: a copy dropped would free the handle the original names.
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> RemoteTensor:
        return self

    def __del__(self) -> None:
        # No call from here (a finaliser may run anywhere): the lease thread frees it.
        if not getattr(self, "_freed", True):
            self._freed = True
            self._leases.dropped(self._handle.id)

    def __repr__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        state = " freed" if self._freed else ""
        return f"RemoteTensor({dtype}{list(self.shape)} on {self.device}, id={self._short()}{state})"


class Leases:
    """One client's RemoteTensors: wraps handles coming back, renews their lease
    from a background thread while any is alive, frees dropped ones in batches.

    `call` sends a request and waits for its response; it runs on the caller's
    thread (a RemoteTensor's fetch and free) and on the lease thread.
    `refuse_blocking(method)`, when given, is asked before a RemoteTensor's own
    blocking fetch or free, and raises where that call must not wait (on an
    AsyncClient's event loop)."""

    def __init__(self, call: Call, refuse_blocking: Callable[[str], None] | None = None) -> None:
        self.client_id = secrets.token_urlsafe(24)  # 192 random bits, [A-Za-z0-9_-]
        self._call = call
        self._refuse_blocking = refuse_blocking
        self._live: weakref.WeakValueDictionary[str, RemoteTensor] = weakref.WeakValueDictionary()
        self._dropped: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.closed = False
        self.used = False  # whether this client ever held a handle
        self.lease_seconds: float | None = None
        # The server frees the dropped handles a call carries (ResidentUsage.frees_with_calls,
        # learnt at the first renewal): they wait for the client's next call, up to _CARRY_SECONDS.
        self.frees_with_calls = False
        # False for a client of several connections: a free must reach the process that holds
        # the handle, so no call carries frees and the lease thread sends them at once.
        self.calls_carry = True
        self._dropped_at = 0.0  # when the oldest id in _dropped was dropped

    # ------------------------------------------------------------------ stacks

    def to_wire(self, value: Any) -> Any:
        """A stack value with RemoteTensors replaced by their handles."""
        if isinstance(value, RemoteTensor):
            if value._leases is not self:
                raise HandleNotFound(
                    f"{value!r} belongs to another Client: handles are bound to the client that made them"
                )
            return value.handle()
        if isinstance(value, (list, tuple)) and any(_has_remote(v) for v in value):
            return [self.to_wire(v) for v in value]
        return value

    def adopt(self, value: Any) -> Any:
        """A received stack value with handles wrapped as RemoteTensors (one object per id)."""
        if isinstance(value, codec.Handle):
            with self._lock:
                existing = self._live.get(value.id)
                if existing is not None:
                    return existing
                rt = RemoteTensor(value, self)
                self._live[value.id] = rt
                self.used = True
            self._start()
            return rt
        if isinstance(value, list):
            return [self.adopt(v) for v in value]
        return value

    # ------------------------------------------------------------------ requests

    @staticmethod
    def fetch_request(ids: list[str], free: bool) -> Request[list[torch.Tensor]]:
        request = _pb.service.FetchHandlesRequest(ids=ids, free=free).SerializeToString()
        return "FetchHandles", request, codec.decode_stack  # type: ignore[return-value]

    @staticmethod
    def free_request(ids: list[str] | None) -> Request[int]:
        """Frees `ids` (all or none), or every handle of the client for None."""
        message = _pb.service.FreeHandlesRequest(ids=ids or (), all=ids is None)

        def freed(raw: bytes) -> int:
            return _pb.service.FreeHandlesResponse.FromString(raw).freed

        return "FreeHandles", message.SerializeToString(), freed

    def renew_request(self) -> Request[_pb.service.ResidentUsage]:
        def renewed(raw: bytes) -> _pb.service.ResidentUsage:
            usage = _pb.service.RenewLeaseResponse.FromString(raw).usage
            self.lease_seconds = usage.lease_seconds or None
            self.frees_with_calls = usage.frees_with_calls and self.calls_carry
            return usage

        return "RenewLease", _pb.service.RenewLeaseRequest().SerializeToString(), renewed

    def fetch_tensors(self, tensors: Sequence[RemoteTensor], free: bool) -> Request[list[Any]]:
        """A client's fetch of several RemoteTensors (forgotten once freed)."""
        method, request, values = self.fetch_request([t.handle().id for t in tensors], free)

        def fetched(raw: bytes) -> list[Any]:
            out = values(raw)
            if free:
                for t in tensors:
                    t._forget()
            return out

        return method, request, fetched

    def free_tensors(self, tensors: Sequence[RemoteTensor]) -> Request[int] | None:
        """A client's free of several RemoteTensors; None when all are freed already."""
        live = [t for t in tensors if not t.freed]
        ids = [t.handle().id for t in live]
        if not ids:
            return None
        method, request, count = self.free_request(ids)

        def freed(raw: bytes) -> int:
            n = count(raw)
            for t in live:
                t._forget()
            return n

        return method, request, freed

    # ------------------------------------------------------------------ calls

    def send(self, request: Request[T], timeout: float | None) -> T:
        method, body, answer = request
        return answer(self._call(method, body, timeout))

    def fetch(self, ids: list[str], free: bool, timeout: float | None) -> list[torch.Tensor]:
        return self.send(self.fetch_request(ids, free), timeout)

    def free(self, ids: list[str], timeout: float | None) -> int:
        return self.send(self.free_request(ids), timeout)

    def free_all(self, timeout: float | None) -> int:
        return self.send(self.free_request(None), timeout)

    def renew(self, timeout: float | None = None) -> _pb.service.ResidentUsage:
        return self.send(self.renew_request(), timeout)

    def check_blocking(self, method: str) -> None:
        """Raises where a RemoteTensor's blocking `method` must not wait here."""
        if self._refuse_blocking is not None:
            self._refuse_blocking(method)

    # ------------------------------------------------------------------ bookkeeping

    def forget(self, hid: str) -> None:
        with self._lock:
            self._live.pop(hid, None)

    def dropped(self, hid: str) -> None:
        with self._lock:
            first = not self._dropped
            if first:
                self._dropped_at = time.monotonic()
            self._dropped.append(hid)
        if first or not self.frees_with_calls:
            # The lease thread frees them at once, or, where calls carry them, sets its
            # wake-up for when they have waited _CARRY_SECONDS.
            self._wake.set()
        try:
            self._start()
        except RuntimeError:  # interpreter shutdown: the lease frees it on the server
            pass

    def take_dropped(self) -> list[str]:
        """The dropped handles' ids for a call to carry (ExecuteOptions.free_handles),
        taken from the lease thread's list; none where the server would not free them."""
        if not self.frees_with_calls or not self._dropped:
            return []
        with self._lock:
            ids, self._dropped = self._dropped[:_CARRY_MAX], self._dropped[_CARRY_MAX:]
        return ids

    def untake(self, ids: list[str]) -> None:
        """Gives back ids a call took and may not have delivered (it failed): the lease
        thread frees them (an id the server freed already is skipped there)."""
        if ids:
            with self._lock:
                if not self._dropped:
                    self._dropped_at = time.monotonic()
                self._dropped.extend(ids)

    def close(self, timeout: float | None) -> None:
        """Frees every handle of this client on the server (when it ever had one)."""
        request = self.closing()
        if request is not None:
            try:
                self.send(request, timeout)
            except FuseportError as e:  # the server is gone: its lease frees them
                log.info("could not free this client's handles on close: %s", e)

    def closing(self) -> Request[int] | None:
        """Marks the client closed (its lease thread ends, its RemoteTensors are
        refused); the request that frees its handles, None when there is none
        to send (never had a handle, or closed already)."""
        if self.closed:
            return None
        self.closed = True
        self._wake.set()
        return self.free_request(None) if self.used else None

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self.closed:
                return
            self._thread = threading.Thread(target=self._run, name="fuseport-lease", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        """Renews while any RemoteTensor lives; ends when none is left, or when the
        client is closed (even in the middle of a renewal or a free: grpc raises
        ValueError on a channel closed under it, which is then no error)."""
        try:
            self._renewing()
        except ValueError:
            if not self.closed:
                raise

    def _renewing(self) -> None:
        renew_at = 0.0  # at once: the first renewal also says whether calls carry frees
        while not self.closed:
            with self._lock:
                alive = len(self._live) > 0
            # Dropped ids wait for a call to carry them while handles are alive (a chain of
            # calls), for at most _CARRY_SECONDS; then, or with none alive, they go now.
            carry_until = self._dropped_at + _CARRY_SECONDS if self.frees_with_calls and alive else 0.0
            if time.monotonic() >= carry_until:
                self._flush()
            with self._lock:
                if not alive and not self._dropped:
                    self._thread = None  # a later handle starts a new thread
                    return
                waiting = bool(self._dropped)
            now = time.monotonic()
            if alive and now >= renew_at:
                try:
                    self.renew()
                except FuseportError as e:
                    if not self.closed:  # else closing cut it short: nothing is wrong
                        log.warning("could not renew the lease of this client's handles: %s", e)
                now = time.monotonic()
                renew_at = now + (self.lease_seconds or 3.0) / 3
            wake_at = renew_at if alive else now
            if waiting:
                wake_at = min(wake_at, max(carry_until, now))
            self._wake.wait(max(0.0, wake_at - now))
            self._wake.clear()

    def _flush(self) -> None:
        with self._lock:
            ids, self._dropped = self._dropped, []
        if not ids:
            return
        try:
            self.free(ids, None)
        except HandleNotFound:
            # All or none on the server: one already gone (expired) frees none.
            for hid in ids:
                try:
                    self.free([hid], None)
                except FuseportError:
                    pass
        except FuseportError as e:
            log.info("could not free %d dropped handles: %s", len(ids), e)


def _has_remote(value: Any) -> bool:
    if isinstance(value, RemoteTensor):
        return True
    return isinstance(value, (list, tuple)) and any(_has_remote(v) for v in value)
