"""The gRPC servicer: decode the request, call the core, encode the response. Nothing else."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from fuseport.server.core import Core
from fuseport.wire import _pb, codec
from fuseport.wire.errors import (
    ERROR_METADATA_KEY,
    DeadlineExceeded,
    FuseportError,
    InternalError,
    InvalidArgument,
    status_for,
)

__all__ = ["SERVICE_NAME", "KernelService"]

log = logging.getLogger(__name__)

SERVICE_NAME = _pb.service.DESCRIPTOR.services_by_name["KernelService"].full_name

T = TypeVar("T")


def _parse(cls: type[T], data: bytes) -> T:
    try:
        return cls.FromString(data)  # type: ignore[attr-defined,no-any-return]
    except Exception as e:  # protobuf's DecodeError and friends
        raise InvalidArgument(f"malformed {cls.__name__}: {e}") from None


class KernelService:
    """Every method takes and returns raw bytes: decoding and encoding run on a
    worker thread (so large messages never block the event loop) and are timed."""

    def __init__(self, core: Core, workers: int, max_message_bytes: int) -> None:
        self.core = core
        self.limit = max_message_bytes
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="fuseport-worker")

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "Register": self._register,
            "Execute": self._execute,
            "Fallback": self._fallback,
            "Describe": self._describe,
            "List": self._list,
            "Unregister": self._unregister,
        }
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {name: grpc.unary_unary_rpc_method_handler(self._wrap(fn)) for name, fn in methods.items()},
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ plumbing

    def _wrap(self, fn: Callable[[bytes, float | None, int], bytes]) -> Callable[..., Any]:
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            arrived = time.perf_counter_ns()
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            try:
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("deadline passed before the call started")
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._pool, fn, request, deadline, arrived)
            except FuseportError as e:
                await self._abort(context, e)
            except Exception as e:  # noqa: BLE001 - the last line of defence
                log.exception("unexpected error in %s", fn.__name__)
                await self._abort(context, InternalError("internal error; see the server log"))
            raise AssertionError("unreachable")  # context.abort raises

        call.__name__ = fn.__name__
        return call

    async def _abort(self, context: grpc.aio.ServicerContext, error: FuseportError) -> None:
        code = status_for(error)
        if code is not grpc.StatusCode.INTERNAL:  # an INTERNAL one is logged with its traceback
            log.info("%s: %s", code.name, error)
        await context.abort(code, str(error), trailing_metadata=((ERROR_METADATA_KEY, type(error).__name__),))

    # ------------------------------------------------------------------ methods

    def _register(self, request: bytes, deadline: float | None, arrived: int) -> bytes:
        req = _parse(_pb.service.RegisterRequest, request)
        key, created = self.core.register(req.graph)
        return _pb.service.RegisterResponse(key=key, created=created).SerializeToString()

    def _execute(self, request: bytes, deadline: float | None, arrived: int) -> bytes:
        return self._run(request, deadline, arrived, fused=True)

    def _fallback(self, request: bytes, deadline: float | None, arrived: int) -> bytes:
        return self._run(request, deadline, arrived, fused=False)

    def _run(self, request: bytes, deadline: float | None, arrived: int, *, fused: bool) -> bytes:
        started = time.perf_counter_ns()
        req = codec.decode_execute_request(request)
        del request  # the decoded tensors keep what they need of it
        decoded = time.perf_counter_ns()
        result = self.core.execute(
            req.key, req.stack, fused=fused, wait=req.wait_for_compile, deadline=deadline
        )
        timings = _pb.service.Timings(
            decode_us=(decoded - started) // 1000,
            queue_us=(started - arrived) // 1000,
            run_us=result.run_us,
        )
        out = codec.encode_execute_response(
            result.stack,
            result.path,
            result.reason,
            result.detail,
            timings,
            limit=self.limit,
            clock=time.perf_counter_ns,
        )
        log.debug(
            "%s key=%d path=%s decode=%dus queue=%dus run=%dus encode=%dus",
            "Execute" if fused else "Fallback",
            req.key,
            _pb.service.Path.Name(result.path),
            timings.decode_us,
            timings.queue_us,
            timings.run_us,
            timings.encode_us,
        )
        return out

    def _describe(self, request: bytes, deadline: float | None, arrived: int) -> bytes:
        req = _parse(_pb.service.DescribeRequest, request)
        info = self.core.describe(req.key, include_source=req.include_source)
        return _pb.service.DescribeResponse(kernel=info).SerializeToString()

    def _list(self, request: bytes, deadline: float | None, arrived: int) -> bytes:
        _parse(_pb.service.ListRequest, request)
        return _pb.service.ListResponse(kernels=self.core.list()).SerializeToString()

    def _unregister(self, request: bytes, deadline: float | None, arrived: int) -> bytes:
        req = _parse(_pb.service.UnregisterRequest, request)
        return _pb.service.UnregisterResponse(removed=self.core.unregister(req.key)).SerializeToString()
