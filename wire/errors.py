"""The one exception tree of fuseport, and the tables that carry it over gRPC.

    FuseportError
    ├── InvalidArgument            INVALID_ARGUMENT
    │   ├── InvalidStack           a stack that cannot be decoded
    │   ├── InvalidGraph           a graph that cannot be decoded or rebuilt
    │   │   ├── OpNotAllowed       an op outside the allowlist
    │   │   └── KeyMismatch        a graph sent under a key that is not its content key
    │   ├── CaptureError           (client side) a function that cannot be captured
    │   ├── SignatureMismatch      inputs that do not match the kernel's inputs
    │   │   └── NoMatchingVariant  right number of inputs, but no variant covers them
    │   ├── ExecutionFailed        the kernel raised on these inputs
    │   └── InvalidAlias           a kernel alias that is malformed or names another kernel
    ├── KernelNotFound             NOT_FOUND
    ├── HandleNotFound             NOT_FOUND: not a live TensorHandle of this caller (never
    │   │                          made, freed, expired or another client's: not told apart)
    │   └── HandleElsewhere        made by another serving process (or before a restart)
    ├── ResourceExhausted          RESOURCE_EXHAUSTED (out of memory, message too large, a quota,
    │   │                          a full disk: the message names what and the remedy)
    │   └── ResultTooLarge         the planned result is over what the call's path carries (one
    │                              message, or the shared-memory session's room): nothing ran,
    │                              and the client sends the call again as a stream
    ├── DeadlineExceeded           DEADLINE_EXCEEDED
    ├── Unauthenticated            UNAUTHENTICATED (no token, or one the server does not know)
    ├── PermissionDenied           PERMISSION_DENIED (the token's role may not call the method)
    ├── Unavailable                UNAVAILABLE (shutting down, unreachable)
    ├── SharedMemoryUnavailable    FAILED_PRECONDITION: shared memory is off, or the call's
    │   │                          session is not open on this serving process (the client
    │   │                          sends the call over the network instead)
    │   └── CudaIpcUnavailable     a CUDA IPC handle the server cannot open (the client sends
    │                              its CUDA tensors through host memory from then on)
    └── InternalError              INTERNAL

The server maps an error to its status code with `status_for`; the error's class
name travels in the trailing metadata under `ERROR_METADATA_KEY`, so the client
(`error_from_status`) raises the same class, or the code's base class for a name
it does not know. Where several classes share a code (NOT_FOUND), the first
listed in the table is the one a client raises when the server names none.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

__all__ = [
    "ERROR_METADATA_KEY",
    "CaptureError",
    "CudaIpcUnavailable",
    "DeadlineExceeded",
    "ExecutionFailed",
    "FuseportError",
    "HandleElsewhere",
    "HandleNotFound",
    "InternalError",
    "InvalidAlias",
    "InvalidArgument",
    "InvalidGraph",
    "InvalidStack",
    "KernelNotFound",
    "KeyMismatch",
    "NoMatchingVariant",
    "OpNotAllowed",
    "PermissionDenied",
    "ResourceExhausted",
    "ResultTooLarge",
    "SharedMemoryUnavailable",
    "SignatureMismatch",
    "Unauthenticated",
    "Unavailable",
    "error_from_status",
    "status_for",
]

ERROR_METADATA_KEY = "fuseport-error"


class FuseportError(Exception):
    """Base of every error fuseport raises on purpose."""


class InvalidArgument(FuseportError):
    """The request is wrong; sending it again will fail again."""


class InvalidStack(InvalidArgument):
    """A stack (or one of its values) cannot be decoded."""


class InvalidGraph(InvalidArgument):
    """A graph cannot be decoded or rebuilt."""


class OpNotAllowed(InvalidGraph):
    """A graph names an op outside the allowlist."""


class KeyMismatch(InvalidGraph):
    """A graph sent along with a call for kernel K (so that a replica lacking K
    can register it) whose content key is not K: a server never files a graph
    under a key its content does not hash to."""


class CaptureError(InvalidArgument):
    """A function or module cannot be captured as a graph."""


class SignatureMismatch(InvalidArgument):
    """The inputs on the stack do not match the kernel's declared inputs."""


class NoMatchingVariant(SignatureMismatch):
    """The stack has the kernel's number of inputs, but no variant of the kernel
    covers them (kind, dtype, rank, a fixed size, a static value or a size
    condition): a client that holds the function captures a variant for them."""


class ExecutionFailed(InvalidArgument):
    """The kernel raised on the given inputs (shapes that do not broadcast, ...)."""


class InvalidAlias(InvalidArgument):
    """A kernel alias (Register's `alias`) that is not 1 to 64 characters of the
    allowed set, names another kernel, or would replace the kernel's alias."""


class KernelNotFound(FuseportError):
    """No kernel is registered under the key."""

    def __init__(self, message: str, key: int | None = None) -> None:
        super().__init__(message)
        self.key = key


class HandleNotFound(FuseportError):
    """A TensorHandle that is not a live handle of the caller on this serving
    process. Whether it was never made, freed, expired or belongs to another
    client is deliberately not said: the answer must not tell a caller that
    someone else's handle exists."""


class HandleElsewhere(HandleNotFound):
    """A TensorHandle made by another serving process (its id names that
    process), or by this server before it restarted: send calls that use it to
    the process that made it; after a restart it is gone."""


class ResourceExhausted(FuseportError):
    """Out of device memory, a message over the size limit, a quota reached (the
    message names its flag), or a store whose disk is full (the message names the
    directory). Nothing was kept: the same call can succeed once there is room."""


class ResultTooLarge(ResourceExhausted):
    """The call's result, as planned before running, is over what the path the
    call took can carry back: one message (--max-message-bytes), or a
    shared-memory session's room for results (--shared-memory-max-bytes) when
    it is over one message too. Nothing ran: the Python client sends the call
    again as a stream by itself, whose own limit (--max-stream-bytes) then
    applies. A streamed call over that limit gets plain ResourceExhausted."""


class DeadlineExceeded(FuseportError):
    """The call's deadline passed."""


class Unauthenticated(FuseportError):
    """The call carried no token, or one the server does not know (or no longer
    knows: tokens are reloaded on SIGHUP). The message never repeats the token."""


class PermissionDenied(FuseportError):
    """The token is known, but its role may not call this method (a `user`
    token calling Register or Unregister)."""


class Unavailable(FuseportError):
    """The server is shutting down or cannot be reached; safe to retry."""


class SharedMemoryUnavailable(FuseportError):
    """Shared memory cannot carry this call: the server has it off, or the
    session named is closed or another serving process's. Nothing ran."""


class CudaIpcUnavailable(SharedMemoryUnavailable):
    """The server could not open a CUDA IPC handle of the call: CUDA IPC does not
    work between these two processes (another PID or IPC namespace, the same
    process), or the handle names no allocation. Nothing ran; the session stays."""


class InternalError(FuseportError):
    """Something unexpected; the server log has the details."""


# The one status table. Subclasses inherit their base's code (see status_for).
_STATUS: dict[type[FuseportError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    KernelNotFound: grpc.StatusCode.NOT_FOUND,
    HandleNotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    SharedMemoryUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    InternalError: grpc.StatusCode.INTERNAL,
}

# The reverse table, derived so that the two can never disagree. CANCELLED and
# the codes fuseport never sends map to the nearest meaning for a caller.
_ERROR_FOR_CODE: dict[grpc.StatusCode, type[FuseportError]] = {}
for _cls, _code in _STATUS.items():
    _ERROR_FOR_CODE.setdefault(_code, _cls)  # the first class listed for a code
_ERROR_FOR_CODE[grpc.StatusCode.CANCELLED] = Unavailable


def _subclasses(cls: type[FuseportError]) -> Iterable[type[FuseportError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)


_BY_NAME: dict[str, type[FuseportError]] = {c.__name__: c for c in _subclasses(FuseportError)}


def status_for(error: FuseportError) -> grpc.StatusCode:
    """The status code for an error: that of its nearest class in the table."""
    return _code_of(type(error))


def _code_of(error_class: type[FuseportError]) -> grpc.StatusCode:
    for cls in error_class.__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INTERNAL


def error_from_status(
    code: grpc.StatusCode, message: str, error_name: str | None = None
) -> FuseportError:
    """The typed error a client raises for a status code (and the server's class name)."""
    base = _ERROR_FOR_CODE.get(code, InternalError)
    cls = _BY_NAME.get(error_name or "", base)
    if _code_of(cls) is not code:  # a name that contradicts the code: trust the code
        cls = base
    return cls(message)
