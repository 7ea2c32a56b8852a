"""Device placement: picking the device, moving stacks to it and back, and OOM handling."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fuseport.wire.stream import HostSink

__all__ = [
    "DeviceSink",
    "Made",
    "Placement",
    "break_device",
    "is_device_failure",
    "is_out_of_memory",
    "resolve_device",
]

log = logging.getLogger(__name__)

# Host-to-device copies go through pinned memory in chunks of this size, so
# that the CPU copy of one chunk overlaps the DMA of the previous one
# (pageable copies ran at 8 GB/s on an H100 host, pinned ones at 55 GB/s).
_STAGING_CHUNK = 8 << 20
# Below this, a plain copy is cheaper than arranging a staged one.
_STAGING_MIN = 256 << 10
# Small tensors are packed into a thread's pinned buffer at this alignment (a cache
# line), so that a view of their bytes as any dtype (16 bytes at most) is legal.
_ALIGN = 64
# A thread's pinned buffers start this small (most calls need a few KiB) and grow to
# Placement's staging_bytes.
_STAGING_FIRST = 64 << 10

_SAME_SCOPE = contextlib.nullcontext()  # stateless, so one serves every request


def resolve_device(name: str) -> torch.device:
    """'auto' is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", 0)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA devices exist")
    elif device.type != "cpu":
        raise ValueError(f"device must be auto, cpu or cuda[:N], not {name!r}")
    return device


def is_device_failure(e: BaseException | None) -> bool:
    """A CUDA error that leaves the context unusable (a device-side assert, an
    illegal address): every later call on this process would fail too."""
    while e is not None:
        accelerator_error = getattr(torch, "AcceleratorError", ())
        if isinstance(e, accelerator_error) or (
            isinstance(e, RuntimeError) and "CUDA error" in str(e) and not is_out_of_memory(e)
        ):
            return True
        e = e.__cause__
    return False


def break_device(device: torch.device) -> None:
    """FUSEPORT_FAULT_INJECTION only (tests): makes `device` fail as a bad kernel would.

    On CUDA: an index far out of range, read on the device with no check in front
    of it (the server's own checks exist to stop exactly this), so the indexing
    kernel hits its device-side assert and the context is unusable from then on:
    the error surfaces at the next synchronisation, as a real one does. On the
    CPU, where nothing can poison the device, it raises the error type a CUDA
    failure raises, so that the same path (is_device_failure, drain, restart) runs."""
    if device.type == "cuda":
        table = torch.zeros(4, device=device)
        index = torch.full((1,), 1 << 30, dtype=torch.long, device=device)
        table[index].sum().item()  # .item() waits for the kernel: the assert is raised here
        return
    error = getattr(torch, "AcceleratorError", RuntimeError)  # "CUDA error" also names it on older torch
    raise error(f"CUDA error: device-side assert triggered (injected by FUSEPORT_FAULT_INJECTION, {device})")


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    # The CPU allocator raises a plain RuntimeError.
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


class Placement:
    """Moves request values onto the serving device and results back to the host.

    On CUDA every worker thread has its own stream, so concurrent requests
    overlap their copies and kernels; a request synchronises only its stream.
    """

    def __init__(self, device: torch.device, *, staging_bytes: int = 1 << 20) -> None:
        """`staging_bytes` (CUDA): the most bytes of small tensors (each under
        _STAGING_MIN) a call moves each way through its thread's pinned buffers
        (see `to_device`); 0: every tensor on its own."""
        self.device = device
        self.cuda = device.type == "cuda"
        self.staging_bytes = staging_bytes if self.cuda else 0
        self._local = threading.local()
        # Work running now that may hold the device for long (CUDA only; see `holding`).
        self._holding_lock = threading.Lock()
        self._holding = 0

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Marks work that may keep the device busy for long, while it runs: a call past
        the light bound (Core.run), a compile that runs the kernel on a caller's inputs
        (compile/inprocess.py). Meanwhile no call runs on the event loop (Core.light):
        a small kernel queued behind such work (a kernel's blocks are not preempted for
        another stream's, whatever its priority) would hold the loop for as long. A no-op
        on the CPU, where a kernel holds its own thread only."""
        if not self.cuda:
            yield
            return
        with self._holding_lock:
            self._holding += 1
        try:
            yield
        finally:
            with self._holding_lock:
                self._holding -= 1

    @property
    def held(self) -> bool:
        """Whether work marked by `holding` runs now."""
        return self._holding > 0

    def request_scope(self) -> contextlib.AbstractContextManager[None]:
        """Puts this thread on a stream of its own, the first time (a no-op on CPU).

        The thread stays on it: entering torch.cuda.device/stream contexts on
        every request cost more than the kernel for small calls (about 100 us
        on the H100 host)."""
        if self.cuda and getattr(self._local, "stream", None) is None:
            torch.cuda.set_device(self.device)
            self._local.stream = torch.cuda.Stream(self.device)
            torch.cuda.set_stream(self._local.stream)
            # keep_warm's: made here, so that the poll never allocates (under memory
            # pressure the allocator frees its cache, and that waits for the device).
            self._local.warm = torch.empty(1, device=self.device)
            self._local.staging = _Staging()
        return _SAME_SCOPE

    def keep_warm(self) -> bool:
        """Queues a one-element kernel on this thread's stream, never waited for: the
        busy poll's way of keeping the GPU from idling between a client's calls
        (server/rpc/poll.py, --busy-poll-gpu-us). Nothing on a thread that has run no
        call, nor while heavy work holds the device (it is busy then). CUDA only.
        Whether it queued one."""
        warm = getattr(self._local, "warm", None)
        if warm is None or self.held:
            return False
        warm.zero_()
        return True

    def share(self, values: list[Any]) -> Callable[[], None]:
        """Hands tensors made on this thread's stream to another thread: returns
        what that thread calls (inside its request_scope) before using them. It
        waits for the copies to land, and tells the allocator that its stream
        uses them too, so their memory is not reused while it reads."""
        if not self.cuda:
            return lambda: None
        ready = torch.cuda.Event()
        ready.record()
        tensors = [v for v in values if isinstance(v, torch.Tensor) and v.is_cuda]

        def receive() -> None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for t in tensors:
                t.record_stream(stream)

        return receive

    def to_device(self, value: Any) -> Any:
        """A stack's values on the device (call inside request_scope).

        On CUDA, a list's small host tensors go together: packed into the thread's
        pinned buffer and copied from it asynchronously, where a copy of each from
        pageable memory would wait for the device, once per tensor. Each wait on a GPU
        that idled costs 40-50 us (docs/perf.md, H100), more than a small kernel."""
        if isinstance(value, torch.Tensor):
            return self._tensor_to_device(value)
        if isinstance(value, list):
            if self.staging_bytes:
                staged = self._stage_in(value)
                if staged is not None:
                    return staged
            return [self.to_device(v) for v in value]
        return value

    def to_host(self, value: Any) -> Any:
        """Results back on the host; call inside request_scope, then `synchronize`:
        until it returns, a small result on CUDA is allocated but not yet written."""
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu":
                return value
            if value.numel() * value.element_size() < _STAGING_MIN:
                if self.staging_bytes:
                    staged = self._stage_out(value)
                    if staged is not None:
                        return staged
                return value.cpu()  # a plain copy beats allocating pinned memory
            out = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            out.copy_(value, non_blocking=True)
            return out
        if isinstance(value, (list, tuple)):
            return [self.to_host(v) for v in value]
        return value

    def stream_sink(self, nbytes: int, *, own_pages: bool = False) -> Any:
        """Where a streamed tensor of `nbytes` is assembled: straight on the device
        (through pinned staging) on CUDA, host memory otherwise (wire.stream.Sink;
        `own_pages` as there)."""
        if self.cuda:
            return DeviceSink(self.device, nbytes)
        return HostSink(nbytes, own_pages=own_pages)

    def synchronize(self) -> None:
        """Waits for this thread's stream (call after request_scope), then writes the
        small results `to_host` staged into the tensors it returned."""
        if self.cuda:
            self._local.stream.synchronize()
            self._local.staging.landed()

    def _stage_in(self, values: list[Any]) -> list[Any] | None:
        """`values` on the device, the small host tensors among them packed into the
        thread's pinned buffer and copied from there asynchronously, none waiting;
        None when there is none or they are more than staging_bytes.

        Each gets a device allocation of its own, exactly its bytes, as a decoded input
        has a storage of its own: the server's checks bound what a view may reach
        (as_strided, a storage offset) by the input's storage, so inputs that were views
        of one block could read each other's bytes, or the buffer's earlier contents."""
        picked = []
        total = 0
        for i, v in enumerate(values):
            if isinstance(v, torch.Tensor) and v.device.type == "cpu" and _plain(v):
                n = v.numel() * v.element_size()
                if 0 < n < _STAGING_MIN:
                    picked.append((i, v, total, n))
                    total += _aligned(n)
        if not picked or total > self.staging_bytes:
            return None
        staging: _Staging = self._local.staging
        if staging.sent:
            # The buffer's last copy may not have been read yet (a call that failed before
            # synchronize, or a list inside this stack's list): it is, once the stream is.
            self._local.stream.synchronize()
            staging.sent = False
        buf = staging.inbound = _pinned(staging.inbound, total, self.staging_bytes)
        base = buf.data_ptr()
        for _, v, offset, n in picked:
            ctypes.memmove(base + offset, v.data_ptr(), n)
        staged = {
            i: buf[offset : offset + n].view(v.dtype).view(v.shape).to(self.device, non_blocking=True)
            for i, v, offset, n in picked
        }
        staging.sent = True
        return [staged[i] if i in staged else self.to_device(v) for i, v in enumerate(values)]

    def _stage_out(self, value: torch.Tensor) -> torch.Tensor | None:
        """A host tensor that `synchronize` fills with the small device tensor
        `value`, copied meanwhile into the thread's pinned buffer; None when the
        call's small results are over staging_bytes, or `value` is not contiguous
        (`.cpu()` keeps a transposed result's strides, which the response carries)
        or has a lazy conjugate or negation bit (which a CUDA copy resolves on the
        destination right after queueing the copy: before the bytes land)."""
        n = value.numel() * value.element_size()
        staging: _Staging = self._local.staging
        offset = staging.used
        end = offset + _aligned(n)
        if n == 0 or end > self.staging_bytes or not _plain(value):
            return None
        if staging.outbound is None or staging.outbound.numel() < end:
            # A larger buffer, copies into the old one queued or not: their pending views
            # keep it alive, and torch's pinned allocator reuses it only once the stream
            # is past them.
            staging.outbound = _pinned(staging.outbound, end, self.staging_bytes)
        src = staging.outbound[offset : offset + n].view(value.dtype).view(value.shape)
        src.copy_(value, non_blocking=True)
        host = torch.empty(value.shape, dtype=value.dtype)
        staging.pending.append((host, src))
        staging.used = end
        return host

    def made(self) -> Made | None:
        """Where tensors this thread's call keeps on the device are made: its stream
        (call inside request_scope); None on the CPU. Mark each with `Made.mark`, then
        `Made.unwaited()` if the call answers without waiting for its stream."""
        return Made(self._local.stream) if self.cuda else None

    def adopt(self, values: list[Any]) -> None:
        """Before this thread's stream uses resident tensors (call inside request_scope):
        for each made on another stream, this one waits on the device for the work that
        made it where its call did not (Made.unwaited), and the allocator learns that this
        stream uses it too, so that, freed, its memory is not reused while this stream's
        kernels may still read it (a call that keeps its results does not wait for them)."""
        if not self.cuda:
            return
        stream = self._local.stream
        for t in values:
            if isinstance(t, list):
                self.adopt(t)
                continue
            made: Made | None = getattr(t, _MADE, None)
            if made is None or made.stream is stream:
                continue  # a stream runs its work in order
            if made.event is not None:
                stream.wait_event(made.event)
            t.record_stream(stream)

    def release_memory(self) -> None:
        """After an out-of-memory error: give cached blocks back to the driver."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _tensor_to_device(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.device:
            return t
        if not self.cuda or t.device.type != "cpu":
            return t.to(self.device)
        nbytes = t.numel() * t.element_size()
        if nbytes < _STAGING_MIN or not t.is_contiguous():
            return t.to(self.device, non_blocking=False)
        # Staged and chunked: memcpy chunk i+1 into pinned memory while chunk i
        # is in flight. The pinned block comes from torch's caching host
        # allocator, which keeps it from reuse until the stream is past it.
        src = t.reshape(-1).view(torch.uint8)
        staging = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        for start in range(0, nbytes, _STAGING_CHUNK):
            stop = min(start + _STAGING_CHUNK, nbytes)
            staging[start:stop].copy_(src[start:stop])
            dst[start:stop].copy_(staging[start:stop], non_blocking=True)
        return dst.view(t.dtype).view(t.shape)


class Made:
    """Where resident tensors were made (Placement.made): the stream whose work made
    them and, when their call answered without waiting for it, an event recorded
    after that work, which a call on another stream waits for (Placement.adopt)."""

    __slots__ = ("event", "stream")

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream = stream
        self.event: torch.cuda.Event | None = None

    def mark(self, t: torch.Tensor) -> None:
        setattr(t, _MADE, self)

    def unwaited(self) -> None:
        """The call that made them does not wait for its stream: their users on other
        streams wait for this point of it instead."""
        self.event = torch.cuda.Event()
        self.event.record(self.stream)


# The attribute a kept tensor carries its Made under.
_MADE = "_fuseport_made"


class _Staging:
    """A thread's pinned buffers for small copies (Placement._stage_in / _stage_out):
    a call's small inputs are packed into one and copied to the device without a wait,
    its small results copied into the other; the one wait is `synchronize`'s.

    `sent`: the inbound buffer's content was queued for the device and the stream
    has not been waited on since. `pending`: the host tensors `to_host` returned
    and their pinned sources, to be copied once the stream is waited on; the
    tensors are held here, so a call that failed in between leaves nothing dangling."""

    __slots__ = ("inbound", "outbound", "pending", "sent", "used")

    def __init__(self) -> None:
        self.inbound: torch.Tensor | None = None
        self.outbound: torch.Tensor | None = None
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.sent = False
        self.used = 0

    def landed(self) -> None:
        """The stream was waited on: the queued copies have landed."""
        self.sent = False
        for host, src in self.pending:
            ctypes.memmove(host.data_ptr(), src.data_ptr(), host.numel() * host.element_size())
        self.pending.clear()
        self.used = 0


def _aligned(n: int) -> int:
    """`n` bytes rounded up to the staging buffers' alignment."""
    return -(-n // _ALIGN) * _ALIGN


def _plain(t: torch.Tensor) -> bool:
    """A tensor whose bytes are its values in order: dense and contiguous, without a
    lazy conjugate or negation bit (a raw copy would skip those)."""
    return t.layout == torch.strided and t.is_contiguous() and not t.is_conj() and not t.is_neg()


def _pinned(buf: torch.Tensor | None, need: int, most: int) -> torch.Tensor:
    """`buf`, or a larger pinned buffer when it holds less than `need` bytes: twice
    the size, from _STAGING_FIRST up to `most`."""
    if buf is not None and buf.numel() >= need:
        return buf
    size = max(_STAGING_FIRST, buf.numel() * 2 if buf is not None else 0)
    while size < need:
        size *= 2
    return torch.empty(max(min(size, most), need), dtype=torch.uint8, pin_memory=True)


class DeviceSink:
    """A streamed tensor's destination on a CUDA device (see wire.stream.Sink).

    Each chunk is copied into one of two pinned staging buffers, and from there
    to the device asynchronously on a stream of the sink's own: the DMA of chunk
    k runs while chunk k+1 is received and staged. A staging buffer is reused
    only once its previous copy has finished (its event)."""

    def __init__(self, device: torch.device, nbytes: int) -> None:
        self._dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._stream = torch.cuda.Stream(device)
        self._staging: list[torch.Tensor | None] = [None, None]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def write(self, offset: int, source: int, nbytes: int) -> None:
        slot = self._turn
        self._turn ^= 1
        event = self._events[slot]
        if event is not None:
            event.synchronize()  # this buffer's previous chunk is on the device
        staging = self._staging[slot]
        if staging is None or staging.numel() < nbytes:
            staging = self._staging[slot] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        ctypes.memmove(staging.data_ptr(), source, nbytes)
        with torch.cuda.stream(self._stream):
            self._dst[offset : offset + nbytes].copy_(staging[:nbytes], non_blocking=True)
            event = self._events[slot] = torch.cuda.Event()
            event.record(self._stream)

    def result(self) -> torch.Tensor:
        # Every copy has landed before anyone reads the tensor, on any stream.
        self._stream.synchronize()
        return self._dst
