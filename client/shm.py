"""The client's side of shared memory (see service.proto, "Shared memory", and server/shm.py).

A client on the server's host hands its inputs over in sealed memfds and reads
the results from the server's; each call holds one slot (an input region of
this client's, an output region of the server's) for its duration, so
concurrent calls of one client never share a region. Regions are reused from
call to call (fresh memory would page-fault at a fraction of copy speed) and
grow when a stack needs more. CUDA tensors on the device the server offered
travel as CUDA IPC handles instead (wire/cuda_ipc.py).

Results are not copied: the tensors handed to the caller view the server's output
region itself (where the server offers `fresh_outputs`). Their lifetime rules:

* A region whose tensors are still alive is never written again: the slot's next
  call asks for a new region (ExecuteOptions.shared_memory_fresh_output), and when
  the last tensor over the old one dies the client returns it (RETURN), which frees
  its share of the session's budget, or hands it back (SPARE) for a later call to
  be written into again. A region whose tensors all died before the slot's next
  call is reused as it is (its pages are warm).
* The mapping lives as long as any tensor viewing it: after the client is closed,
  after the session is lost (the server restarted, or ended it), the tensors stay
  valid and unchanged. The memory is the memfd's, freed with the last tensor.
* A fork copies the mappings into the child (MAP_SHARED): every region with live
  tensors at the fork is never written again by this process's session, even once
  the parent's own tensors are gone, so the child's copies stay unchanged too.

Tensors made by `Client.empty` live in regions of their own, handed to the server
when made: passed as inputs, they are named where they lie, not copied into the
slot's input region (the caller writes its data there once, instead of the client
copying it for every call). Such a region is dropped (DROP) when its last tensor dies.

Results asked for on a CUDA device (`Client.execute(..., results_on="cuda")`) of
the GPU the server runs on come through the slot's device output region instead
(the server's CUDA allocation, mapped here from the descriptor it sent): they are
copied once, device to device, into tensors of this process's own, and the copy
is waited for before the call returns, since the slot's next call writes there.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fuseport.wire import _pb, codec, cuda_ipc, dtypes, shm
from fuseport.wire.errors import CudaIpcUnavailable, InvalidStack, SharedMemoryUnavailable

__all__ = ["SLOTS", "SharedSession"]

log = logging.getLogger(__name__)

SLOTS = 8  # calls one client runs through shared memory at once; more wait for a slot
_STEP = 1 << 20  # regions are sized in whole MiB
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# The sessions of this process, for the fork hook (_before_fork).
_SESSIONS: weakref.WeakSet[SharedSession] = weakref.WeakSet()


def _before_fork() -> None:
    for session in list(_SESSIONS):
        session._pin_lent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork)


def _owned_gone(session_ref: weakref.ref[SharedSession], region: int, mapping: object) -> None:
    """The last tensor over a region made by `SharedSession.empty` died (a finalizer). It
    holds `mapping`, so the region leaves `_owned` before its memory is unmapped: memory
    mapped later at the same address must never be taken for it (a wrong result)."""
    session = session_ref()
    if session is not None:
        session._owned.pop(region, None)
        session._tell(shm.DROP, region)
    del mapping


def _view_gone(session_ref: weakref.ref[SharedSession], region: int) -> None:
    """The last tensor over a lent output region died (a weakref.finalize callback)."""
    session = session_ref()
    if session is not None:
        session._views_gone(region)


class SharedSession:
    """One client's session with one serving process. Thread-safe."""

    def __init__(self, opened: _pb.service.OpenSharedMemoryResponse, timeout: float) -> None:
        self.id = opened.session
        self.max_bytes = opened.max_bytes
        # The process the session belongs to: a forked child inherits its socket
        # and its regions (MAP_SHARED), and must not use them (see Client).
        self.pid = os.getpid()
        self.closed = False
        self._sock = shm.connect(opened.socket, timeout)
        self._io = threading.Lock()  # one thread reads the socket at a time
        self._replies: dict[int, shm.Packet] = {}
        self._outputs: dict[int, shm.Region] = {}  # by region id: the server's
        self._slot_outputs: dict[int, int] = {}  # slot -> its current output region id
        self._inputs: dict[int, shm.Region] = {}  # by slot: this client's
        # CUDA IPC: the devices the server maps allocations of, and by slot the
        # contiguous copies a call's handles name (alive until the call is over).
        # None for a server in this very process (create_server): CUDA refuses to
        # open a process's own handles, and its tensors need no IPC to get there.
        in_process = shm.peer_creds(self._sock)[0] == self.pid
        self.cuda_devices = frozenset() if in_process else frozenset(opened.cuda_devices)
        # Results on the server's device (ExecuteOptions.shared_memory_cuda_outputs): by region
        # id, the device output regions mapped here (or why one could not be); by slot, its
        # current one; and the ordinal, in this process, of the server's device.
        self.cuda_outputs = opened.cuda_outputs and bool(self.cuda_devices)
        self._devices: dict[int, cuda_ipc.DeviceMemory | str] = {}
        self._slot_devices: dict[int, int] = {}
        self._cuda_ordinal: int | None = None
        self._held: dict[int, list[torch.Tensor]] = {}
        # Results handed out as tensors over the output regions (module doc): by
        # region id, the memoryview those tensors hold (alive exactly while any is).
        self.views = opened.fresh_outputs
        self._lend = threading.RLock()  # reentrant: a finalizer may run inside a locked section (gc)
        self._lent: dict[int, weakref.ref[memoryview]] = {}
        self._pinned: set[int] = set()  # regions lent when the process forked: never written again
        # Taken off their slot while lent: handed back (SPARE) or returned when their tensors die.
        self._retired: dict[int, shm.Region] = {}
        # Handed back: the server names one of these for a slot that needs a new region.
        self._spares: dict[int, shm.Region] = {}
        self._next_id = 1
        # Regions of Client.empty's tensors, by id: where their bytes start and how many
        # (the lookup of `write`). An entry goes when its last tensor dies (_owned_gone).
        self._owned: dict[int, tuple[int, int]] = {}
        self._owning = 0  # regions of `empty` asked for, not yet answered
        # Packets `_tell` could not send at once (the socket full): sent before the next call.
        self._untold: collections.deque[tuple[int, int]] = collections.deque()
        slots = max(1, min(SLOTS, opened.max_slots or SLOTS))
        self.slots = slots  # how many calls run through it at once
        self._free = list(range(slots, 0, -1))
        self._slots = threading.Condition()
        try:
            shm.send_packet(self._sock, shm.Packet(shm.HELLO, text=opened.ticket))
            reply = self._wait(lambda: self._replies.pop(0, None))
        except BaseException:
            self.close()
            raise
        if reply.kind != shm.OK:
            self.close()
            raise SharedMemoryUnavailable(f"the server refused the shared-memory session: {reply.text}")
        _SESSIONS.add(self)

    def close(self) -> None:
        self.closed = True
        if os.getpid() == self.pid:  # never in a forked child: the socket is its parent's too
            with contextlib.suppress(OSError):
                # Shut down first: another thread's call blocked reading the socket
                # wakes up (close alone would leave it waiting).
                self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()
        self._outputs.clear()
        self._inputs.clear()
        self._spares.clear()
        self._devices.clear()  # unmapped here (every copy out of them was waited for)

    @contextlib.contextmanager
    def slot(self) -> Iterator[int]:
        with self._slots:
            self._slots.wait_for(lambda: bool(self._free))
            slot = self._free.pop()
        try:
            yield slot
        except BaseException:
            # A call that failed or ran out of time: the server may still be copying
            # from the CUDA inputs it names, so they stay alive until the slot's next call.
            raise
        else:
            self._held.pop(slot, None)
        finally:
            with self._slots:
                self._free.append(slot)
                self._slots.notify()

    # ------------------------------------------------------------------ inputs

    def write(self, slot: int, stack: list[Any]) -> tuple[list[Any], bool]:
        """The stack with each tensor copied into the slot's input region and
        replaced by a Shared value naming it (other values, and tensors without
        elements, as they are); and whether any CUDA tensor went by CUDA IPC
        handle instead (only where the server offered its device)."""
        self._flush_untold()
        tensors: list[torch.Tensor] = []
        shm.walk(stack, tensors.append)
        exports = self._export_cuda(slot, tensors)
        owned = self._in_owned(tensors)
        need = sum(shm.align(t.numel() * t.element_size()) for t in tensors if id(t) not in exports and id(t) not in owned)
        if need > self.max_bytes:
            raise SharedMemoryUnavailable(f"a stack of {need} bytes is over the session's {self.max_bytes}")
        region = self._inputs.get(slot)
        if need and (region is None or region.size < need):
            region = self._new_input(slot, need)
        offset = 0

        def put(t: torch.Tensor, where: str) -> codec.Shared | torch.Tensor:
            nonlocal offset
            if dtypes.code_for(t.dtype) is None:
                raise InvalidStack(f"{where}: dtype {t.dtype} cannot travel on the wire")
            n = t.numel() * t.element_size()
            if not n:
                return t  # no bytes to share; a stack of these has no region to name
            e = exports.get(id(t))
            if e is not None:
                return codec.Shared(0, e.offset, t.dtype, tuple(t.shape), n, e.handle, e.device_uuid)
            where_owned = owned.get(id(t))
            if where_owned is not None:
                return codec.Shared(where_owned[0], where_owned[1], t.dtype, tuple(t.shape), n)
            assert region is not None
            shm.copy_into(region.bytes[offset : offset + n], t, split=True)
            ref = codec.Shared(region.id, offset, t.dtype, tuple(t.shape), n)
            offset += shm.align(n)
            return ref

        return shm.replace(stack, put, torch.Tensor), bool(exports)

    def empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        """A tensor of `shape` and `dtype` (one the wire carries: Client's `_empty` checks)
        in a region of its own, handed to the server; None where the server takes no more
        regions (its count, less what the slots need, or the session's budget)."""
        with self._lend:  # reserved first: threads making tensors at once stay within the count
            if len(self._owned) + self._owning >= shm.MAX_REGIONS - SLOTS:
                return None  # the slots' input regions must still fit the server's count
            self._owning += 1
        try:
            nbytes = shape.numel() * dtype.itemsize
            size = -(-max(nbytes, 1) // _PAGE) * _PAGE
            with self._io:
                ident, self._next_id = self._next_id, self._next_id + 1
            region, fd = shm.create_region(ident, size, "fuseport-tensor")
            try:
                self._send(shm.Packet(shm.REGION, 0, ident, size, fd=fd))
            finally:
                os.close(fd)
            reply = self._wait(lambda: self._replies.pop(ident, None))
            if reply.kind != shm.OK:
                log.info("a tensor in shared memory was refused (%s): made in private memory", reply.text)
                return None
        finally:
            with self._lend:
                self._owning -= 1
        # The tensor holds a memoryview of its own, which holds the mapping: the region is
        # dropped (on the server too) exactly when the last tensor over it dies.
        view = memoryview(region.mapping)
        base = torch.frombuffer(view, dtype=torch.uint8)
        self._owned[ident] = (base.data_ptr(), size)
        weakref.finalize(view, _owned_gone, weakref.ref(self), ident, region.mapping)
        del view
        return base[:nbytes].view(dtype).view(shape)

    def _in_owned(self, tensors: list[torch.Tensor]) -> dict[int, tuple[int, int]]:
        """By id() of the tensor, (region, offset) of the host tensors that lie whole in
        a region of `empty`'s: their bytes are named, not copied."""
        if not self._owned:
            return {}
        out: dict[int, tuple[int, int]] = {}
        owned = list(self._owned.items())
        for t in tensors:
            if t.device.type != "cpu" or not t.is_contiguous() or t.is_conj() or t.is_neg():
                continue
            ptr, n = t.data_ptr(), t.numel() * t.element_size()
            for ident, (start, size) in owned:
                if start <= ptr and ptr + n <= start + size and (ptr - start) % t.element_size() == 0:
                    out[id(t)] = (ident, ptr - start)
                    break
        return out

    def _export_cuda(self, slot: int, tensors: list[torch.Tensor]) -> dict[int, cuda_ipc.Export]:
        """CUDA IPC exports of the CUDA tensors whose device the server offered, by id()
        of the tensor on the stack; the others go through the input region."""
        cuda = [t for t in tensors if t.is_cuda and t.numel()]
        drv = cuda_ipc.driver() if cuda and self.cuda_devices else None
        if drv is None:
            return {}
        out: dict[int, cuda_ipc.Export] = {}
        held: list[torch.Tensor] = []
        for t in cuda:
            # The server reads the row-major bytes of the value: not those under a
            # lazy conjugate or negative view, nor a strided layout.
            c = t.resolve_conj().resolve_neg().contiguous()
            try:
                e = drv.export(c)
            except cuda_ipc.CudaError as err:  # e.g. expandable segments: not exportable
                log.debug("CUDA tensor through host memory: %s", err)
                continue
            if e.device_uuid in self.cuda_devices:
                out[id(t)] = e
                held.append(c)
        # The server reads these on its own stream: what this process queued on them is done first.
        for d in {c.device for c in held}:
            torch.cuda.current_stream(d).synchronize()
        self._held[slot] = held
        return out

    def _new_input(self, slot: int, need: int) -> shm.Region:
        size = -(-need // _STEP) * _STEP
        old = self._inputs.pop(slot, None)
        if old is not None:
            self._send(shm.Packet(shm.DROP, id=old.id))
        with self._io:
            ident, self._next_id = self._next_id, self._next_id + 1
        region, fd = shm.create_region(ident, size, f"fuseport-in-{slot}")
        try:
            self._send(shm.Packet(shm.REGION, slot, ident, size, fd=fd))
        finally:
            os.close(fd)
        reply = self._wait(lambda: self._replies.pop(ident, None))
        if reply.kind != shm.OK:
            raise SharedMemoryUnavailable(f"the server refused a {size}-byte region: {reply.text}")
        self._inputs[slot] = region
        return region

    # ------------------------------------------------------------------ outputs

    def fresh_output(self, slot: int) -> bool:
        """Whether the slot's next call must have its results written into a new
        region (ExecuteOptions.shared_memory_fresh_output): the slot's current one
        is still read by tensors handed out earlier, or none is known to be free.
        That region leaves the slot here, and is returned once its tensors die."""
        if not self.views:
            return False
        with self._lend:
            current = self._slot_outputs.get(slot)
            if current is None:
                return True  # a first call, or one after a call that failed after retiring
            if not self._in_use(current):
                return False
            del self._slot_outputs[slot]
            region = self._outputs.pop(current, None)
            if region is not None:
                self._retired[current] = region
            if not self._alive(current):  # pinned at a fork, its tensors here gone since
                self._return(current)
            return True

    def _alive(self, region: int) -> bool:
        ref = self._lent.get(region)
        return ref is not None and ref() is not None

    def _in_use(self, region: int) -> bool:
        return region in self._pinned or self._alive(region)

    def _views_gone(self, region: int) -> None:
        with self._lend:
            if region not in self._retired:
                return  # still its slot's: the slot's next call writes it again
            if region in self._pinned or len(self._spares) >= self.slots or os.getpid() != self.pid:
                self._return(region)
                return
            # Handed back for reuse: a slot that needs a new region gets this one, pages warm.
            self._spares[region] = self._retired.pop(region)
            self._lent.pop(region, None)
        self._tell(shm.SPARE, region)

    def _return(self, region: int) -> None:
        """Tells the server that output region `region` is read no more (and unmaps it here)."""
        with self._lend:
            self._retired.pop(region, None)
            self._spares.pop(region, None)
            self._pinned.discard(region)
            self._lent.pop(region, None)
        self._tell(shm.RETURN, region)

    def _tell(self, kind: int, region: int) -> None:
        """Sends a packet without waiting (from finalizers: any thread, an event loop's
        too). One the socket has no room for now is kept and sent before the next call."""
        if self.closed or os.getpid() != self.pid:
            return  # the server forgot it with the session; a forked child's socket is its parent's
        try:
            # os.write, not the socket's send: a socket with a timeout waits for room first,
            # whatever the flags. Its descriptor is non-blocking (the timeout's emulation).
            os.write(self._sock.fileno(), shm.packet_bytes(shm.Packet(kind, id=region)))
        except BlockingIOError:
            self._untold.append((kind, region))
        except OSError:
            pass  # a session that broke: the server forgot it anyway

    def _flush_untold(self) -> None:
        """Sends what `_tell` could not (before a call: the server sees its regions handed back)."""
        while self._untold:
            kind, region = self._untold.popleft()
            self._send(shm.Packet(kind, id=region))

    def _pin_lent(self) -> None:
        """Before a fork: the child keeps tensors over the regions lent now, so
        this process never lets the server write them again."""
        with self._lend:
            self._pinned.update(r for r in list(self._lent) if self._alive(r))

    def device_results(self, device: torch.device) -> bool:
        """Whether results for CUDA `device` of this process can come in device output
        regions: the server offers them, on that very GPU."""
        if not self.cuda_outputs or device.type != "cuda":
            return False
        drv = cuda_ipc.driver()
        if drv is None:
            return False
        ordinal = device.index if device.index is not None else torch.cuda.current_device()
        try:
            ok = drv.uuid(ordinal) in self.cuda_devices
        except cuda_ipc.CudaError:
            ok = False
        if ok:
            self._cuda_ordinal = ordinal  # one server device, so one ordinal here
        return ok

    def wait_outputs(self, stack: list[Any]) -> None:
        """Blocks until every output region the result stack names is here (its
        OUTPUT or CUDA_OUTPUT packet read): then `read` does not block where the session lends."""
        regions: list[tuple[int, bool]] = []
        shm.replace(
            stack, lambda v, _where: regions.append((v.region, bool(v.cuda_device))) if v.nbytes else None, codec.Shared
        )
        for region, on_device in regions:
            table = self._devices if on_device else self._outputs
            self._wait(lambda region=region, table=table: table.get(region))

    def _from_device(self, v: codec.Shared, where: str, sources: list[torch.Tensor]) -> torch.Tensor:
        """A result in a device output region, copied into a tensor of this process's (on
        the current stream; the caller waits for it, holding `sources` until then: the
        region's memory stays mapped while a tensor over it lives, close() or not)."""
        got = self._devices.get(v.region) or self._wait(lambda: self._devices.get(v.region))
        if isinstance(got, str):
            raise CudaIpcUnavailable(f"{where}: cannot map the server's device output region {v.region} ({got})")
        if v.offset + v.nbytes > got.size:
            raise InvalidStack(
                f"{where}: bytes [{v.offset}, {v.offset + v.nbytes}) lie outside device output region "
                f"{v.region} of {got.size} bytes"
            )
        src = got.tensor()[v.offset : v.offset + v.nbytes]
        out = torch.empty(v.shape, dtype=v.dtype, device=src.device)  # the region's device, in this process
        if v.nbytes:
            sources.append(src)
            shm.copy_into(out, src)
        return out

    def read(self, stack: list[Any]) -> list[Any]:
        """The result stack with each Shared value made a tensor: over the
        server's output region itself where the server offers `fresh_outputs`
        (the module doc says how long such a tensor stays valid: as long as it
        lives), else a copy out of it (the region is reused)."""
        bases: dict[int, tuple[shm.Region, torch.Tensor]] = {}

        def lent(v: codec.Shared, where: str) -> torch.Tensor:
            if not v.nbytes:
                return torch.empty(v.shape, dtype=v.dtype)
            got = bases.get(v.region)
            if got is None:
                # Here already after wait_outputs (then this never waits on the socket's lock:
                # AsyncClient runs it on its loop).
                region = self._outputs.get(v.region) or self._wait(lambda: self._outputs.get(v.region))
                # A memoryview of its own for this call's tensors: it lives exactly as long as
                # any of them (torch.frombuffer holds it), and its finalizer says when they died.
                view = memoryview(region.mapping)
                got = bases[v.region] = (region, torch.frombuffer(view, dtype=torch.uint8))
                with self._lend:
                    self._lent[v.region] = weakref.ref(view)
                weakref.finalize(view, _view_gone, weakref.ref(self), v.region)
                del view
            region, base = got
            region.view(v.offset, v.nbytes, where)  # bounds, checked
            return base[v.offset : v.offset + v.nbytes].view(v.dtype).view(v.shape)

        def copied(v: codec.Shared, where: str) -> torch.Tensor:
            out = torch.empty(v.shape, dtype=v.dtype)
            if v.nbytes:
                region = self._wait(lambda: self._outputs.get(v.region))
                shm.copy_into(out, region.view(v.offset, v.nbytes, where))
            return out

        host = lent if self.views else copied
        sources: list[torch.Tensor] = []

        def either(v: codec.Shared, where: str) -> torch.Tensor:
            return self._from_device(v, where, sources) if v.cuda_device else host(v, where)

        try:
            return shm.replace(stack, either, codec.Shared)
        finally:
            # The slot's next call writes its device region again: the copies out of it
            # are done before this returns (and before `sources` lets the memory go).
            for device in {t.device for t in sources if t.is_cuda}:
                torch.cuda.current_stream(device).synchronize()
            sources.clear()

    def _take_device(self, p: shm.Packet) -> None:
        """A CUDA_OUTPUT packet: the slot's new device output region, mapped here. One that
        cannot be (another driver, a descriptor that is no allocation) is recorded with
        the reason, which the call reading it raises (CudaIpcUnavailable: see Client)."""
        got: cuda_ipc.DeviceMemory | str
        try:
            drv = cuda_ipc.driver()
            if p.fd is None:
                got = "no descriptor came with it"
            elif drv is None or self._cuda_ordinal is None:
                got = f"no CUDA driver here ({cuda_ipc.why_not()})" if drv is None else "results were not asked for on a device"
            elif not 0 < p.size <= self.max_bytes:
                got = f"{p.size} bytes, not within 1..{self.max_bytes}"
            else:
                got = drv.import_fd(self._cuda_ordinal, p.fd, p.size)
        except cuda_ipc.CudaError as e:
            got = str(e)
        finally:
            if p.fd is not None:
                os.close(p.fd)  # the mapping keeps the memory
        old = self._slot_devices.get(p.slot)
        if old is not None:
            self._devices.pop(old, None)  # every copy out of it was waited for
        self._slot_devices[p.slot] = p.id
        self._devices[p.id] = got

    # ------------------------------------------------------------------ socket

    def _send(self, p: shm.Packet) -> None:
        try:
            shm.send_packet(self._sock, p)
        except OSError as e:
            self.closed = True
            raise SharedMemoryUnavailable(f"shared-memory session lost: {e}") from None

    def _wait(self, found: Callable[[], Any]) -> Any:
        """Reads packets until `found()` gives something (what the server has
        sent, or is about to, before the answer that made us wait)."""
        with self._io:
            while (got := found()) is None:
                try:
                    p = shm.recv_packet(self._sock)
                except (OSError, ValueError) as e:
                    self.closed = True
                    raise SharedMemoryUnavailable(f"shared-memory session lost: {e}") from None
                if p is None:
                    self.closed = True
                    raise SharedMemoryUnavailable("shared-memory session closed by the server")
                if p.kind == shm.OUTPUT:
                    if p.fd is None:  # one of the regions this client handed back (SPARE)
                        with self._lend:
                            spare = self._spares.pop(p.id, None)
                        if spare is None:
                            self.closed = True
                            why = f"the server named output region {p.id}, not one it sent"
                            raise SharedMemoryUnavailable(why)
                        region = spare
                    else:
                        try:
                            region = shm.map_region(p.fd, p.id, p.size, self.max_bytes)
                        except ValueError as e:
                            self.closed = True
                            why = f"the server's output region is unusable: {e}"
                            raise SharedMemoryUnavailable(why) from None
                    with self._lend:
                        old = self._slot_outputs.get(p.slot, -1)
                        self._outputs.pop(old, None)  # grown: the slot's old region was free (or retired)
                        self._lent.pop(old, None)
                        self._slot_outputs[p.slot] = p.id
                        self._outputs[p.id] = region
                elif p.kind == shm.CUDA_OUTPUT:
                    self._take_device(p)
                elif p.kind in (shm.OK, shm.ERROR):
                    self._replies[p.id] = p
                elif p.kind == shm.RETURN:  # a spare the server let go of (for room, or enough of them)
                    with self._lend:
                        self._spares.pop(p.id, None)
                elif p.fd is not None:
                    os.close(p.fd)
            return got

