"""The gRPC servicer: decode the request, call the core, encode the response. Nothing else."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from fuseport.server.core import Call, Core, Result
from fuseport.server.devices import is_out_of_memory
from fuseport.server.resident import CLIENT_ID_KEY, NO_OWNER, Owner, owner_of
from fuseport.server.security import presented_token_digest
from fuseport.server.shm import MAX_SLOTS, SharedMemory, check_slot, shared_sizes
from fuseport.wire import _pb, codec
from fuseport.wire.errors import (
    ERROR_METADATA_KEY,
    DeadlineExceeded,
    FuseportError,
    InternalError,
    InvalidArgument,
    ResourceExhausted,
    status_for,
)
from fuseport.wire.hostmem import release_host_memory
from fuseport.wire.stream import CHUNK_BYTES, Assembler, TensorSpec, Writer

__all__ = ["SERVICE_NAME", "CallObserver", "CallRecord", "KernelService"]

log = logging.getLogger(__name__)

SERVICE_NAME = _pb.service.DESCRIPTOR.services_by_name["KernelService"].full_name

T = TypeVar("T")

# Requests at most this large are decoded on the event loop thread, and run
# there too when their planned work is light (KernelService._run_small).
_INLINE_MAX_BYTES = 64 << 10


@dataclass
class CallRecord:
    """What one call did, beyond its status: filled by Execute and Fallback once
    a kernel ran (which path, why, the server-side timings of the response)."""

    method: str
    path: int = _pb.service.PATH_UNSPECIFIED
    reason: int = _pb.service.FALLBACK_REASON_UNSPECIFIED
    timings: _pb.service.Timings | None = None
    # Who owns the call's device-resident values (from its metadata).
    owner: Owner = NO_OWNER


class CallObserver:
    """Told of every call the servicer finished, at the point where its status
    is decided (server/metrics.py counts them); does nothing here. Called on the
    event loop: it must be quick and must not raise."""

    def finished(
        self, record: CallRecord, code: grpc.StatusCode, seconds: float, received: int, sent: int
    ) -> None:
        """`seconds` from the handler's start to the response (or error) being
        ready; `received`/`sent` are the message sizes in bytes (0 sent on an error)."""


def _error_of(e: Exception, name: str) -> FuseportError:
    """The error a call answers with, for whatever it raised."""
    if isinstance(e, FuseportError):
        return e
    if isinstance(e, MemoryError) or is_out_of_memory(e):
        # Anywhere on the request path: decoding, running, encoding.
        log.warning("%s: out of memory: %s", name, e)
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        return ResourceExhausted(f"out of memory in {name.lstrip('_')}: {detail}")
    log.exception("unexpected error in %s", name)
    return InternalError("internal error; see the server log")


def _parse(cls: type[T], data: bytes) -> T:
    try:
        return cls.FromString(data)  # type: ignore[attr-defined,no-any-return]
    except Exception as e:  # protobuf's DecodeError and friends
        raise InvalidArgument(f"malformed {cls.__name__}: {e}") from None


class KernelService:
    """Every method takes and returns raw bytes: decoding and encoding run on a
    worker thread (so large messages never block the event loop) and are timed;
    small Execute/Fallback calls to quick kernels run on the event loop itself."""

    def __init__(
        self,
        core: Core,
        workers: int,
        max_message_bytes: int,
        release_above: int | None = None,
        stream_chunk_bytes: int = CHUNK_BYTES,
        shared_memory: SharedMemory | None = None,
    ) -> None:
        self.core = core
        self.shared = shared_memory or SharedMemory(enabled=False, max_bytes=0)
        self.stream_chunk_bytes = stream_chunk_bytes
        # A call that moved more than this many bytes hands freed host memory back
        # once it is over (see wire.hostmem); None: memory is left to the allocator.
        self.release_above = release_above
        self.observer = CallObserver()
        # The kernel namespace of a call, from its metadata (set by the app where
        # tokens are checked: a user token's own; b"" the shared one).
        self.tenant_of: Callable[[Any], bytes] = _no_tenant
        self.limit = max_message_bytes
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="fuseport-worker")
        self._runners = (self._execute, self._fallback)

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "Register": self._register,
            "Execute": self._execute,
            "Fallback": self._fallback,
            "Describe": self._describe,
            "List": self._list,
            "Unregister": self._unregister,
            "FetchHandles": self._fetch_handles,
            "FreeHandles": self._free_handles,
            "RenewLease": self._renew_lease,
            "OpenSharedMemory": self._open_shared_memory,
        }
        handlers = {name: grpc.unary_unary_rpc_method_handler(self._wrap(fn, name)) for name, fn in methods.items()}
        for name, fused in (("ExecuteStream", True), ("FallbackStream", False)):
            handlers[name] = grpc.stream_stream_rpc_method_handler(self._streamed(name, fused=fused))
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ plumbing

    def _wrap(self, fn: Callable[[bytes, float | None, int, CallRecord], bytes], method: str) -> Callable[..., Any]:
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            arrived = time.perf_counter_ns()
            record = CallRecord(method)
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            error: FuseportError
            try:
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("deadline passed before the call started")
                record.owner = _owner(context, self.tenant_of)
                loop = asyncio.get_running_loop()
                if fn in self._runners and len(request) <= _INLINE_MAX_BYTES:
                    out = await self._run_small(loop, request, deadline, record, fused=fn == self._execute)
                else:
                    out = await loop.run_in_executor(self._pool, fn, request, deadline, arrived, record)
                self._observe(record, grpc.StatusCode.OK, arrived, len(request), len(out))
                if self.release_above is not None and len(request) + len(out) > self.release_above:
                    # Once the response is sent and its buffers dropped (the next turn
                    # of the loop after the call is done), not while they are held.
                    context.add_done_callback(lambda _: loop.call_soon(release_host_memory))
                return out
            except Exception as e:  # noqa: BLE001 - the last line of defence
                error = _error_of(e, fn.__name__)
            self._observe(record, status_for(error), arrived, len(request), 0)
            await self._abort(context, error)
            raise AssertionError("unreachable")  # context.abort raises

        call.__name__ = fn.__name__
        return call

    def _observe(self, record: CallRecord, code: grpc.StatusCode, arrived: int, received: int, sent: int) -> None:
        try:
            self.observer.finished(record, code, (time.perf_counter_ns() - arrived) / 1e9, received, sent)
        except Exception:  # noqa: BLE001 - counting must never fail a call
            log.exception("call observer failed")

    def refused(self, method: str, code: grpc.StatusCode, arrived: int, received: int) -> None:
        """Counts a call refused before its handler ran (the app's gate: no token,
        a role that may not call it, a server draining)."""
        self._observe(CallRecord(method), code, arrived, received, 0)

    async def _abort(self, context: grpc.aio.ServicerContext, error: FuseportError) -> None:
        code = status_for(error)
        if code is not grpc.StatusCode.INTERNAL:  # an INTERNAL one is logged with its traceback
            log.info("%s: %s", code.name, error)
        await context.abort(code, str(error), trailing_metadata=((ERROR_METADATA_KEY, type(error).__name__),))

    # ------------------------------------------------------------------ methods

    def _register(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        req = _parse(_pb.service.RegisterRequest, request)
        variant_of = req.variant_of if req.HasField("variant_of") else None
        alias = req.alias if req.HasField("alias") else None
        batching = req.batching if req.HasField("batching") else None
        key, created, variant = self.core.register(
            req.graph, variant_of, alias, batching, tenant=record.owner.tenant
        )
        return _pb.service.RegisterResponse(key=key, created=created, variant=variant).SerializeToString()

    def _execute(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        return self._run(request, deadline, arrived, record, fused=True)

    def _fallback(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        return self._run(request, deadline, arrived, record, fused=False)

    async def _run_small(
        self,
        loop: asyncio.AbstractEventLoop,
        request: bytes,
        deadline: float | None,
        record: CallRecord,
        *,
        fused: bool,
    ) -> bytes:
        """A small call is decoded and checked right here on the event loop, and
        runs here too when its plan says its work is light (Core.light: bounded by
        the sizes of this call, not by what earlier calls took), since handing it
        to a worker and back costs more (about 200 us) than the work. Anything
        else goes to a worker: a call that asks to wait for a compile, graphs to
        register, shared-memory tensors to copy, sizes never planned, heavy work."""
        started = time.perf_counter_ns()
        req = codec.decode_execute_request(request)
        decode_ns = time.perf_counter_ns() - started
        call: Call | None = None
        if not req.wait_for_compile and not req.graphs and not req.shm_session:
            call = self._prepare(req, record, fused, planned_only=True)  # timed as run_us
            if call is not None and self.core.light(call):
                batcher = self.core.batcher  # None unless --batch-window-us: then one check, nothing more
                if batcher is not None and not req.no_batching and (bkey := batcher.batch_key(call)) is not None:
                    result = await batcher.submit(bkey, call, deadline, self._pool)
                    return self._respond(req, result, decode_ns, 0, record)
                return self._respond(req, self.core.run(call, deadline=deadline), decode_ns, 0, record)
        queued = time.perf_counter_ns()
        return await loop.run_in_executor(
            self._pool,
            lambda: self._finish(req, decode_ns, time.perf_counter_ns() - queued, deadline, record, fused, call),
        )

    def _run(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord, *, fused: bool) -> bytes:
        started = time.perf_counter_ns()
        req = codec.decode_execute_request(request)
        del request  # the decoded tensors keep what they need of it
        return self._finish(req, time.perf_counter_ns() - started, started - arrived, deadline, record, fused)

    def _prepare(
        self, req: codec.ExecuteRequest, record: CallRecord, fused: bool, stack: list[Any] | None = None,
        *, planned_only: bool = False, transport: str = "unary",
    ) -> Call | None:  # fmt: skip
        return self.core.prepare(
            req.key, req.stack if stack is None else stack, fused=fused, variants=req.variants,
            owner=record.owner, keep=req.keep_outputs, planned_only=planned_only, transport=transport,
        )  # fmt: skip

    def _finish(
        self,
        req: codec.ExecuteRequest,
        decode_ns: int,
        queue_ns: int,
        deadline: float | None,
        record: CallRecord,
        fused: bool,
        call: Call | None = None,
    ) -> bytes:
        """On a worker: registers what the call carries, reads shared-memory
        tensors, prepares the call (unless the loop did), runs it, responds."""
        # Registered first, in this same call: a separate Register could reach
        # another replica than this call did (see ExecuteRequest.graphs).
        registered = self.core.adopt(req.key, req.graphs, req.alias, record.owner.tenant) if req.graphs else 0
        if call is None:
            stack = req.stack
            if req.shm_session:
                # Shared-memory tensors are copied out of the client's region here:
                # reading them is this call's decoding.
                started = time.perf_counter_ns()
                check_slot(req.shm_slot)  # before running, not after
                # Sizes first, as a stream's header: refused before anything is copied.
                self.core.check_inputs(shared_sizes(stack), "shared-memory stack")
                stack = self.shared.resolve(record.owner, req.shm_session, stack, self.core.placement.device)
                decode_ns += time.perf_counter_ns() - started
            # Results bound for a shared-memory slot are checked against the
            # session's room below, not against one message.
            to_slot = bool(req.shm_session and req.shm_slot and not req.keep_outputs)
            call = self._prepare(req, record, fused, stack, transport="shm" if to_slot else "unary")
            assert call is not None
            if to_slot and call.plan.outputs is not None:
                self.shared.check_results(
                    record.owner, req.shm_session, req.shm_slot, [*call.below, *call.plan.outputs], self.limit,
                    req.shm_fresh_output,
                )  # fmt: skip
        result = self.core.run(call, wait=req.wait_for_compile, deadline=deadline)
        return self._respond(req, result, decode_ns, queue_ns, record, registered)

    def _respond(
        self,
        req: codec.ExecuteRequest,
        result: Result,
        decode_ns: int,
        queue_ns: int,
        record: CallRecord,
        registered: int = 0,
    ) -> bytes:
        timings = _pb.service.Timings(
            decode_us=decode_ns // 1000,
            queue_us=queue_ns // 1000,
            run_us=result.run_us,
        )
        out_stack = result.stack
        if req.shm_session and req.shm_slot:
            start = time.perf_counter_ns()
            out_stack = self.shared.place(
                record.owner, req.shm_session, req.shm_slot, out_stack, req.shm_fresh_output
            )
            timings.encode_us = (time.perf_counter_ns() - start) // 1000  # the response's encoding adds to it
        out = codec.encode_execute_response(
            out_stack,
            result.path,
            result.reason,
            result.detail,
            timings,
            limit=self.limit,
            clock=time.perf_counter_ns,
            variant=result.variant,
            registered=registered,
        )
        record.path, record.reason, record.timings = result.path, result.reason, timings
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s key=%d path=%s decode=%dus queue=%dus run=%dus encode=%dus",
                record.method,
                req.key,
                _pb.service.Path.Name(result.path),
                timings.decode_us,
                timings.queue_us,
                timings.run_us,
                timings.encode_us,
            )
        return out

    def _describe(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        req = _parse(_pb.service.DescribeRequest, request)
        info = self.core.describe(req.key, include_source=req.include_source, tenant=record.owner.tenant)
        return _pb.service.DescribeResponse(kernel=info).SerializeToString()

    def _list(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        _parse(_pb.service.ListRequest, request)
        resident = self.core.resident_info(record.owner)
        kernels = self.core.list(record.owner.tenant)
        return _pb.service.ListResponse(kernels=kernels, resident=resident).SerializeToString()

    def _unregister(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        req = _parse(_pb.service.UnregisterRequest, request)
        removed = self.core.unregister(req.key, record.owner.tenant)
        return _pb.service.UnregisterResponse(removed=removed).SerializeToString()

    # ------------------------------------------------------------------ streamed

    def _streamed(self, method: str, *, fused: bool) -> Callable[..., Any]:
        """ExecuteStream/FallbackStream: the stack arrives as chunks (wire.stream),
        each copied straight into its tensor's destination on a worker while the
        next one is received; the call then runs as Execute/Fallback does, and
        the result goes back as chunks made one at a time from the output
        tensors' memory (the next one made while the current one is sent)."""

        async def call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            arrived = time.perf_counter_ns()
            record = CallRecord(method)
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            loop = asyncio.get_running_loop()
            assembler = Assembler(
                "request",
                sink=self._stream_sink,
                check=lambda specs: self._check_stream(specs),
            )
            sent = 0
            # Whatever happens (an error, a client that went away), a large call
            # hands its freed memory back once it is over.
            context.add_done_callback(lambda _: self._after_stream(loop, assembler, sent))
            error: FuseportError
            try:
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("deadline passed before the call started")
                record.owner = _owner(context, self.tenant_of)
                pending: asyncio.Future[None] | None = None
                async for raw in requests:
                    if pending is not None:
                        await pending
                    pending = loop.run_in_executor(self._pool, assembler.feed, raw)
                if pending is not None:
                    await pending
                stack = assembler.finish()
                header = assembler.header
                decode_ns = time.perf_counter_ns() - arrived
                queued = time.perf_counter_ns()

                def run(values: list[Any]) -> tuple[Any, int]:
                    waited = time.perf_counter_ns() - queued
                    return self.core.execute(
                        header.key, values, fused=fused, wait=header.options.wait_for_compile,
                        deadline=deadline, variants=tuple(header.options.variants), transport="stream",
                        owner=record.owner, keep=header.options.keep_outputs,
                    ), waited  # fmt: skip

                result, queue_ns = await loop.run_in_executor(self._pool, run, stack)
                del stack
                assembler.release()
                encode_start = time.perf_counter_ns()
                writer = Writer(result.stack, self.stream_chunk_bytes)
                first = _pb.service.StackChunk(
                    response=_pb.service.StreamResponseHeader(
                        path=result.path, reason=result.reason, detail=result.detail, variant=result.variant,
                        stack=writer.header_stack, sizes=writer.sizes,
                    )
                ).SerializeToString()  # fmt: skip
                record.path, record.reason = result.path, result.reason
                run_us = result.run_us
                del result
                sent += len(first)
                yield first
                chunks = writer.chunks()
                nxt = loop.run_in_executor(self._pool, next, chunks, None)
                while True:
                    chunk = await nxt
                    if chunk is None:
                        break
                    nxt = loop.run_in_executor(self._pool, next, chunks, None)
                    sent += len(chunk)
                    yield chunk
                timings = _pb.service.Timings(
                    decode_us=decode_ns // 1000,
                    queue_us=queue_ns // 1000,
                    run_us=run_us,
                    encode_us=(time.perf_counter_ns() - encode_start) // 1000,
                )
                record.timings = timings
                yield writer.end(timings)
                self._observe(record, grpc.StatusCode.OK, arrived, assembler.bytes, sent)
                return
            except Exception as e:  # noqa: BLE001 - the last line of defence
                error = _error_of(e, method)
            finally:
                assembler.release()
            self._observe(record, status_for(error), arrived, assembler.bytes, 0)
            await self._abort(context, error)

        call.__name__ = method
        return call

    def _stream_sink(self, nbytes: int) -> Any:
        # Past the keep-for-reuse budget a buffer is not kept anyway: give it
        # pages of its own, returned when it dies whatever the order of events.
        own = self.release_above is not None and nbytes > self.release_above
        return self.core.placement.stream_sink(nbytes, own_pages=own)

    def _check_stream(self, specs: list[TensorSpec]) -> None:
        self.core.check_stream([s.nbytes for s in specs])

    def _after_stream(self, loop: asyncio.AbstractEventLoop, assembler: Assembler, sent: int) -> None:
        assembler.release()
        if self.release_above is not None and assembler.declared + sent > self.release_above:
            loop.call_soon(release_host_memory)
    def _fetch_handles(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        req = _parse(_pb.service.FetchHandlesRequest, request)
        tensors = self.core.fetch_handles(record.owner, list(req.ids), req.free)
        return codec.encode_stack(tensors, field=1, limit=self.limit)

    def _free_handles(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        req = _parse(_pb.service.FreeHandlesRequest, request)
        freed, nbytes = self.core.free_handles(record.owner, list(req.ids), req.all)
        return _pb.service.FreeHandlesResponse(freed=freed, freed_bytes=nbytes).SerializeToString()

    def _open_shared_memory(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        _parse(_pb.service.OpenSharedMemoryRequest, request)
        address, ticket, session = self.shared.open(record.owner)
        return _pb.service.OpenSharedMemoryResponse(
            socket=address,
            ticket=ticket,
            session=session,
            max_bytes=self.shared.max_bytes,
            max_slots=MAX_SLOTS,
            cuda_devices=self.shared.cuda_devices,
            fresh_outputs=True,
        ).SerializeToString()

    def _renew_lease(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        _parse(_pb.service.RenewLeaseRequest, request)
        return _pb.service.RenewLeaseResponse(usage=self.core.renew_lease(record.owner)).SerializeToString()


def _no_tenant(metadata: Any) -> bytes:
    return b""


def _owner(context: grpc.aio.ServicerContext, tenant_of: Callable[[Any], bytes] = _no_tenant) -> Owner:
    """Who the call is: its client id and, with tokens, its token and kernel namespace."""
    metadata = context.invocation_metadata() or ()
    client_id = None
    for key, value in metadata:
        if key == CLIENT_ID_KEY and isinstance(value, str):
            client_id = value
    return owner_of(client_id, presented_token_digest(metadata), tenant_of(metadata))
