"""Device-resident values: tensors kept on the serving device between calls, named by handles.

A handle belongs to the caller that made it (an `Owner`: the client's id and,
with tokens, its token) and to this serving process. Its id is
"<server>.<secret>": `server` is random per process, so a handle that reaches
another process (or this one after a restart) is told apart from one that was
never made (HandleElsewhere); `secret` is 256 random bits. Every other miss
(never made, freed, expired, another caller's) is the same HandleNotFound with
the same message: nothing tells a caller that someone else's handle exists.

A caller's handles live while it renews its lease (any call that uses them
counts): a sweeper thread frees those of callers silent for longer than the
lease. Bytes are bounded per caller (quota) and for the process (budget).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fuseport.wire.codec import Handle
from fuseport.wire.errors import HandleElsewhere, HandleNotFound, InvalidArgument, ResourceExhausted

__all__ = ["CLIENT_ID_KEY", "NO_OWNER", "Owner", "Residents", "Usage", "owner_of"]

log = logging.getLogger(__name__)

# The call metadata that names the client (random per client, made by it).
CLIENT_ID_KEY = "fuseport-client-id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")


@dataclass(frozen=True)
class Owner:
    """Who a call is: a digest of the client id and the caller's token digest
    (empty without tokens), which owns its handles; `has_client_id` is False
    when the call carried none (such a caller can hold no handles).

    `token` (the token's digest, b"" without tokens) is the identity quotas
    count against: a client id is the caller's own choice, so with tokens
    everything the ids of one token hold is bounded together. `tenant` is the
    namespace of the caller's kernels (server/tenants.py): b"" for the shared
    one (an admin, or a server without tokens)."""

    key: bytes
    has_client_id: bool
    token: bytes = b""
    tenant: bytes = b""


# A call without a client id or a token: it can hold no handles.
NO_OWNER = Owner(b"", False)


def owner_of(client_id: str | None, token_digest: bytes, tenant: bytes = b"") -> Owner:
    """The owner of a call's handles. An id that is not 16-128 characters of
    [A-Za-z0-9_-] is InvalidArgument (it is a secret: it is not repeated)."""
    if client_id is None:
        return NO_OWNER if not token_digest and not tenant else Owner(b"", False, token_digest, tenant)
    return _owner(client_id, token_digest, tenant)


# Every call names its owner, and a client sends the same id on every call: the
# check and the hash once per (id, token) rather than once per call. Bounded, and
# an id that is refused raises, which is never cached.
@functools.lru_cache(maxsize=4096)
def _owner(client_id: str, token_digest: bytes, tenant: bytes) -> Owner:
    if not _CLIENT_ID.fullmatch(client_id):
        raise InvalidArgument(f"metadata {CLIENT_ID_KEY!r} must be 16 to 128 characters of [A-Za-z0-9_-]")
    key = hashlib.sha256(token_digest + b"\0" + client_id.encode()).digest()
    return Owner(key, True, token_digest, tenant)


@dataclass(frozen=True)
class Usage:
    """What one owner holds (or, for `totals`, all of them)."""

    handles: int
    bytes: int
    clients: int = 0


@dataclass
class _Entry:
    tensor: torch.Tensor
    nbytes: int
    owner: bytes


@dataclass
class _Holder:
    handles: set[str] = field(default_factory=set)
    bytes: int = 0
    renewed: float = 0.0
    token: bytes = b""  # the identity its quota counts against too (b"": no token)


@dataclass
class _Tally:
    """What all the client ids of one token hold."""

    handles: int = 0
    bytes: int = 0


class Residents:
    def __init__(
        self,
        device: torch.device,
        *,
        lease_seconds: float,
        budget_bytes: int,
        quota_bytes: int,
        max_handles: int,
        token_quota_bytes: int | None = None,
        token_max_handles: int | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        """`token_quota_bytes`/`token_max_handles`: what all the client ids of one
        token may hold together (None: as one client id may). Callers without a
        token are bounded per client id and, together, by the budget."""
        self.device = device
        self.server = secrets.token_hex(6)
        self.lease_seconds = lease_seconds
        self.budget_bytes = budget_bytes
        self.quota_bytes = quota_bytes
        self.max_handles = max_handles
        self.token_quota_bytes = quota_bytes if token_quota_bytes is None else token_quota_bytes
        self.token_max_handles = max_handles if token_max_handles is None else token_max_handles
        self._tokens: dict[bytes, _Tally] = {}
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._holders: dict[bytes, _Holder] = {}
        self._bytes = 0
        self.expired = 0  # handles freed because their lease ran out
        self._stop = threading.Event()
        # Often enough that a handle outlives its lease by at most a quarter of it.
        self._sweeper = threading.Thread(target=self._sweep_loop, name="fuseport-lease", daemon=True)
        self._sweeper.start()

    # ------------------------------------------------------------------ use

    def resolve(self, owner: Owner, value: Any, where: str) -> Any:
        """`value` with every Handle in it replaced by its tensor (lists too)."""
        if isinstance(value, Handle):
            return self._get(owner, value.id, where)
        if isinstance(value, list):
            return [self.resolve(owner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    def has_handles(self, value: Any) -> bool:
        if isinstance(value, Handle):
            return True
        return isinstance(value, list) and any(self.has_handles(v) for v in value)

    def check_room(self, owner: Owner, nbytes: int, what: str) -> None:
        """Refuses, before it is computed, what could not be kept."""
        self._require(owner)
        with self._lock:
            holder = self._holders.get(owner.key) or _Holder(token=owner.token)
            self._check(holder, nbytes, 0, what)

    def keep(
        self,
        owner: Owner,
        values: Sequence[Any],
        inputs: Sequence[Any],
        what: str,
        copy: bool = False,
        mark: Callable[[torch.Tensor], None] | None = None,
    ) -> list[Any]:
        """`values` with each tensor in it (lists too) kept here and replaced by
        its Handle (a copy of each, with `copy`); all or none: over a limit,
        nothing is kept. `mark` is called with each tensor kept (where it was made:
        devices.Made)."""
        self._require(owner)
        held = {_storage_ptr(t) for t in _tensors(inputs)}
        kept: list[tuple[str, torch.Tensor, int]] = []

        def own(t: torch.Tensor) -> torch.Tensor:
            # A view of an input (an identity kernel, a slice) or of a larger block
            # would hold that whole block (on the CPU: the request message): a
            # handle keeps exactly its own bytes.
            if copy or _storage_ptr(t) in held or t.untyped_storage().nbytes() > t.numel() * t.element_size():
                return t.clone()
            return t

        def convert(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                t = own(v.detach())
                if mark is not None:
                    mark(t)
                hid = f"{self.server}.{secrets.token_urlsafe(32)}"
                nbytes = t.untyped_storage().nbytes()
                kept.append((hid, t, nbytes))
                return Handle(hid, t.dtype, tuple(t.shape), str(t.device), nbytes, self.server)
            if isinstance(v, (list, tuple)):
                return [convert(x) for x in v]
            return v

        out = [convert(v) for v in values]
        total = sum(n for _, _, n in kept)
        with self._lock:
            holder = self._holders.get(owner.key) or _Holder(token=owner.token)
            self._check(holder, total, len(kept), what)
            self._holders[owner.key] = holder
            for hid, t, n in kept:
                self._entries[hid] = _Entry(t, n, owner.key)
                holder.handles.add(hid)
            holder.bytes += total
            if holder.token:
                tally = self._tokens.setdefault(holder.token, _Tally())
                tally.handles += len(kept)
                tally.bytes += total
            holder.renewed = self._clock()
            self._bytes += total
        return out

    def fetch(self, owner: Owner, ids: Sequence[str]) -> list[torch.Tensor]:
        self._require(owner)
        return [self._get(owner, hid, f"ids[{i}]") for i, hid in enumerate(ids)]

    def free(self, owner: Owner, ids: Iterable[str] | None) -> tuple[int, int]:
        """Frees `ids` (all of them, or none if one is not the owner's live
        handle), or every handle of the owner (None): (handles, bytes) freed."""
        self._require(owner)
        with self._lock:
            holder = self._holders.get(owner.key)
            if ids is None:
                ids = list(holder.handles) if holder else []
            else:
                ids = list(dict.fromkeys(ids))  # the same id twice frees it once
                for i, hid in enumerate(ids):
                    self._entry_locked(owner, hid, f"ids[{i}]")
            freed = [self._drop_locked(hid) for hid in ids]
            if holder is not None:
                holder.renewed = self._clock()
        return len(freed), sum(freed)

    def release(self, owner: Owner, ids: Iterable[str]) -> tuple[int, int]:
        """Frees those of `ids` that are the owner's live handles here and skips
        the rest (freed, expired, another process's or owner's: a client's
        dropped handles, carried by its next call, which a lease may have ended
        first): (handles, bytes) freed."""
        if not owner.has_client_id:
            return 0, 0
        count = nbytes = 0
        with self._lock:
            for hid in dict.fromkeys(ids):
                entry = self._entries.get(hid)
                if entry is not None and hmac.compare_digest(entry.owner, owner.key):
                    nbytes += self._drop_locked(hid)
                    count += 1
        return count, nbytes

    def renew(self, owner: Owner) -> Usage:
        self._require(owner)
        with self._lock:
            holder = self._holders.get(owner.key)
            if holder is None:
                return Usage(0, 0)
            holder.renewed = self._clock()
            return Usage(len(holder.handles), holder.bytes)

    def usage(self, owner: Owner) -> Usage:
        with self._lock:
            holder = self._holders.get(owner.key) if owner.has_client_id else None
            return Usage(len(holder.handles), holder.bytes) if holder else Usage(0, 0)

    def totals(self) -> Usage:
        with self._lock:
            return Usage(len(self._entries), self._bytes, sum(1 for h in self._holders.values() if h.handles))

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._entries.clear()
            self._holders.clear()
            self._tokens.clear()
            self._bytes = 0

    # ------------------------------------------------------------------ helpers

    def _require(self, owner: Owner) -> None:
        if not owner.has_client_id:
            raise InvalidArgument(
                f"device-resident values need a client id: send call metadata {CLIENT_ID_KEY!r} "
                "(16 to 128 characters of [A-Za-z0-9_-], random per client; the Python client does)"
            )

    def _check(self, holder: _Holder, nbytes: int, count: int, what: str) -> None:
        """Under the lock."""
        held, handles = holder.bytes, len(holder.handles)
        if holder.token:
            # Checked first: a client id is the caller's own choice, so a quota per
            # id alone would give a caller as many quotas as ids it makes up.
            tally = self._tokens.get(holder.token) or _Tally()
            if tally.bytes + nbytes > self.token_quota_bytes:
                raise ResourceExhausted(
                    f"{what}: keeping {nbytes} bytes on the device would take this caller's token to "
                    f"{tally.bytes + nbytes} bytes (all its client ids together), over its quota of "
                    f"{self.token_quota_bytes} bytes (--max-resident-bytes-per-token); free handles or fetch "
                    "the results instead"
                )
            if tally.handles + count > self.token_max_handles:
                raise ResourceExhausted(
                    f"{what}: this caller's token would hold {tally.handles + count} handles (all its client "
                    f"ids together), over its limit of {self.token_max_handles} (--max-handles-per-token)"
                )
        if held + nbytes > self.quota_bytes:
            raise ResourceExhausted(
                f"{what}: keeping {nbytes} bytes on the device would take this client to {held + nbytes} "
                f"bytes, over its quota of {self.quota_bytes} bytes (--max-resident-bytes-per-client); "
                "free handles or fetch the results instead"
            )
        if self._bytes + nbytes > self.budget_bytes:
            raise ResourceExhausted(
                f"{what}: keeping {nbytes} bytes on the device would take the server to "
                f"{self._bytes + nbytes} resident bytes, over its budget of {self.budget_bytes} bytes "
                "(--max-resident-bytes)"
            )
        if handles + count > self.max_handles:
            raise ResourceExhausted(
                f"{what}: this client would hold {handles + count} handles, over its limit of "
                f"{self.max_handles} (--max-handles-per-client)"
            )

    def _get(self, owner: Owner, hid: str, where: str) -> torch.Tensor:
        self._require(owner)
        with self._lock:
            entry = self._entry_locked(owner, hid, where)
            self._holders[owner.key].renewed = self._clock()
            return entry.tensor

    def _entry_locked(self, owner: Owner, hid: str, where: str) -> _Entry:
        server, dot, _ = hid.partition(".")
        if dot and server != self.server and re.fullmatch(r"[0-9a-f]{12}", server):
            raise HandleElsewhere(
                f"{where}: handle made by serving process {server!r}, and this is {self.server!r}: send "
                "calls that use it to the process that made it (after a server restart it is gone)"
            )
        entry = self._entries.get(hid)
        # One answer for every miss, and the owner compared in constant time.
        if entry is None or not hmac.compare_digest(entry.owner, owner.key):
            raise HandleNotFound(
                f"{where}: no live handle with this id for this client on this server "
                "(never made, freed, expired, or not this client's)"
            )
        return entry

    def _drop_locked(self, hid: str) -> int:
        entry = self._entries.pop(hid)
        holder = self._holders[entry.owner]
        holder.handles.discard(hid)
        holder.bytes -= entry.nbytes
        self._bytes -= entry.nbytes
        if holder.token:
            tally = self._tokens[holder.token]
            tally.handles -= 1
            tally.bytes -= entry.nbytes
            if not tally.handles:
                del self._tokens[holder.token]
        if not holder.handles:
            del self._holders[entry.owner]
        return entry.nbytes

    def _sweep_loop(self) -> None:
        interval = max(0.05, min(self.lease_seconds / 4, 5.0))
        while not self._stop.wait(interval):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the sweeper must outlive any one failure
                log.exception("sweeping expired handles failed")

    def sweep(self) -> int:
        """Frees the handles of owners silent for longer than the lease."""
        now = self._clock()
        dropped: list[torch.Tensor] = []  # released outside the lock
        with self._lock:
            stale = [k for k, h in self._holders.items() if now - h.renewed > self.lease_seconds]
            for key in stale:
                for hid in list(self._holders[key].handles):
                    dropped.append(self._entries[hid].tensor)
                    self._drop_locked(hid)
            self.expired += len(dropped)
        if dropped:
            log.info("freed %d handles of %d clients whose lease expired", len(dropped), len(stale))
        n = len(dropped)
        del dropped
        return n


def _tensors(values: Iterable[Any]) -> Iterable[torch.Tensor]:
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()
