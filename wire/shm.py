"""Shared memory between a client and a server on one host: what both sides share.

Regions are memfds sealed against shrinking and growing, handed over a Unix
socket (SCM_RIGHTS) and mapped by both sides. The seal is what makes mapping
another process's memory safe: a file that could be truncated while mapped
would end the process reading it with SIGBUS. The protocol is described in
service.proto ("Shared memory"); this module holds its packets and regions.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import socket
import stat
import struct
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from fuseport.wire.errors import InvalidStack

__all__ = [
    "ALIGN",
    "AVAILABLE",
    "Packet",
    "Region",
    "align",
    "connect",
    "copy_into",
    "create_region",
    "map_region",
    "peer_creds",
    "recv_packet",
    "replace",
    "send_packet",
    "walk",
]

# Linux only: memfd_create, file seals, abstract Unix sockets, SOCK_SEQPACKET.
AVAILABLE = sys.platform == "linux" and hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")

ALIGN = 64  # every tensor starts on a cache line (and on any dtype's size)
MAX_REGIONS = 128  # regions a client's session may hand over (its slots' inputs and Client.empty's)
HELLO, REGION, DROP, OK, ERROR, OUTPUT, RETURN, SPARE, CUDA_OUTPUT = 1, 2, 3, 4, 5, 6, 7, 8, 9
MAX_TEXT = 1024
_HEADER = struct.Struct("<4sIIQQ")
_MAGIC = b"FPSM"
_PACKET_MAX = _HEADER.size + MAX_TEXT
# Both seals: a region neither shrinks (SIGBUS) nor grows under its mapper.
_SEALS = (getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_GROW", 0)) if AVAILABLE else 0


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Packet:
    kind: int
    slot: int = 0
    id: int = 0
    size: int = 0
    text: str = ""
    fd: int | None = None  # received with the packet (the receiver owns it)


def packet_bytes(p: Packet) -> bytes:
    """A packet without a descriptor, as it goes on the socket."""
    return _HEADER.pack(_MAGIC, p.kind, p.slot, p.id, p.size) + p.text.encode("utf-8")[:MAX_TEXT]


def send_packet(sock: socket.socket, p: Packet, flags: int = 0) -> None:
    data = packet_bytes(p)
    if p.fd is None:
        sock.sendall(data, flags)
    else:
        socket.send_fds(sock, [data], [p.fd], flags)


def recv_packet(sock: socket.socket) -> Packet | None:
    """The next packet, or None when the peer closed the connection. Raises
    ValueError for a packet that breaks the protocol (the caller closes the
    connection); any descriptor received with it is then closed here."""
    data, fds, flags, _ = socket.recv_fds(sock, _PACKET_MAX, 1)
    try:
        if not data and not fds:
            return None
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            # More text, or more descriptors, than a packet may carry: the
            # kernel discards descriptors that do not fit; the packet goes too.
            raise ValueError("packet too long, or more than one descriptor")
        if len(data) < _HEADER.size:
            raise ValueError(f"packet of {len(data)} bytes is shorter than its header")
        magic, kind, slot, ident, size = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError("not a fuseport shared-memory packet")
        text = data[_HEADER.size :].decode("utf-8", errors="replace")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Packet(kind, slot, ident, size, text, fds[0] if fds else None)


def connect(address: str, timeout: float) -> socket.socket:
    """A connection to a server's socket ("@name": Linux's abstract namespace)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect("\0" + address[1:] if address.startswith("@") else address)
    except BaseException:
        sock.close()
        raise
    return sock


def peer_creds(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)  # type: ignore[return-value]


class Region:
    """A mapped region: its bytes as a flat uint8 tensor. The mapping lives as
    long as any tensor viewing it (dropping the Region unmaps nothing early)."""

    __slots__ = ("__weakref__", "bytes", "id", "mapping", "size")  # weakref: server/shm.py's page lock

    def __init__(self, ident: int, size: int, mapping: mmap.mmap) -> None:
        self.id = ident
        self.size = size
        self.mapping = mapping
        self.bytes = torch.frombuffer(mapping, dtype=torch.uint8)

    def view(self, offset: int, nbytes: int, where: str) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) of the region, checked."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise InvalidStack(
                f"{where}: bytes [{offset}, {offset + nbytes}) lie outside shared-memory region {self.id} "
                f"of {self.size} bytes"
            )
        return self.bytes[offset : offset + nbytes]

    def exact(self, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) of the region (checked by `view` first) as a
        tensor whose storage is exactly those bytes: the server's checks bound what a
        view may reach (as_strided) by its storage, and the call's byte budget counts
        storages; neither must see the rest of the region."""
        if nbytes <= 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.mapping, dtype=torch.uint8, count=nbytes, offset=offset)


# Up to this size a host copy is one memmove; past it, torch's copy_, whose
# threads pay for their wake-up there (46 GB/s for 256 MiB on the H200 host).
_MEMMOVE_MAX = 64 << 20


# The client's copies into its input region split over threads of its own from this
# size (`copy_into(..., split=True)`): a 16 MiB memmove was about half of a 16 MiB
# shared-memory call on the H100 host (7.3 ms against 3.7 ms for an input already in
# shared memory). Not torch's copy_: its OpenMP threads spin after each copy, on the
# cores the server's kernel needs (on the 2-core machine a 16 MiB call went from
# 8.4 to 11.4 ms with it, and to 8.2 ms with these threads, which sleep when idle).
SPLIT_FROM = 4 << 20
_SPLIT_WAYS = 4
_splitter: ThreadPoolExecutor | None = None
_splitter_lock = threading.Lock()


def _forget_splitter() -> None:
    """In a forked child: the parent's threads are not here, and its lock may be held."""
    global _splitter, _splitter_lock
    _splitter, _splitter_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_splitter)


def _split_memmove(dst: int, src: int, nbytes: int) -> None:
    """memmove in up to _SPLIT_WAYS pieces at once (ctypes releases the GIL). The caller
    copies the first piece, then each other one that no thread has started yet (another
    caller's pieces may hold them: it never waits behind those), and returns only once
    every piece is done, whatever interrupts it: no piece writes after it returns."""
    global _splitter
    ways = min(_SPLIT_WAYS, os.cpu_count() or 1)
    step = -(-nbytes // ways)
    pieces: list[tuple[Future[Any], int]] = []
    if ways > 1:
        with _splitter_lock:
            if _splitter is None:
                _splitter = ThreadPoolExecutor(ways - 1, thread_name_prefix="fuseport-copy")
            pool = _splitter
        try:
            for o in range(step, nbytes, step):
                pieces.append((pool.submit(ctypes.memmove, dst + o, src + o, min(step, nbytes - o)), o))
        except RuntimeError:  # the interpreter is shutting down: the rest is copied here
            pass
    try:
        done = step + len(pieces) * step
        ctypes.memmove(dst, src, min(step, nbytes))
        if done < nbytes:
            ctypes.memmove(dst + done, src + done, nbytes - done)
    finally:
        started = []
        for f, o in pieces:
            if f.cancel():
                ctypes.memmove(dst + o, src + o, min(step, nbytes - o))
            else:
                started.append(f)
        for f in started:
            f.result()


def copy_into(dst: torch.Tensor, src: torch.Tensor, split: bool = False) -> None:
    """Copies `src` into `dst` (the same bytes; one of them a flat uint8 view of a
    region). Contiguous host memory up to 64 MiB goes through one memmove (ctypes
    releases the GIL), or with `split` (the client's), of any size, through several
    at once from SPLIT_FROM: torch's copy_ splits a copy over its intra-op threads,
    and on a busy host their wake-up cost more than the copy (a 256 KiB copy_ took
    3 ms on the loaded 2-core machine, py-spy). Anything else (a CUDA tensor, a
    strided view, a large copy on the server) through copy_."""
    # A lazy conjugate or negative view's memory holds the values before the
    # conjugation: its bytes are not its value.
    src = src.resolve_conj().resolve_neg()
    nbytes = src.numel() * src.element_size()
    host = src.device.type == "cpu" and dst.device.type == "cpu"
    if host and (split or nbytes <= _MEMMOVE_MAX) and src.is_contiguous() and dst.is_contiguous():
        if split and nbytes >= SPLIT_FROM:
            _split_memmove(dst.data_ptr(), src.data_ptr(), nbytes)
        elif nbytes:
            ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)
        return
    same = dst.dtype == src.dtype and dst.shape == src.shape
    if not same and dst.dtype == torch.uint8 and dst.dim() == 1:  # the region's side
        dst = dst.view(src.dtype).view(src.shape)
    elif not same:
        src = src.view(dst.dtype).view(dst.shape)
    dst.copy_(src)


def create_region(ident: int, size: int, name: str) -> tuple[Region, int]:
    """A new sealed memfd of `size` bytes, mapped; returns it and its descriptor
    (to send; the caller closes it once sent)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return Region(ident, size, mapping), fd


def map_region(fd: int, ident: int, size: int, max_size: int) -> Region:
    """Maps a region another process handed over, after checking that it is a
    memfd of exactly `size` bytes (at most `max_size`) that can never shrink.
    Raises ValueError naming what is wrong. Always closes `fd` (the mapping
    keeps the memory)."""
    try:
        if not 0 < size <= max_size:
            raise ValueError(f"region {ident}: {size} bytes, not within 1..{max_size}")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"region {ident}: not a memory file (a memfd)")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            raise ValueError(f"region {ident}: not a memfd that takes seals") from None
        if seals & _SEALS != _SEALS:
            raise ValueError(f"region {ident}: not sealed against shrinking and growing (F_SEAL_SHRINK|F_SEAL_GROW)")
        if st.st_size != size:
            raise ValueError(f"region {ident}: announced as {size} bytes, the memfd holds {st.st_size}")
        if st.st_blksize != mmap.PAGESIZE:
            # A huge-page memfd (MFD_HUGETLB) passes the seals, but a page the mapper
            # faults in after the host's huge-page pool ran dry is SIGBUS.
            raise ValueError(f"region {ident}: pages of {st.st_blksize} bytes; only {mmap.PAGESIZE}-byte pages")
        return Region(ident, size, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
    finally:
        os.close(fd)


# Module-level, not closures: a recursive closure is a reference cycle, and
# one that held a region would keep it mapped until the garbage collector ran.
def walk(stack: list[Any], visit: Callable[[torch.Tensor], None]) -> None:
    """Calls `visit` on every tensor of a stack, lists included, in order."""
    for v in stack:
        if isinstance(v, torch.Tensor):
            visit(v)
        elif isinstance(v, (list, tuple)):
            walk(list(v), visit)


def replace(stack: list[Any], fn: Callable[[Any, str], Any], kind: type, where: str = "stack") -> list[Any]:
    """The stack with every value of `kind` (lists included) replaced by
    `fn(value, where)`, in the order `walk` visits them."""
    out = []
    for i, v in enumerate(stack):
        here = f"{where}[{i}]"
        if isinstance(v, kind):
            out.append(fn(v, here))
        elif isinstance(v, (list, tuple)):
            out.append(replace(list(v), fn, kind, here))
        else:
            out.append(v)
    return out
