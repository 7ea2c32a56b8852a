"""Shared memory for clients on the server's host (see service.proto, "Shared memory").

Why this shape, against Triton's shared-memory extension (the anchor): there, a
client creates a named region in /dev/shm and registers its name; the server
maps whatever that name opens. Here the client registers nothing: it asks for
a session over gRPC (authenticated like every call) and hands its memory over
a Unix socket as sealed memfds. So no name exists for anyone to guess or open,
a region can never shrink under the server (the SIGBUS that a truncated
mapping raises would end the process), and when the client exits or dies its
connection closes and every region is unmapped then and there, with no lease
to wait for. The socket lives in Linux's abstract namespace: a client in the
same network namespace (the same host, the same pod) reaches it, one anywhere
else cannot, which is exactly "co-located".

The client may rewrite its region at any time, so a check that read an input's
bytes and a kernel that then read them again would be a race it could win. On
the CPU the kernel runs on the region itself (no copy), except for the inputs
whose values decide whether it may run at all: those the plan's data checks
read (an index, an integer divisor), bool tensors (checked to hold 0 and 1),
and all of them where a check reads a value the graph computes (it may be a
view of an input), where sizes depend on the data, or where results are kept
on the server. Those are copied before anything checks them
(`Core._own_inputs`). What is left reads client bytes that no check depends
on: rewriting them mid-call changes nothing but the caller's own results. A
device server copies every input onto its device anyway.

A client's CUDA tensors, on the device this process serves on, travel as CUDA IPC
handles instead (wire/cuda_ipc.py): only within a session (the socket proved
the client is on this host; the session binds it to its client id and token),
and the same way: the server maps the client's allocation, checks the tensor
lies inside what the driver says it maps, copies it out on the device and
unmaps it, all before the call goes on. Nothing of the server's is exported.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import secrets
import select
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from fuseport.server.resident import Owner
from fuseport.server.streams import host_memory_bytes
from fuseport.wire import codec, cuda_ipc, dtypes, shm
from fuseport.wire.codec import message_room
from fuseport.wire.errors import (
    CudaIpcUnavailable,
    InvalidArgument,
    InvalidStack,
    ResourceExhausted,
    ResultTooLarge,
    SharedMemoryUnavailable,
)

__all__ = ["MAX_SLOTS", "SharedCall", "SharedMemory", "check_slot", "default_page_lock_bytes", "shared_sizes"]

log = logging.getLogger(__name__)

MAX_SLOTS = 64  # output slots per session: calls one client runs at once through it
MAX_REGIONS = shm.MAX_REGIONS  # input regions a session may hand over
MAX_SESSIONS = 256  # sessions per serving process, pending and connected (--shared-memory-sessions)
SESSIONS_PER_IDENTITY = 64  # of those, one identity's (--shared-memory-sessions-per-identity)
MAX_PENDING = 32  # connections that have not yet said HELLO
# Of those, what one user (the peer's uid, SO_PEERCRED) may hold: past it, its own
# oldest goes; past MAX_PENDING, the oldest of the user holding the most goes. So
# connections that never say HELLO take no slot from another user, and a client
# (which says HELLO as soon as it connects) gets one even among its own user's idle ones.
PENDING_PER_UID = 8
HELLO_SECONDS = 2.0  # a connection has this long to present its ticket (a client sends it on connecting)
TICKET_SECONDS = 30.0  # a ticket unused this long is void (--shared-memory-ticket-seconds)
IDLE_SECONDS = 600.0  # a session without a call this long is ended (--shared-memory-idle-seconds)
_OUTPUT_STEP = 1 << 20  # output regions are sized in whole MiB
# The longest a call waits for its session's packets already sent to be handled
# before it picks a new output region (_Session.settle).
_SETTLE_SECONDS = 0.5
# All sessions of a process together may map this many times one session's
# budget: a client that hands over a sparse memfd costs itself nothing, but the
# pages the server faults in reading it are the server's while it is mapped.
TOTAL_SESSIONS_OF_BUDGET = 4
# Device output regions (results on the client's GPU) of all sessions of a serving process
# together: at most this fraction of the device's memory (1/8).
DEVICE_OUTPUTS_OF_MEMORY = 8
# Sends after HELLO never wait: a client's unread packets fill its socket only
# if it stopped reading, and then the session ends instead.
_NO_WAIT = socket.MSG_DONTWAIT


@dataclass
class SharedCall:
    """A call whose stack names tensors in a shared-memory session (and, with a
    slot, whose results go back there): what Core.execute needs of it, and how
    long reading and placing took (the call's decoding and encoding)."""

    session: str
    slot: int = 0
    # The client asks for a fresh output region: its last results still live as
    # tensors over the slot's current one (see client/shm.py).
    fresh_output: bool = False
    # Tensor results stay on the server's device, in the slot's device output region
    # (ExecuteOptions.shared_memory_cuda_outputs), where this server offers it.
    cuda_outputs: bool = False
    # The inputs left in the client's region (views, by id()): what
    # Core._own_inputs copies where the plan's checks read them.
    views: dict[int, torch.Tensor] = field(default_factory=dict)
    read_ns: int = 0
    place_ns: int = 0


@dataclass
class _Session:
    id: str
    owner: Owner
    ticket: str
    issued: float
    conn: socket.socket | None = None
    peer: str = ""
    peer_pid: int = 0  # SO_PEERCRED's, once connected: the identity of a caller without a token
    used: float = 0.0  # monotonic time of its last call or region (idle sessions are ended)
    regions: dict[int, shm.Region] = field(default_factory=dict)  # the client's (inputs)
    outputs: dict[int, shm.Region] = field(default_factory=dict)  # per slot, the server's
    # Output regions taken off their slot (ExecuteOptions.shared_memory_fresh_output):
    # the client still reads them, so they count against its budget until it returns
    # them (RETURN) or hands them back for reuse (SPARE). Never written meanwhile.
    retired: dict[int, shm.Region] = field(default_factory=dict)
    # Retired regions the client reads no more and keeps mapped: a slot that needs a
    # new output region takes one of these first (warm pages, no new memfd).
    spares: dict[int, shm.Region] = field(default_factory=dict)
    # Per slot, its device output region (ExecuteOptions.shared_memory_cuda_outputs): its
    # id and the allocation. Replaced by a larger one when results outgrow it.
    devices: dict[int, tuple[int, cuda_ipc.DeviceMemory]] = field(default_factory=dict)
    # Between a call putting a new device region in `devices` and the session's end
    # taking them all (and their bytes off SharedMemory.device_output_bytes).
    devices_lock: threading.Lock = field(default_factory=threading.Lock)
    # Between a call retiring its slot's region (place) and the socket's thread looking
    # for a region the client hands back (SPARE), so that the region is always found.
    outputs_lock: threading.Lock = field(default_factory=threading.Lock)
    next_output: int = 1
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False
    # Set by the socket's thread from when a packet is readable until it is handled.
    handling: bool = False
    handled: threading.Condition = field(default_factory=threading.Condition)

    def settle(self) -> None:
        """Waits (at most _SETTLE_SECONDS) until every packet the client has sent so
        far is handled. A client hands a region back (SPARE, RETURN) when its last
        result tensor dies, on the session's socket, and its next call goes by gRPC:
        nothing else orders the two, and the call would take a new region where the
        spare was already on its way (the region count then depended on threads)."""
        conn = self.conn
        if conn is None:
            return
        end = time.monotonic() + _SETTLE_SECONDS
        with self.handled:
            while not self.closed and (self.handling or _readable(conn)):
                left = end - time.monotonic()
                if left <= 0:
                    return
                self.handled.wait(min(left, 0.005))

    @property
    def mapped(self) -> int:
        # Snapshots (list() copies a dict in one step): the socket's thread adds
        # regions while a call's thread adds outputs, and summing over a dict
        # that changes size underneath raises RuntimeError.
        return (
            sum(r.size for r in list(self.regions.values()))
            + sum(r.size for r in list(self.outputs.values()))
            + sum(r.size for r in list(self.retired.values()))
            + sum(r.size for r in list(self.spares.values()))
            + sum(m.size for _, m in list(self.devices.values()))
        )

    def identity(self) -> tuple[str, bytes | int]:
        """Whom the session counts against (see SharedMemory.open): its token; without
        one, the peer process once connected, the client id while pending."""
        if self.owner.token:
            return "token", self.owner.token
        if self.conn is not None:
            return "process", self.peer_pid
        return "client", self.owner.key


class SharedMemory:
    """The sessions of one serving process, and the socket their clients connect to."""

    def __init__(
        self,
        enabled: bool,
        max_bytes: int,
        cuda_device: torch.device | None = None,
        *,
        page_lock: torch.device | None = None,
        page_lock_bytes: int = 0,
        max_sessions: int = MAX_SESSIONS,
        per_identity: int = SESSIONS_PER_IDENTITY,
        ticket_seconds: float = TICKET_SECONDS,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        """`cuda_device`: the CUDA device this process serves on, whose allocations
        sessions may name by CUDA IPC handle (None: no CUDA IPC). `page_lock`: the
        CUDA device whose driver page-locks the regions mapped here (None: none), up to
        `page_lock_bytes` in all, so that copies between a region and the device are DMA
        at the bus's speed, not staged through the driver's bounce buffer.

        Sessions are bounded per process (`max_sessions`, pending and connected)
        and per identity (`per_identity`): a caller's token; without tokens, its
        client id for pending tickets (the caller chooses it, so that bound is
        only as good as the callers) and the peer process (SO_PEERCRED) once
        connected. Tickets not presented within `ticket_seconds` and sessions
        idle for `idle_seconds` are ended, so what a caller leaves lying around
        stops counting against everyone."""
        self.max_bytes = max_bytes
        self.max_sessions = max_sessions
        self.per_identity = per_identity
        self.ticket_seconds = ticket_seconds
        self.idle_seconds = idle_seconds
        self.address = ""
        self.reason = "" if enabled else "shared memory is off on this server (--shared-memory off)"
        # The UUID of that device, once the driver confirmed it. Only the serving
        # device: mapping another GPU's memory would retain a context there (hundreds
        # of MiB of another process's device) and copy between GPUs.
        self.cuda_devices: list[bytes] = []
        self._cuda_device = cuda_device
        # resolve_device gives CUDA devices an index; a bare "cuda" is device 0 as there.
        self._cuda_ordinal = 0 if cuda_device is None else cuda_device.index or 0
        # Whether results may stay on that device, in allocations handed to the client
        # (OpenSharedMemoryResponse.cuda_outputs), and what their sizes are multiples of.
        self.cuda_outputs = False
        self._granularity = 0
        # Device output regions of all sessions together: at most DEVICE_OUTPUTS_OF_MEMORY of
        # the device's memory (set at start), reserved before each allocation, so that no
        # client's results can take the memory other callers' kernels run in.
        self.device_output_bytes = 0
        self._device_output_cap = 0
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._page_lock = page_lock
        self.page_lock_bytes = page_lock_bytes
        # Regions to unregister, from their finalizers, and the thread that does it.
        self._unlocks: queue.SimpleQueue[tuple[int, int, int, object]] = queue.SimpleQueue()
        self._unlocker: threading.Thread | None = None
        self.locked_bytes = 0  # page-locked now (fuseport_shared_memory_locked_bytes)
        self._lock_failed = False  # said once in the log
        # Connections yet to say HELLO, oldest first: their peer's uid (see PENDING_PER_UID).
        self._pending: dict[socket.socket, int] = {}
        self._listener: socket.socket | None = None
        if enabled and not shm.AVAILABLE:
            self.reason = "shared memory needs Linux (memfd seals, abstract Unix sockets)"

    @property
    def enabled(self) -> bool:
        return not self.reason

    def start(self) -> None:
        """Opens the socket (a random abstract name) and starts accepting."""
        if not self.enabled:
            log.info("%s", self.reason)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        name = f"fuseport-{secrets.token_hex(16)}"
        try:
            sock.bind("\0" + name)
            sock.listen(64)
        except OSError as e:
            sock.close()
            self.reason = f"shared memory is unavailable: cannot open its socket: {e}"
            log.warning("%s", self.reason)
            return
        self._listener, self.address = sock, "@" + name
        threading.Thread(target=self._accept, name="fuseport-shm-accept", daemon=True).start()
        threading.Thread(target=self._sweep_loop, name="fuseport-shm-sweep", daemon=True).start()
        log.info("shared memory for co-located clients on %s", self.address)
        if self._cuda_device is not None:
            drv = cuda_ipc.driver()
            if drv is None:
                log.warning("CUDA IPC unavailable (%s): CUDA tensors of local clients go through host memory",
                            cuda_ipc.why_not())  # fmt: skip
            else:
                self.cuda_devices = [drv.uuid(self._cuda_ordinal)]
                log.info("CUDA IPC for co-located clients' CUDA tensors on %s", self._cuda_device)
                self._offer_cuda_outputs(drv)

    def _offer_cuda_outputs(self, drv: cuda_ipc.Driver) -> None:
        """Offers results on the device where one allocation can be made, exported and
        released here: a driver or device without the calls (virtual memory management,
        POSIX file descriptor handles) keeps them in host memory, as before."""
        ordinal = self._cuda_ordinal
        try:
            granularity = drv.granularity(ordinal)
            probe = drv.allocate(ordinal, granularity)
            os.close(probe.export_fd())
            del probe
        except (cuda_ipc.CudaError, OSError) as e:
            log.info("results of co-located clients stay in host memory: no exportable device allocations (%s)", e)
            return
        self._device_output_cap = torch.cuda.get_device_properties(ordinal).total_memory // DEVICE_OUTPUTS_OF_MEMORY
        self._granularity, self.cuda_outputs = granularity, True

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _hang_up(listener)
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            self._end(s, "server closing")

    def _room(self, session: _Session) -> int:
        """Bytes `session` may still map: its own budget, and what all sessions
        together may map (TOTAL_SESSIONS_OF_BUDGET x --shared-memory-max-bytes)."""
        with self._lock:
            sessions = list(self._sessions.values())
        everyone = sum(s.mapped for s in sessions)
        return min(self.max_bytes - session.mapped, TOTAL_SESSIONS_OF_BUDGET * self.max_bytes - everyone)

    def stats(self) -> tuple[int, int]:
        """Connected sessions and bytes they have mapped (regions of both sides)."""
        with self._lock:
            live = [s for s in self._sessions.values() if s.conn is not None]
        return len(live), sum(s.mapped for s in live)

    # ------------------------------------------------------------------ gRPC side

    def open(self, owner: Owner) -> tuple[str, str, str]:
        """A new session for `owner`: (socket address, ticket, session id)."""
        if not self.enabled:
            raise SharedMemoryUnavailable(self.reason)
        if not owner.has_client_id:
            raise InvalidArgument("OpenSharedMemory needs 'fuseport-client-id' metadata: a session belongs to a client")
        self.sweep()
        now = time.monotonic()
        session = _Session(secrets.token_hex(16), owner, secrets.token_hex(32), now, used=now)
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted(
                    f"{self.max_sessions} shared-memory sessions (pending and connected) are open on this serving "
                    "process (--shared-memory-sessions)"
                )
            # A pending ticket counts as a session: opening and never connecting
            # must not be a free way to fill the table.
            who = session.identity()
            held = sum(1 for s in self._sessions.values() if s.identity() == who)
            if held >= self.per_identity:
                raise ResourceExhausted(
                    f"this {who[0]} holds {held} shared-memory sessions (pending and connected) on this serving "
                    f"process, its limit (--shared-memory-sessions-per-identity); close some, or wait "
                    f"{self.ticket_seconds:g} s for unused tickets to expire"
                )
            self._sessions[session.id] = session
        return self.address, session.ticket, session.id

    def sweep(self) -> int:
        """Voids tickets not presented in time and ends sessions idle for too long; how many."""
        now = time.monotonic()
        with self._lock:
            void = [k for k, s in self._sessions.items() if s.conn is None and now - s.issued > self.ticket_seconds]
            for sid in void:
                del self._sessions[sid]
            idle = [s for s in self._sessions.values() if s.conn is not None and now - s.used > self.idle_seconds]
        for s in idle:
            self._end(s, f"idle for more than {self.idle_seconds:g} s (--shared-memory-idle-seconds)")
        return len(void) + len(idle)

    def _sweep_loop(self) -> None:
        interval = max(0.05, min(self.ticket_seconds / 2, self.idle_seconds / 4, 5.0))
        while self._listener is not None:
            time.sleep(interval)
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the sweeper must outlive any one failure
                log.exception("sweeping shared-memory sessions failed")

    def _session(self, owner: Owner, sid: str) -> _Session:
        s = self._sessions.get(sid)
        if s is None or s.owner != owner or s.conn is None or s.closed:
            # Never made, closed, another client's, or another serving process's:
            # one answer for all (a session id is not a secret to probe for).
            raise SharedMemoryUnavailable(
                "shared-memory session not open on this serving process (closed, or opened on another)"
            )
        s.used = time.monotonic()
        return s

    def resolve(
        self,
        owner: Owner,
        sid: str,
        stack: list[Any],
        device: torch.device,
        views: dict[int, torch.Tensor] | None = None,
    ) -> list[Any]:
        """The stack with each Shared value replaced by its tensor on `device`: a copy
        of its bytes (server-owned memory: what the client writes later changes
        nothing), or, with `views` on the CPU, the bytes in the client's region
        themselves, recorded in `views` (the module doc says which may stay there)."""
        session = self._session(owner, sid)

        def value(v: codec.Shared, where: str) -> torch.Tensor:
            if v.cuda_handle:
                return self._from_cuda(v, where)
            if v.cuda_device:
                raise InvalidStack(f"{where}: names a device output region; only a response does")
            region = session.regions.get(v.region)
            if region is None:
                raise InvalidStack(f"{where}: shared-memory region {v.region} was not handed over in this session")
            src = region.view(v.offset, v.nbytes, where)
            code = dtypes.code_for(v.dtype)
            if views is None or device.type != "cpu" or v.dtype == torch.bool:
                # A bool's bytes are checked (0 or 1) as it is made: a view could change after.
                def copied(dt: torch.dtype, n: int, shape: list[int]) -> torch.Tensor:
                    return _copy(src, device).view(dt).view(shape)

                return codec._make_tensor(code, list(v.shape), [], v.nbytes, where, copied)

            def viewed(dt: torch.dtype, n: int, shape: list[int]) -> torch.Tensor:
                return region.exact(v.offset, n).view(dt).view(shape)

            t = codec._make_tensor(code, list(v.shape), [], v.nbytes, where, viewed)
            views[id(t)] = t
            return t

        return shm.replace(stack, value, codec.Shared)

    def _from_cuda(self, v: codec.Shared, where: str) -> torch.Tensor:
        """A copy on the serving device of a client's CUDA tensor there, named by its allocation's IPC handle."""
        drv = cuda_ipc.driver() if self.cuda_devices else None
        if drv is None or v.cuda_device not in self.cuda_devices:
            offered = "this server offers no CUDA IPC" if drv is None else "not the device this server offered"
            raise InvalidStack(f"{where}: CUDA IPC tensor on device {v.cuda_device.hex()}: {offered}")
        ordinal = self._cuda_ordinal

        def copy(dt: torch.dtype, n: int, shape: list[int]) -> torch.Tensor:
            try:
                ptr, mapped = drv.open(ordinal, v.cuda_handle)
            except cuda_ipc.CudaError as e:
                if e.code not in cuda_ipc.UNUSABLE_HANDLE:
                    raise  # the server's own trouble (out of memory, a broken context): not the client's
                # Garbage, a freed allocation's, this process's own memory, or a
                # client whose namespaces CUDA IPC cannot cross: the client resends
                # through host memory (a client that lies only loses that call).
                raise CudaIpcUnavailable(f"{where}: cannot open its CUDA IPC handle ({e})") from None
            done = False
            try:
                if v.offset + n > mapped:
                    raise InvalidStack(
                        f"{where}: {n} bytes at offset {v.offset} are outside the {mapped}-byte CUDA allocation "
                        "its handle maps"
                    )
                out = torch.empty(n, dtype=torch.uint8, device=torch.device("cuda", ordinal))
                out.copy_(cuda_ipc.as_bytes(ptr + v.offset, n, ordinal))
                # The copy is done before the mapping goes: unmapping memory a
                # queued copy still reads would fault this process's device.
                torch.cuda.current_stream(ordinal).synchronize()
                done = True
            finally:
                try:
                    drv.close(ordinal, ptr)
                except cuda_ipc.CudaError as e:
                    if done:
                        raise
                    # Another error is on its way out (a failed copy, say): that one tells what happened.
                    log.warning("closing a CUDA IPC handle after a failed copy: %s", e)
            return out.view(dt).view(shape)

        return codec._make_tensor(dtypes.code_for(v.dtype), list(v.shape), [], v.nbytes, where, copy)

    def place(
        self, owner: Owner, sid: str, slot: int, stack: list[Any], fresh: bool = False, cuda: bool = False
    ) -> list[Any]:
        """The result stack with each tensor written into the slot's output
        region and replaced by a Shared value naming it. A region too small is
        replaced by a larger one, handed to the client before this returns.
        `fresh`: the client still reads the slot's region (it handed results out
        as tensors over it): that one is retired and the results go to a new one.
        `cuda`: into the slot's device output region instead, where this server
        offers one and the session's budget has room (else the host region).
        Tensors on the device are copied by this thread's stream, waited for
        before this returns; tensors left in the stack travel as bytes."""
        check_slot(slot)
        session = self._session(owner, sid)
        if fresh:
            with session.outputs_lock:
                old = session.outputs.pop(slot, None)
                if old is not None:
                    session.retired[old.id] = old
        tensors = _tensors(stack)
        need = sum(shm.align(t.numel() * t.element_size()) for t in tensors)
        if need and cuda and self.cuda_outputs:
            placed = self._place_on_device(session, slot, stack, tensors, need)
            if placed is not None:
                return placed
        region = session.outputs.get(slot)
        if region is None or region.size < need:
            region = self._new_output(session, slot, need)
            if region is None:
                return stack  # over the session's budget: the results travel as bytes
        offsets = iter(_offsets(tensors))

        def write(v: torch.Tensor, where: str) -> codec.Shared:
            offset, n = next(offsets)
            if n:
                shm.copy_into(region.bytes[offset : offset + n], v)
            return codec.Shared(region.id, offset, v.dtype, tuple(v.shape), n)

        return shm.replace(stack, write, torch.Tensor)

    def _place_on_device(
        self, session: _Session, slot: int, stack: list[Any], tensors: list[torch.Tensor], need: int
    ) -> list[Any] | None:
        """place() into the slot's device output region; None where the session has no room for it."""
        got = session.devices.get(slot)
        if got is None or got[1].size < need:
            got = self._new_device_output(session, slot, need)
            if got is None:
                return None
        ident, memory = got
        dst = memory.tensor()  # holds the allocation until the copies below are done
        offsets = iter(_offsets(tensors))
        uuid = self.cuda_devices[0]

        def write(v: torch.Tensor, where: str) -> codec.Shared:
            offset, n = next(offsets)
            if n:
                shm.copy_into(dst[offset : offset + n], v)
            return codec.Shared(ident, offset, v.dtype, tuple(v.shape), n, b"", uuid)

        try:
            return shm.replace(stack, write, torch.Tensor)
        finally:
            # The client reads the region once it has the answer, from its own process: the
            # copies are done first. And a client that ran two calls on one slot at once may
            # have had this allocation replaced meanwhile: it goes only once they are done.
            _wait_for(dst)

    def _device_size(self, need: int) -> int:
        """A device output region's size for results of `need` bytes: whole granules."""
        return max(self._granularity, -(-need // self._granularity) * self._granularity)

    def _device_room(self, session: _Session, slot: int, size: int, room: int | None = None) -> bool:
        """Whether `slot` may have a device output region of `size` bytes in place of its
        own. `room`: the session's, taken already (_room takes self._lock)."""
        got = session.devices.get(slot)
        held = got[1].size if got is not None else 0
        room = self._room(session) if room is None else room
        return size <= room + held and self.device_output_bytes - held + size <= self._device_output_cap

    def _new_device_output(self, session: _Session, slot: int, need: int) -> tuple[int, cuda_ipc.DeviceMemory] | None:
        """A new device output region for `slot`, zeroed, handed to the client (CUDA_OUTPUT);
        the slot's old one, if any, is let go (the client reads a region only before its
        slot's next call, and unmaps it when it hears of the new one). None where the
        session's budget, the process's cap on device output regions or the device's
        memory has no room for it: the results go through the host region then."""
        drv = cuda_ipc.driver()
        assert drv is not None  # cuda_outputs is offered only with it
        size = self._device_size(need)
        room = self._room(session)
        with self._lock:  # reserved before allocating: concurrent calls cannot all pass the cap
            if not self._device_room(session, slot, size, room):
                log.info("shared-memory session %s…: device results of %d bytes over its budget "
                         "(--shared-memory-max-bytes, %d) or the device output regions' cap (%d bytes): through "
                         "host memory", session.id[:8], need, self.max_bytes, self._device_output_cap)  # fmt: skip
                return None
            self.device_output_bytes += size
        try:
            memory = drv.allocate(self._cuda_ordinal, size)
            # Fresh device memory is not zeroed: it may hold what this process freed before
            # (another session's results), and the client maps all of it.
            _wait_for(memory.tensor().zero_())
            fd = memory.export_fd()
        except (cuda_ipc.CudaError, RuntimeError) as e:  # RuntimeError: torch's, out of memory zeroing
            with self._lock:
                self.device_output_bytes -= size
            log.info("shared-memory session %s…: no device output region of %d bytes (%s): through host memory",
                     session.id[:8], size, e)  # fmt: skip
            return None
        with session.send_lock:
            try:
                if session.conn is None or session.closed:
                    raise OSError("the session ended")
                ident = session.next_output
                session.next_output += 1
                shm.send_packet(session.conn, shm.Packet(shm.CUDA_OUTPUT, slot, ident, size, fd=fd), _NO_WAIT)
            except OSError as e:
                with self._lock:
                    self.device_output_bytes -= size
                self._end(session, f"cannot send to the client: {e}")
                raise SharedMemoryUnavailable(f"shared-memory session lost: {e}") from None
            finally:
                os.close(fd)
        with session.devices_lock:
            ended = session.closed
            old = None if ended else session.devices.get(slot)
            if not ended:
                session.devices[slot] = (ident, memory)
        let_go = size if ended else old[1].size if old is not None else 0
        if let_go:
            with self._lock:
                self.device_output_bytes -= let_go
        return ident, memory  # after an end, the call still writes it (and the client never reads it)

    def check_results(
        self,
        owner: Owner,
        sid: str,
        slot: int,
        results: list[Any],
        message_limit: int,
        fresh: bool = False,
        cuda: bool = False,
    ) -> None:
        """Refuses, before the call runs, results (as planned: `results` may hold
        meta tensors) that neither fit the slot's output region, nor a new one
        within the session's room (--shared-memory-max-bytes, less what the
        session's other regions map), nor one message (where they would go as
        bytes): ResultTooLarge, so that the client sends the call as a stream."""
        check_slot(slot)
        session = self._session(owner, sid)
        if fresh:
            session.settle()  # regions the client handed back before this call count as room
        sizes = [t.numel() * t.element_size() for t in _tensors(results)]
        need = sum(shm.align(n) for n in sizes)
        if need and cuda and self.cuda_outputs:
            got = session.devices.get(slot)
            if (got is not None and got[1].size >= need) or self._device_room(session, slot, self._device_size(need)):
                return  # the device region takes them (else the host region, or bytes, below)
        # With `fresh` the slot's region is retired, not reused: it stays counted.
        current = None if fresh else session.outputs.get(slot)
        if current is not None and current.size >= need:
            return
        size = max(_OUTPUT_STEP, -(-need // _OUTPUT_STEP) * _OUTPUT_STEP)
        # Spares count as room: they are a cache, let go of before a new region is refused.
        spares = sum(r.size for r in list(session.spares.values()))
        room = self._room(session) + (current.size if current is not None else 0) + spares
        if size <= room or sum(sizes) <= message_room(message_limit):
            return
        raise ResultTooLarge(
            f"the result would be {sum(sizes)} bytes: over the {max(0, room)} bytes this shared-memory session "
            f"can still map for it (--shared-memory-max-bytes, {self.max_bytes} a session, its other regions "
            f"included) and over one message (--max-message-bytes, {message_limit}); refused before running "
            "(a stream carries it: ExecuteStream/FallbackStream)"
        )

    def _new_output(self, session: _Session, slot: int, need: int) -> shm.Region | None:
        session.settle()  # a region the client handed back before this call is taken first
        old = session.outputs.pop(slot, None)
        size = max(_OUTPUT_STEP, -(-need // _OUTPUT_STEP) * _OUTPUT_STEP)
        fits = [r for r in list(session.spares.values()) if r.size >= need]
        if fits and (spare := session.spares.pop(min(fits, key=lambda r: r.size).id, None)) is not None:
            # A region the client handed back: it still maps it, so it is named, not sent.
            self._reply(session, shm.Packet(shm.OUTPUT, slot, spare.id, spare.size))
            if session.closed:
                raise SharedMemoryUnavailable("shared-memory session lost")
            session.outputs[slot] = spare
            return spare
        if size > self._room(session) and session.spares:
            for ident in list(session.spares):  # room before spares: they are only a cache
                if session.spares.pop(ident, None) is not None:
                    self._reply(session, shm.Packet(shm.RETURN, id=ident))
        if size > self._room(session):
            log.info(
                "shared-memory session %s…: results of %d bytes over its budget (--shared-memory-max-bytes, "
                "%d; all sessions: %d): sent as bytes",
                session.id[:8], need, self.max_bytes, TOTAL_SESSIONS_OF_BUDGET * self.max_bytes,
            )  # fmt: skip
            if old is not None:
                session.outputs[slot] = old
            return None
        with session.send_lock:
            ident = session.next_output
            session.next_output += 1
            region, fd = shm.create_region(ident, size, f"fuseport-out-{slot}")
            try:
                if session.conn is None:
                    raise SharedMemoryUnavailable("shared-memory session closed")
                shm.send_packet(session.conn, shm.Packet(shm.OUTPUT, slot, ident, size, fd=fd), _NO_WAIT)
            except OSError as e:
                # Gone, or not reading its socket (it is full): either way the
                # session is over, and this thread does not wait on the client.
                self._end(session, f"cannot send to the client: {e}")
                raise SharedMemoryUnavailable(f"shared-memory session lost: {e}") from None
            finally:
                os.close(fd)
        session.outputs[slot] = region
        self._lock_pages(region)  # once the client has it: a failed send locks nothing
        return region

    # ------------------------------------------------------------------ socket side

    def _accept(self) -> None:
        pause = 0.0
        while (listener := self._listener) is not None:
            try:
                conn, _ = listener.accept()
            except OSError as e:
                if self._listener is None:
                    return  # closed
                # Out of descriptors (EMFILE) or memory: passing, so wait and try
                # again; returning would end shared memory for the process's life.
                if not pause:
                    log.warning("shared memory: cannot accept a connection (%s); trying again", e)
                pause = min(1.0, pause * 2 or 0.05)
                time.sleep(pause)
                continue
            pause = 0.0
            self._admit(conn)
            try:
                threading.Thread(target=self._serve, args=(conn,), name="fuseport-shm-session", daemon=True).start()
            except RuntimeError as e:  # can't start new thread
                self._leave(conn)
                conn.close()
                log.warning("shared memory: cannot serve a connection (%s)", e)

    def _admit(self, conn: socket.socket) -> None:
        """Counts a new connection as pending, making room by ending another
        pending one if need be: the oldest of its own user once that user holds
        PENDING_PER_UID, else, with MAX_PENDING pending, the oldest of the user
        holding the most. A connection that never says HELLO is a slot held at
        no cost; refusing newcomers instead let anyone on the host keep every
        client from a session by holding them."""
        try:
            uid = shm.peer_creds(conn)[1]  # the kernel says (at connect); no caller chooses it
        except OSError:
            uid = -1
        with self._lock:
            pending = self._pending
            mine = [c for c, u in pending.items() if u == uid]
            victim = None
            if len(mine) >= PENDING_PER_UID:
                victim = mine[0]
            elif len(pending) >= MAX_PENDING:
                counts = collections.Counter(pending.values())
                most = max(counts, key=counts.__getitem__)
                victim = next(c for c, u in pending.items() if u == most)
            if victim is not None:
                del pending[victim]
            pending[conn] = uid
        if victim is not None:
            # Shut down, not closed: its own thread, waiting in recv, wakes up and closes it.
            with contextlib.suppress(OSError):
                victim.shutdown(socket.SHUT_RDWR)

    def _leave(self, conn: socket.socket) -> bool:
        """No longer pending; False if it had been ended to make room (_admit)."""
        with self._lock:
            return self._pending.pop(conn, None) is not None

    def _serve(self, conn: socket.socket) -> None:
        session: _Session | None = None
        try:
            try:
                session = self._hello(conn)
            finally:
                self._leave(conn)
            if session is None:
                return
            self._read(session)
        except Exception:  # noqa: BLE001 - one bad connection never ends the others
            log.exception("shared-memory session failed")
        finally:
            if session is not None:
                self._end(session, "connection closed")
            else:
                conn.close()

    def _hello(self, conn: socket.socket) -> _Session | None:
        conn.settimeout(HELLO_SECONDS)
        try:
            p = shm.recv_packet(conn)
        except (OSError, ValueError) as e:
            log.info("shared memory: a connection without a valid HELLO: %s", e)
            return None
        if not self._leave(conn):
            # Ended to make room while its HELLO arrived: it is gone, whatever it said.
            if p is not None and p.fd is not None:
                os.close(p.fd)
            return None
        if p is None or p.kind != shm.HELLO:
            if p is not None and p.fd is not None:
                os.close(p.fd)
            return None
        try:
            # Asked before the lock: who is at the other end (the kernel says; no caller can choose it).
            pid, uid, _gid = shm.peer_creds(conn)
        except OSError:
            pid, uid = 0, -1
        with self._lock:
            # As bytes: compare_digest refuses str with non-ASCII characters.
            ticket = p.text.encode()
            session = next(
                (s for s in self._sessions.values() if s.conn is None and secrets.compare_digest(s.ticket.encode(), ticket)),
                None,
            )
            if session is not None and time.monotonic() - session.issued > self.ticket_seconds:
                del self._sessions[session.id]
                session = None
            refused = "unknown or expired ticket" if session is None else ""
            if session is not None and not session.owner.token:
                # No token: the client id was the caller's choice; the process at the
                # other end of the socket is not.
                held = sum(1 for s in self._sessions.values() if s.conn is not None and s.peer_pid == pid)
                if held >= self.per_identity:
                    del self._sessions[session.id]
                    refused = (
                        f"process {pid} holds {held} shared-memory sessions on this serving process, its limit "
                        "(--shared-memory-sessions-per-identity)"
                    )
                    session = None
            if session is not None:
                session.conn = conn
                session.peer, session.peer_pid = f"pid {pid} uid {uid}", pid
                session.used = time.monotonic()
        if session is None:
            _send(conn, shm.Packet(shm.ERROR, text=refused))
            return None
        try:
            conn.settimeout(None)
            shm.send_packet(conn, shm.Packet(shm.OK), _NO_WAIT)
        except OSError as e:
            # Claimed, but the client is gone: end the session, or it would count
            # against MAX_SESSIONS for the life of the process.
            self._end(session, f"client gone before its HELLO was answered: {e}")
            return None
        log.info("shared-memory session %s… opened by %s", session.id[:8], session.peer)
        return session

    def _read(self, session: _Session) -> None:
        conn = session.conn
        assert conn is not None
        while not session.closed:
            try:
                # Readable first, then marked handling before it is read: settle()
                # sees a packet as pending from its arrival to the end of its handling.
                _wait_readable(conn)
                with session.handled:
                    session.handling = True
                try:
                    p = shm.recv_packet(conn)
                    if p is None or not self._handle(session, p):
                        return
                finally:
                    with session.handled:
                        session.handling = False
                        session.handled.notify_all()
            except ValueError as e:
                log.info("shared-memory session %s…: %s; closing it", session.id[:8], e)
                return
            except OSError:
                return

    def _handle(self, session: _Session, p: shm.Packet) -> bool:
        """One packet from the client; False: the session ends (a kind no client sends)."""
        session.used = time.monotonic()
        if p.kind == shm.REGION:
            self._take_region(session, p)
        elif p.kind == shm.DROP:
            session.regions.pop(p.id, None)
            if p.fd is not None:
                os.close(p.fd)
        elif p.kind == shm.RETURN:
            # An output region the client reads no more: retired, a spare, or still its
            # slot's (the call that would have retired it failed before writing results).
            session.retired.pop(p.id, None)
            session.spares.pop(p.id, None)
            for slot, region in list(session.outputs.items()):
                if region.id == p.id:
                    session.outputs.pop(slot, None)
            if p.fd is not None:
                os.close(p.fd)
        elif p.kind == shm.SPARE:
            # A retired region whose tensors are gone, kept mapped by the client for reuse.
            # The client retires a region when it sends the call that asks for a fresh one;
            # that call may not have reached place() yet (its tensors died meanwhile), or
            # failed before it: then the region is still its slot's, and leaves the slot
            # here (else it was retired later and never handed back: a leak of the budget).
            with session.outputs_lock:
                region = session.retired.pop(p.id, None)
                if region is None:
                    for slot, r in list(session.outputs.items()):
                        if r.id == p.id:
                            region = session.outputs.pop(slot)
            if region is not None and len(session.spares) < MAX_SLOTS:
                session.spares[p.id] = region
            elif region is not None:
                self._reply(session, shm.Packet(shm.RETURN, id=p.id))  # enough of them: let it go
            if p.fd is not None:
                os.close(p.fd)
        else:
            if p.fd is not None:
                os.close(p.fd)
            log.info("shared-memory session %s…: packet kind %d is not a client's; closing it", session.id[:8], p.kind)
            return False
        return True

    def _take_region(self, session: _Session, p: shm.Packet) -> None:
        def refuse(why: str) -> None:
            self._reply(session, shm.Packet(shm.ERROR, id=p.id, text=why))

        if p.fd is None:
            return refuse(f"region {p.id}: no descriptor came with it")
        if p.id == 0 or p.id in session.regions:
            os.close(p.fd)
            return refuse(f"region {p.id}: id 0 or already in use")
        if len(session.regions) >= MAX_REGIONS:
            os.close(p.fd)
            return refuse(f"region {p.id}: the session holds {MAX_REGIONS} regions already")
        room = self._room(session)
        try:
            region = shm.map_region(p.fd, p.id, p.size, max(0, room))
        except (ValueError, OSError) as e:
            return refuse(
                f"{e} (a session may map {self.max_bytes} bytes, all sessions "
                f"{TOTAL_SESSIONS_OF_BUDGET * self.max_bytes}; {max(0, room)} left)"
            )
        self._lock_pages(region)
        session.regions[p.id] = region
        self._reply(session, shm.Packet(shm.OK, id=p.id))

    def _lock_pages(self, region: shm.Region) -> None:
        """Page-locks a region's memory for the serving device (see __init__) until the
        Region object is collected, whichever of the session's tables dropped it last.
        Registering faults in and locks every page of the region at once (a sparse memfd
        costs the server its whole size, within the bound). The finalizer holds the
        mapping, so it is unregistered before it can be unmapped: memory mapped later at
        the same address must not be read through the stale lock. A region that cannot be
        locked (the bound, the host's locked-memory limit, a driver that refuses) is used
        as it is, at pageable speed."""
        device = self._page_lock
        drv = cuda_ipc.driver() if device is not None else None
        if drv is None or device is None:
            return
        ordinal, ptr, size = device.index or 0, region.bytes.data_ptr(), region.size
        with self._lock:
            if self.locked_bytes + size > self.page_lock_bytes:
                return  # locked memory is the host's to lose: past the bound, pageable
            self.locked_bytes += size
        try:
            drv.host_register(ordinal, ptr, size)
        except cuda_ipc.CudaError as e:
            with self._lock:
                self.locked_bytes -= size
            if not self._lock_failed:
                self._lock_failed = True
                log.warning("cannot page-lock a shared-memory region of %d bytes (%s): such regions are copied "
                            "at pageable speed", size, e)  # fmt: skip
            return
        with self._lock:
            if self._unlocker is None:
                self._unlocker = threading.Thread(target=self._unlock_loop, args=(drv,),
                                                  name="fuseport-shm-unlock", daemon=True)  # fmt: skip
                self._unlocker.start()
        # Only a put: a finalizer may run in any thread when the garbage collector takes a
        # cycle, one holding self._lock among them; SimpleQueue.put is safe there.
        weakref.finalize(region, self._unlocks.put, (ordinal, ptr, size, region.mapping))

    def _unlock_loop(self, drv: cuda_ipc.Driver) -> None:
        while True:
            ordinal, ptr, size, mapping = self._unlocks.get()
            try:
                drv.host_unregister(ordinal, ptr)
            except cuda_ipc.CudaError as e:
                # Still registered, maybe: its mapping is kept for good, so that nothing
                # else is ever mapped at that address and read through the lock.
                _UNUNLOCKED.append(mapping)
                log.warning("cannot unregister a page-locked shared-memory region of %d bytes (%s): its mapping "
                            "is kept", size, e)  # fmt: skip
            with self._lock:
                self.locked_bytes -= size
            del mapping  # only now may the mapping go (unless kept above)

    def _reply(self, session: _Session, p: shm.Packet) -> None:
        with session.send_lock:
            if session.conn is None:
                return
            try:
                shm.send_packet(session.conn, p, _NO_WAIT)
            except OSError as e:
                # Gone, or its socket is full because it never reads: the session
                # ends (its reading loop stops) rather than this thread, and with
                # it the session's send lock, waiting on the client.
                self._end(session, f"cannot send to the client: {e}")

    def _end(self, session: _Session, why: str) -> None:
        """Unmaps and forgets everything of a session (its in-flight calls keep
        what they already copied; the mappings go when the last view does)."""
        with self._lock:
            self._sessions.pop(session.id, None)
        if session.closed:
            return
        session.closed = True
        mapped = session.mapped
        session.regions.clear()
        session.outputs.clear()
        session.retired.clear()
        session.spares.clear()
        with session.devices_lock:  # a call making a region now either put it here already, or sees `closed`
            devices = sum(m.size for _, m in session.devices.values())
            session.devices.clear()  # each allocation goes once a call still writing it is done
        with self._lock:
            self.device_output_bytes -= devices
        conn, session.conn = session.conn, None
        if conn is not None:
            # Said before the hang-up: whoever sees the connection end finds the reason logged.
            log.info("shared-memory session %s… of %s ended (%s): %d bytes unmapped", session.id[:8], session.peer, why, mapped)
            _hang_up(conn)


# Mappings of regions whose unregistering failed: kept mapped for the process's life.
_UNUNLOCKED: list[object] = []


def default_page_lock_bytes(processes: int = 1) -> int:
    """--shared-memory-page-lock-bytes when unset: a quarter of the memory this host lets
    the server use, shared among its serving processes (each locks its own regions)."""
    return host_memory_bytes() // 4 // max(1, processes)


def check_slot(slot: int) -> None:
    """A request's output slot: 0 (results as bytes) or 1..MAX_SLOTS."""
    if not 0 <= slot <= MAX_SLOTS:
        raise InvalidArgument(f"shared_memory_slot {slot} is not within 1..{MAX_SLOTS} (or 0: results as bytes)")


def shared_sizes(stack: list[Any]) -> list[int]:
    """The byte sizes of a stack's Shared values (what resolving it copies)."""
    sizes: list[int] = []
    shm.replace(stack, lambda v, _where: sizes.append(v.nbytes), codec.Shared)
    return sizes


def _wait_for(t: torch.Tensor) -> None:
    """Waits for the work this thread's stream queued on `t`'s device (none on the CPU)."""
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()


def _tensors(stack: list[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    shm.walk(stack, out.append)
    return out


def _offsets(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Where each tensor goes in an output region, and its size: back to back, aligned."""
    out, offset = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        out.append((offset, n))
        offset += shm.align(n)
    return out


def _copy(src: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        out = torch.empty(src.numel(), dtype=torch.uint8)
        shm.copy_into(out, src)
        return out
    return src.to(device)


def _hang_up(sock: socket.socket) -> None:
    """Shuts a socket down before closing it: a thread blocked in accept() or
    recv() on it returns at once (close() alone would leave it waiting)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected (any more)
    sock.close()


def _send(conn: socket.socket, p: shm.Packet) -> None:
    try:
        shm.send_packet(conn, p)
    except OSError:
        pass  # the client went away: its reader notices


def _poller(conn: socket.socket) -> select.poll:
    # poll, not select: a serving process may hold descriptors past select's 1024.
    p = select.poll()
    p.register(conn, select.POLLIN | select.POLLPRI)
    return p


def _wait_readable(conn: socket.socket) -> None:
    """Blocks until the client has sent something (or hung up)."""
    _poller(conn).poll()


def _readable(conn: socket.socket) -> bool:
    """Whether the client has sent something not yet read (or hung up)."""
    try:
        return bool(_poller(conn).poll(0))
    except (OSError, ValueError):  # closed under us: nothing more will come
        return False
