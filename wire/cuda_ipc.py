"""CUDA IPC between a client and a server on one GPU host: what both sides share (and the
server's page-locking of shared-memory regions, through the same driver).

A CUDA tensor of a co-located client travels as a legacy CUDA IPC handle
(cuIpcGetMemHandle: 64 opaque bytes naming the client's whole allocation), the
tensor's offset in it and the device's UUID; the server opens the handle, checks
that the tensor lies inside the allocation it maps, copies the bytes out on the
device and closes the handle before the call goes on. No byte crosses the host.

The driver API is called through ctypes on libcuda (always present where a CUDA
torch runs): torch has no public call that exports or opens one allocation
without its multiprocessing reference counters, and those assume trusted peers.
Every call pushes the device's primary context (torch's) and pops it, so the
calls work from any thread (gRPC workers have no current context of their own).

Results go the other way through allocations of the server's own made for that
purpose (`DeviceMemory`: the driver's virtual memory management, exported as a
POSIX file descriptor sent over the session's socket), never through a legacy
handle of torch's memory: such a handle names the whole block torch carved the
tensor from, other callers' tensors included, and the driver lets the importer
reopen it for as long as the block lives. An exported VMM allocation holds only
what the server wrote there for that client, and its memory is the driver's to
free once both processes let go, so nothing the server allocates later can be
read through a mapping a client kept.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fuseport.wire import codec

__all__ = [
    "HANDLE_BYTES", "UNUSABLE_HANDLE", "UUID_BYTES", "CudaError", "DeviceMemory", "Driver", "Export", "as_bytes", "driver",
    "why_not",
]

HANDLE_BYTES = codec.CUDA_HANDLE_BYTES
UUID_BYTES = codec.CUDA_UUID_BYTES
_LAZY_ENABLE_PEER_ACCESS = 1
_HOST_REGISTER_PORTABLE = 1  # CU_MEMHOSTREGISTER_PORTABLE
# Virtual memory management (cuda.h): a pinned device allocation, shareable as a POSIX fd.
_ATTR_VMM = 102  # CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
_ATTR_POSIX_FD = 103  # CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED
_ALLOCATION_PINNED = 1  # CU_MEM_ALLOCATION_TYPE_PINNED
_HANDLE_POSIX_FD = 1  # CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
_LOCATION_DEVICE = 1  # CU_MEM_LOCATION_TYPE_DEVICE
_ACCESS_READWRITE = 3  # CU_MEM_ACCESS_FLAGS_PROT_READWRITE


# What cuIpcOpenMemHandle answers for a handle the importer cannot use, as opposed
# to trouble of its own: CUDA_ERROR_INVALID_VALUE (garbage, a freed allocation's),
# CUDA_ERROR_INVALID_CONTEXT (its own memory), CUDA_ERROR_MAP_FAILED and
# CUDA_ERROR_INVALID_HANDLE (a process CUDA IPC cannot reach), CUDA_ERROR_NOT_SUPPORTED.
UNUSABLE_HANDLE = frozenset({1, 201, 205, 400, 801})


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * HANDLE_BYTES)]


class _Location(ctypes.Structure):  # CUmemLocation
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4),
    ]  # fmt: skip


class _AllocationProp(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [
        ("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags),
    ]  # fmt: skip


class _AccessDesc(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


def _prop(ordinal: int) -> _AllocationProp:
    prop = _AllocationProp()
    prop.type = _ALLOCATION_PINNED
    prop.requestedHandleTypes = _HANDLE_POSIX_FD
    prop.location.type = _LOCATION_DEVICE
    prop.location.id = ordinal
    return prop


class CudaError(RuntimeError):
    def __init__(self, call: str, code: int, name: str) -> None:
        super().__init__(f"{call} failed: {name} ({code})")
        self.code = code


@dataclass(frozen=True)
class Export:
    """Where a client's CUDA tensor lies: its allocation's handle and the tensor's offset in it."""

    handle: bytes
    offset: int
    allocation_bytes: int
    device_uuid: bytes


class Driver:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        # Declared, not guessed: the handle is a 64-byte struct passed by value.
        u64p, vp, i = ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_int
        for names, args in (
            (("cuInit",), [ctypes.c_uint]),
            (("cuGetErrorName",), [i, ctypes.POINTER(ctypes.c_char_p)]),
            (("cuDeviceGet",), [ctypes.POINTER(i), i]),
            (("cuDevicePrimaryCtxRetain",), [ctypes.POINTER(vp), i]),
            (("cuCtxPushCurrent_v2", "cuCtxPushCurrent"), [vp]),
            (("cuCtxPopCurrent_v2", "cuCtxPopCurrent"), [ctypes.POINTER(vp)]),
            (("cuDeviceGetUuid_v2", "cuDeviceGetUuid"), [ctypes.c_char_p, i]),
            (("cuMemGetAddressRange_v2", "cuMemGetAddressRange"), [u64p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]),
            (("cuIpcGetMemHandle",), [ctypes.POINTER(_Handle), ctypes.c_uint64]),
            (("cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle"), [u64p, _Handle, ctypes.c_uint]),
            (("cuIpcCloseMemHandle",), [ctypes.c_uint64]),
            (("cuMemHostRegister_v2", "cuMemHostRegister"), [vp, ctypes.c_size_t, ctypes.c_uint]),
            (("cuMemHostUnregister",), [vp]),
            (("cuDeviceGetAttribute",), [ctypes.POINTER(i), i, i]),
            (("cuMemGetAllocationGranularity",), [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(_AllocationProp), ctypes.c_int]),
            (("cuMemCreate",), [u64p, ctypes.c_size_t, ctypes.POINTER(_AllocationProp), ctypes.c_uint64]),
            (("cuMemExportToShareableHandle",), [vp, ctypes.c_uint64, ctypes.c_int, ctypes.c_uint64]),
            (("cuMemImportFromShareableHandle",), [u64p, vp, ctypes.c_int]),
            (("cuMemAddressReserve",), [u64p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_uint64]),
            (("cuMemMap",), [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_uint64]),
            (("cuMemSetAccess",), [ctypes.c_uint64, ctypes.c_size_t, ctypes.POINTER(_AccessDesc), ctypes.c_size_t]),
            (("cuMemUnmap",), [ctypes.c_uint64, ctypes.c_size_t]),
            (("cuMemAddressFree",), [ctypes.c_uint64, ctypes.c_size_t]),
            (("cuMemRelease",), [ctypes.c_uint64]),
        ):
            fn = self._fn(*names)
            fn.argtypes, fn.restype = args, ctypes.c_int
        self._lock = threading.Lock()
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._uuids: dict[int, bytes] = {}
        self._granularity: dict[int, int] = {}
        self._check("cuInit", lib.cuInit(0))

    def _fn(self, *names: str) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
        for name in names:
            fn = getattr(self._lib, name, None)
            if fn is not None:
                return fn
        raise CudaError(names[0], -1, "not exported by libcuda")

    def _check(self, call: str, rc: int) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(rc, ctypes.byref(name))
            raise CudaError(call, rc, (name.value or b"?").decode())

    def _context(self, ordinal: int) -> ctypes.c_void_p:
        with self._lock:
            ctx = self._contexts.get(ordinal)
            if ctx is None:
                dev = ctypes.c_int()
                self._check("cuDeviceGet", self._lib.cuDeviceGet(ctypes.byref(dev), ordinal))
                ctx = ctypes.c_void_p()
                rc = self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
                self._check("cuDevicePrimaryCtxRetain", rc)
                self._contexts[ordinal] = ctx
            return ctx

    @contextmanager
    def on(self, ordinal: int) -> Iterator[None]:
        """The device's primary context (torch's) is current on this thread inside."""
        self._check("cuCtxPushCurrent", self._fn("cuCtxPushCurrent_v2", "cuCtxPushCurrent")(self._context(ordinal)))
        try:
            yield
        finally:
            popped = ctypes.c_void_p()
            self._fn("cuCtxPopCurrent_v2", "cuCtxPopCurrent")(ctypes.byref(popped))

    def uuid(self, ordinal: int) -> bytes:
        with self._lock:
            found = self._uuids.get(ordinal)
        if found is None:
            dev = ctypes.c_int()
            self._check("cuDeviceGet", self._lib.cuDeviceGet(ctypes.byref(dev), ordinal))
            raw = ctypes.create_string_buffer(UUID_BYTES)
            self._check("cuDeviceGetUuid", self._fn("cuDeviceGetUuid_v2", "cuDeviceGetUuid")(raw, dev))
            found = raw.raw
            with self._lock:
                self._uuids[ordinal] = found
        return found

    def _range(self, ptr: int) -> tuple[int, int]:
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        rc = self._fn("cuMemGetAddressRange_v2", "cuMemGetAddressRange")(
            ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)
        )
        self._check("cuMemGetAddressRange", rc)
        return base.value, size.value

    def export(self, t: torch.Tensor) -> Export:
        """The handle of the allocation holding `t`'s storage and where `t`'s first byte lies in it."""
        ordinal = t.device.index if t.device.index is not None else torch.cuda.current_device()
        ptr = t.data_ptr()
        with self.on(ordinal):
            base, size = self._range(ptr)
            h = _Handle()
            self._check("cuIpcGetMemHandle", self._lib.cuIpcGetMemHandle(ctypes.byref(h), ctypes.c_uint64(base)))
        # Not h.reserved: ctypes reads a c_char array as a C string, cut at its first NUL.
        return Export(ctypes.string_at(ctypes.addressof(h), HANDLE_BYTES), ptr - base, size, self.uuid(ordinal))

    def open(self, ordinal: int, handle: bytes) -> tuple[int, int]:
        """Maps another process's allocation on device `ordinal`: (pointer, bytes mapped).

        The size is the driver's, not the sender's: the caller bounds every access by it.
        Opening a handle this context holds open already only counts one more reference.
        """
        if len(handle) != HANDLE_BYTES:
            raise CudaError("cuIpcOpenMemHandle", -1, f"a handle is {HANDLE_BYTES} bytes, not {len(handle)}")
        h = _Handle.from_buffer_copy(handle)
        ptr = ctypes.c_uint64()
        with self.on(ordinal):
            rc = self._fn("cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle")(ctypes.byref(ptr), h, _LAZY_ENABLE_PEER_ACCESS)
            self._check("cuIpcOpenMemHandle", rc)
            try:
                base, size = self._range(ptr.value)
                if base != ptr.value:
                    raise CudaError("cuMemGetAddressRange", -1, "the mapping does not start at its allocation")
            except BaseException:
                self._lib.cuIpcCloseMemHandle(ptr.value)
                raise
        return ptr.value, size

    def close(self, ordinal: int, ptr: int) -> None:
        with self.on(ordinal):
            self._check("cuIpcCloseMemHandle", self._lib.cuIpcCloseMemHandle(ctypes.c_uint64(ptr)))


    def host_register(self, ordinal: int, ptr: int, nbytes: int) -> None:
        """Page-locks `nbytes` of host memory at `ptr` for every context (portable), so that
        copies between it and a device run as DMA at the bus's speed. Through the driver
        API: a failure here leaves no error behind in the runtime's per-thread state, where
        torch's next kernel launch on this thread would find it and fail."""
        with self.on(ordinal):
            rc = self._fn("cuMemHostRegister_v2", "cuMemHostRegister")(
                ctypes.c_void_p(ptr), nbytes, _HOST_REGISTER_PORTABLE
            )
            self._check("cuMemHostRegister", rc)

    def host_unregister(self, ordinal: int, ptr: int) -> None:
        with self.on(ordinal):
            self._check("cuMemHostUnregister", self._lib.cuMemHostUnregister(ctypes.c_void_p(ptr)))

    def granularity(self, ordinal: int) -> int:
        """What a DeviceMemory's size is a multiple of on device `ordinal`. Raises CudaError
        where the device cannot make allocations shareable as POSIX file descriptors."""
        with self._lock:
            found = self._granularity.get(ordinal)
        if found is not None:
            return found
        dev = ctypes.c_int()
        self._check("cuDeviceGet", self._lib.cuDeviceGet(ctypes.byref(dev), ordinal))
        for attr, what in ((_ATTR_VMM, "virtual memory management"), (_ATTR_POSIX_FD, "POSIX file descriptor handles")):
            value = ctypes.c_int()
            self._check("cuDeviceGetAttribute", self._lib.cuDeviceGetAttribute(ctypes.byref(value), attr, dev))
            if value.value != 1:
                raise CudaError("cuDeviceGetAttribute", -1, f"device {ordinal} has no {what}")
        g = ctypes.c_size_t()
        with self.on(ordinal):
            rc = self._lib.cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(_prop(ordinal)), 0)
        self._check("cuMemGetAllocationGranularity", rc)
        with self._lock:
            self._granularity[ordinal] = g.value
        return g.value

    def allocate(self, ordinal: int, size: int) -> DeviceMemory:
        """A new device allocation of `size` bytes (a multiple of `granularity`), mapped
        here for reading and writing, exportable by `DeviceMemory.export_fd`."""
        handle = ctypes.c_uint64()
        with self.on(ordinal):
            rc = self._lib.cuMemCreate(ctypes.byref(handle), size, ctypes.byref(_prop(ordinal)), 0)
        self._check("cuMemCreate", rc)
        return self._mapped(ordinal, size, handle.value)

    def import_fd(self, ordinal: int, fd: int, size: int) -> DeviceMemory:
        """Maps the `size`-byte allocation another process exported as `fd` (the caller
        keeps and closes the descriptor). A descriptor that is no such allocation, or one
        smaller than `size`, raises CudaError."""
        handle = ctypes.c_uint64()
        with self.on(ordinal):
            rc = self._lib.cuMemImportFromShareableHandle(ctypes.byref(handle), ctypes.c_void_p(fd), _HANDLE_POSIX_FD)
        self._check("cuMemImportFromShareableHandle", rc)
        return self._mapped(ordinal, size, handle.value)

    def _mapped(self, ordinal: int, size: int, handle: int) -> DeviceMemory:
        """Maps allocation `handle` (now owned by the result, released with it) into this process."""
        ctx = self._context(ordinal)
        ptr = ctypes.c_uint64()
        mapped = False
        try:
            with self.on(ordinal):
                self._check("cuMemAddressReserve", self._lib.cuMemAddressReserve(ctypes.byref(ptr), size, 0, 0, 0))
                self._check("cuMemMap", self._lib.cuMemMap(ptr.value, size, 0, handle, 0))
                mapped = True
                access = _AccessDesc()
                access.location.type = _LOCATION_DEVICE
                access.location.id = ordinal
                access.flags = _ACCESS_READWRITE
                self._check("cuMemSetAccess", self._lib.cuMemSetAccess(ptr.value, size, ctypes.byref(access), 1))
        except BaseException:
            _release(self._lib, ctx, ptr.value, size, handle, mapped, os.getpid())
            raise
        return DeviceMemory(self, ordinal, ctx, ptr.value, size, handle)


class DeviceMemory:
    """A device allocation mapped in this process (Driver.allocate or import_fd): `size`
    bytes at `ptr` on device `ordinal`. Unmapped and released when the object is
    collected: a tensor over it (`tensor`) keeps it alive, so whoever queues work on
    such a tensor waits for that work before letting go of the tensor. Released from
    whichever thread drops it last, with no lock of Python's taken (a finalizer may run
    inside any locked section, when the garbage collector takes a cycle), and never in a
    forked child (its copy of the parent's context is unusable)."""

    __slots__ = ("__weakref__", "_drv", "handle", "ordinal", "ptr", "size")

    def __init__(self, drv: Driver, ordinal: int, ctx: ctypes.c_void_p, ptr: int, size: int, handle: int) -> None:
        self._drv = drv
        self.ordinal = ordinal
        self.ptr = ptr
        self.size = size
        self.handle = handle
        fin = weakref.finalize(self, _release, drv._lib, ctx, ptr, size, handle, True, os.getpid())
        fin.atexit = False  # at exit the driver tears everything down itself

    def export_fd(self) -> int:
        """A new POSIX file descriptor for the allocation (the caller closes it): another
        process that imports it maps the same memory, which stays until both let go."""
        fd = ctypes.c_int(-1)
        with self._drv.on(self.ordinal):
            rc = self._drv._lib.cuMemExportToShareableHandle(ctypes.byref(fd), self.handle, _HANDLE_POSIX_FD, 0)
        self._drv._check("cuMemExportToShareableHandle", rc)
        return fd.value

    def tensor(self) -> torch.Tensor:
        """All of its bytes as a flat uint8 tensor, which keeps this object alive."""
        return as_bytes(self.ptr, self.size, self.ordinal, owner=self)


def _release(lib: ctypes.CDLL, ctx: ctypes.c_void_p, ptr: int, size: int, handle: int, mapped: bool, pid: int) -> None:
    if os.getpid() != pid:
        return
    if not lib.cuCtxPushCurrent_v2(ctx):
        try:
            if ptr and mapped:
                lib.cuMemUnmap(ptr, size)
            if ptr:
                lib.cuMemAddressFree(ptr, size)
        finally:
            popped = ctypes.c_void_p()
            lib.cuCtxPopCurrent_v2(ctypes.byref(popped))
    lib.cuMemRelease(handle)


class _Blob:
    """Device bytes in torch's eyes (__cuda_array_interface__): a view torch does not own."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.owner: object = None  # what keeps the memory alive, held as long as the tensor
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
            "stream": None,  # the caller orders its own work
        }


def as_bytes(ptr: int, nbytes: int, ordinal: int, owner: object = None) -> torch.Tensor:
    """A uint8 tensor over `nbytes` device bytes at `ptr`; the tensor holds `owner` (else the
    memory stays the caller's to keep alive)."""
    blob = _Blob(ptr, nbytes)
    blob.owner = owner
    return torch.as_tensor(blob, device=torch.device("cuda", ordinal))


_driver: Driver | None = None
_driver_error: str | None = None
_driver_lock = threading.Lock()


def driver() -> Driver | None:
    """The process's driver, None where CUDA IPC cannot work here (see `why_not`)."""
    global _driver, _driver_error
    with _driver_lock:
        if _driver is None and _driver_error is None:
            try:
                if not torch.cuda.is_available():
                    raise OSError("torch sees no CUDA device")
                _driver = Driver(ctypes.CDLL("libcuda.so.1"))
            except (OSError, CudaError) as e:
                _driver_error = str(e)
        return _driver


def why_not() -> str | None:
    driver()
    return _driver_error
