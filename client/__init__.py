"""The fuseport client: register PyTorch functions on a server and run them there.

    from fuseport.client import Client
    with Client("127.0.0.1:50051") as c:
        key = c.register(fn, example_inputs)
        out = c.execute(key, [x, y])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fuseport.wire._lazy import lazy_exports
from fuseport.wire.errors import (  # cheap: no torch
    CaptureError,
    DeadlineExceeded,
    ExecutionFailed,
    FuseportError,
    HandleElsewhere,
    HandleNotFound,
    InternalError,
    InvalidAlias,
    InvalidArgument,
    InvalidGraph,
    InvalidStack,
    KernelNotFound,
    KeyMismatch,
    NoMatchingVariant,
    OpNotAllowed,
    PermissionDenied,
    ResourceExhausted,
    ResultTooLarge,
    SignatureMismatch,
    Unauthenticated,
    Unavailable,
)
from fuseport.wire.hostmem import keep_host_memory

if TYPE_CHECKING:
    from fuseport.client.client import AsyncClient, Client, ExecuteResult, Timings
    from fuseport.client.info import KernelInfo
    from fuseport.client.resident import RemoteTensor
    from fuseport.wire.capture import capture
    from fuseport.wire.keys import key_for

__all__ = [
    "AsyncClient",
    "CaptureError",
    "Client",
    "DeadlineExceeded",
    "ExecuteResult",
    "ExecutionFailed",
    "FuseportError",
    "HandleElsewhere",
    "HandleNotFound",
    "InternalError",
    "InvalidAlias",
    "InvalidArgument",
    "InvalidGraph",
    "InvalidStack",
    "KernelInfo",
    "KernelNotFound",
    "KeyMismatch",
    "NoMatchingVariant",
    "OpNotAllowed",
    "PermissionDenied",
    "RemoteTensor",
    "ResourceExhausted",
    "ResultTooLarge",
    "SignatureMismatch",
    "Timings",
    "Unauthenticated",
    "Unavailable",
    "capture",
    "keep_host_memory",
    "key_for",
]

# Imported on first use: they bring torch, which `fuseport health` does without.
__getattr__ = lazy_exports(
    __name__,
    {
        "AsyncClient": "fuseport.client.client",
        "Client": "fuseport.client.client",
        "ExecuteResult": "fuseport.client.client",
        "KernelInfo": "fuseport.client.info",
        "RemoteTensor": "fuseport.client.resident",
        "Timings": "fuseport.client.client",
        "capture": "fuseport.wire.capture",
        "key_for": "fuseport.wire.keys",
    },
)
