"""The client's side of shared memory (see service.proto, "Shared memory", and server/shm.py).

A client on the server's host hands its inputs over in sealed memfds and reads
the results from the server's; each call holds one slot (an input region of
this client's, an output region of the server's) for its duration, so
concurrent calls of one client never share a region. Regions are reused from
call to call (fresh memory would page-fault at a fraction of copy speed) and
grow when a stack needs more. CUDA tensors on the device the server offered
travel as CUDA IPC handles instead (wire/cuda_ipc.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fuseport.wire import _pb, codec, cuda_ipc, dtypes, shm
from fuseport.wire.errors import InvalidStack, SharedMemoryUnavailable

__all__ = ["SLOTS", "SharedSession"]

log = logging.getLogger(__name__)

SLOTS = 8  # calls one client runs through shared memory at once; more wait for a slot
_STEP = 1 << 20  # regions are sized in whole MiB


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
        self._held: dict[int, list[torch.Tensor]] = {}
        self._next_id = 1
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
        tensors: list[torch.Tensor] = []
        shm.walk(stack, tensors.append)
        exports = self._export_cuda(slot, tensors)
        need = sum(shm.align(t.numel() * t.element_size()) for t in tensors if id(t) not in exports)
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
            assert region is not None
            shm.copy_into(region.bytes[offset : offset + n], t)
            ref = codec.Shared(region.id, offset, t.dtype, tuple(t.shape), n)
            offset += shm.align(n)
            return ref

        return shm.replace(stack, put, torch.Tensor), bool(exports)

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

    def read(self, stack: list[Any]) -> list[Any]:
        """The result stack with each Shared value copied out of the server's
        region (the tensors are the caller's; the region is reused)."""

        def get(v: codec.Shared, where: str) -> torch.Tensor:
            out = torch.empty(v.shape, dtype=v.dtype)
            if v.nbytes:
                region = self._wait(lambda: self._outputs.get(v.region))
                shm.copy_into(out, region.view(v.offset, v.nbytes, where))
            return out

        return shm.replace(stack, get, codec.Shared)

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
                if p.kind == shm.OUTPUT and p.fd is not None:
                    try:
                        region = shm.map_region(p.fd, p.id, p.size, self.max_bytes)
                    except ValueError as e:
                        self.closed = True
                        raise SharedMemoryUnavailable(f"the server's output region is unusable: {e}") from None
                    self._outputs.pop(self._slot_outputs.get(p.slot, -1), None)
                    self._slot_outputs[p.slot] = p.id
                    self._outputs[p.id] = region
                elif p.kind in (shm.OK, shm.ERROR):
                    self._replies[p.id] = p
                elif p.fd is not None:
                    os.close(p.fd)
            return got

