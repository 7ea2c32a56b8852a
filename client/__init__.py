"""The fuseport client: register PyTorch functions on a server and run them there.

    from fuseport.client import Client
    with Client("127.0.0.1:50051") as c:
        key = c.register(fn, example_inputs)
        out = c.execute(key, [x, y])
"""

from fuseport.client.client import AsyncClient, Client, ExecuteResult, Timings
from fuseport.wire.capture import capture
from fuseport.wire.errors import (
    CaptureError,
    DeadlineExceeded,
    ExecutionFailed,
    FuseportError,
    InternalError,
    InvalidArgument,
    InvalidGraph,
    InvalidStack,
    KernelNotFound,
    OpNotAllowed,
    ResourceExhausted,
    SignatureMismatch,
    Unavailable,
)
from fuseport.wire.keys import key_for

__all__ = [
    "AsyncClient",
    "CaptureError",
    "Client",
    "DeadlineExceeded",
    "ExecuteResult",
    "ExecutionFailed",
    "FuseportError",
    "InternalError",
    "InvalidArgument",
    "InvalidGraph",
    "InvalidStack",
    "KernelNotFound",
    "OpNotAllowed",
    "ResourceExhausted",
    "SignatureMismatch",
    "Timings",
    "Unavailable",
    "capture",
    "key_for",
]
