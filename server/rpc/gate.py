"""In front of every servicer: tokens and roles, the drain, the calls in flight, and the serving process's name on each response.

Only the services' methods pass through the gate (KernelService's and the
KServe v2 protocol's); health and reflection stay open for probes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from fuseport.server.rpc.plumbing import abort
from fuseport.server.security import Access
from fuseport.wire import codec
from fuseport.wire.errors import FuseportError, PermissionDenied, Unavailable, status_for
from fuseport.wire.targets import PROCESS_METADATA_KEY

__all__ = ["FAULT_METADATA", "Gate", "Services"]

log = logging.getLogger(__name__)

# FOR TESTS ONLY: on a server started with FUSEPORT_FAULT_INJECTION=1, a call
# carrying this metadata breaks the server's device (Core.inject_device_fault)
# instead of running. Any other server ignores it.
FAULT_METADATA = ("fuseport-inject-fault", "device")


class Services(grpc.GenericRpcHandler):
    """The methods of several services, as one handler: what the gate guards."""

    def __init__(self, *handlers: grpc.GenericRpcHandler) -> None:
        self._handlers = handlers

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        for handler in self._handlers:
            found = handler.service(details)
            if found is not None:
                return found
        return None


class Gate(grpc.GenericRpcHandler):
    """The service's methods behind a gate: it counts the calls in flight and,
    once closed, answers every call that has not started with UNAVAILABLE (it
    never ran, so a retry is safe; the client's retry policy makes one).

    A call counts from the start of its handler until gRPC has sent its status
    (the context's done callback): when `idle()` returns, every response has
    been handed to the transport.

    With `access`, a call must first carry a token whose role may call the
    method (UNAUTHENTICATED / PERMISSION_DENIED otherwise). Only the service's
    methods pass through here (KernelService's and the KServe v2 protocol's):
    health and reflection stay open for probes. An Execute or Fallback that
    carries graphs registers them, so its caller must also be allowed to call
    Register.

    `refused(method, code, arrived, received)` is told of each call the gate
    refuses, so that metrics count them with their status code. `process`: what
    PROCESS_METADATA_KEY says on every response (None, one process: nothing).
    `inject` (FUSEPORT_FAULT_INJECTION only, tests): what an admitted call that
    carries FAULT_METADATA runs (on a thread) instead of its method; None: the
    metadata means nothing."""

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        access: Access | None = None,
        refused: Callable[[str, grpc.StatusCode, int, int], None] | None = None,
        process: str | None = None,
        inject: Callable[[], None] | None = None,
    ) -> None:
        self._inner = inner
        self._access = access
        self._refused = refused
        self._process = None if process is None else ((PROCESS_METADATA_KEY, process),)
        self._inject = inject
        self._gated: dict[str, grpc.RpcMethodHandler] = {}
        self.closed = False
        self.in_flight = 0
        self._idle: asyncio.Event | None = None

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        gated = self._gated.get(details.method)
        if gated is None:
            handler = self._inner.service(details)
            if handler is None:
                return None  # not the service's: health, reflection, unknown
            gated = self._gated[details.method] = self._gate(handler, details.method.rsplit("/", 1)[-1])
        return gated

    def _gate(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        behaviour: Callable[[Any, grpc.aio.ServicerContext], Any] | None = handler.unary_unary
        streams = behaviour is None and handler.stream_stream is not None
        streams_in = behaviour is None and handler.stream_unary is not None
        if streams:
            behaviour = handler.stream_stream
        elif streams_in:
            behaviour = handler.stream_unary
        if behaviour is None:
            raise TypeError("gated methods are unary-unary, stream-stream or stream-unary")
        access = self._access
        process = self._process
        inject = self._inject

        async def admit(context: grpc.aio.ServicerContext, request: Any) -> None:
            """Token, role and drain checks; `request` is None for a stream (its
            messages have not arrived yet)."""
            arrived = time.perf_counter_ns()
            if access is not None:
                # Before anything else: a caller without a valid token learns
                # nothing, not even that the server is draining.
                refused = self._check(access, context.invocation_metadata(), method, request)
                if refused is not None:
                    log.info(
                        "%s: %s (peer %s): %s", status_for(refused).name, method, context.peer(), refused
                    )
                    self._count(method, status_for(refused), arrived, request)
                    await abort(context, refused)
            if self.closed:
                self._count(method, grpc.StatusCode.UNAVAILABLE, arrived, request)
                await abort(context, Unavailable("the server is shutting down"))
            self.in_flight += 1
            context.add_done_callback(self._finished)
            if process is not None:
                context.set_trailing_metadata(process)
            if inject is not None and any(
                (k, v) == FAULT_METADATA for k, v in context.invocation_metadata() or ()
            ):
                log.warning("%s (peer %s): injecting a device fault (tests only)", method, context.peer())
                try:
                    await asyncio.get_running_loop().run_in_executor(None, inject)
                except FuseportError as e:
                    await abort(context, e, process or ())

        if streams:

            async def stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                await admit(context, None)
                async for response in behaviour(requests, context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )

        if streams_in:

            async def gathered(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                await admit(context, None)
                return await behaviour(requests, context)

            return grpc.stream_unary_rpc_method_handler(
                gathered, handler.request_deserializer, handler.response_serializer
            )

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await admit(context, request)
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            call, handler.request_deserializer, handler.response_serializer
        )

    @staticmethod
    def _check(access: Access, metadata: Any, method: str, request: Any) -> FuseportError | None:
        refused = access.check(metadata, method)
        if refused is None and method in ("Execute", "Fallback") and codec.carries_graphs(request):
            # The graphs are registered as Register would: the caller needs its right too.
            if access.check(metadata, "Register") is not None:
                refused = PermissionDenied(
                    f"role {access.role_of(metadata)!r} may not call {method} with graphs: "
                    "registering them needs a role that may call Register"
                )
        return refused

    def _count(self, method: str, code: grpc.StatusCode, arrived: int, request: Any) -> None:
        if self._refused is not None:
            self._refused(method, code, arrived, len(request) if isinstance(request, bytes) else 0)

    def _finished(self, _context: object) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def idle(self) -> None:
        """Returns once no call is in flight (once closed, none starts)."""
        while self.in_flight:
            if self._idle is None or self._idle.is_set():
                self._idle = asyncio.Event()
            await self._idle.wait()
