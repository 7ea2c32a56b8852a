"""fuseport's own gRPC servicer (fuseport.v1.KernelService): decode the request, call the core, encode the response.

The call's plumbing (deadline, worker threads, errors, metrics) is plumbing.py's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from fuseport.server.calls import Call, Result
from fuseport.server.core import Core
from fuseport.server.rpc.plumbing import CallRecord, Plumbing, Streamed, parse
from fuseport.server.shm import MAX_SLOTS, SharedCall
from fuseport.server.streams import Hold
from fuseport.wire import _pb, codec
from fuseport.wire.errors import DeadlineExceeded
from fuseport.wire.hostmem import release_host_memory
from fuseport.wire.stream import CHUNK_BYTES, Assembler, BufferSink, TensorSpec, Writer

__all__ = ["SERVICE_NAME", "KernelService"]

log = logging.getLogger(__name__)

SERVICE_NAME = _pb.service.DESCRIPTOR.services_by_name["KernelService"].full_name

# Requests at most this large are decoded on the event loop thread, and run
# there too when their planned work is light (KernelService._run_small).
_INLINE_MAX_BYTES = 64 << 10


class KernelService:
    """Every method takes and returns raw bytes: decoding and encoding run on a
    worker thread (so large messages never block the event loop) and are timed;
    small Execute/Fallback calls to quick kernels run on the event loop itself."""

    def __init__(
        self,
        core: Core,
        plumbing: Plumbing,
        max_message_bytes: int,
        stream_chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.core = core
        self.plumbing = plumbing
        self.stream_chunk_bytes = stream_chunk_bytes
        self.limit = max_message_bytes
        self._pool = plumbing.pool

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
        # Execute and Fallback: a small request is decoded on the event loop (_run_small).
        inline = {
            "Execute": functools.partial(self._run_small, True),
            "Fallback": functools.partial(self._run_small, False),
        }
        handlers = {
            name: self.plumbing.unary(fn, name, inline=inline.get(name), inline_max_bytes=_INLINE_MAX_BYTES)
            for name, fn in methods.items()
        }
        for name, fused in (("ExecuteStream", True), ("FallbackStream", False)):
            handlers[name] = self.plumbing.streamed(functools.partial(self._streamed, fused), name)
        handlers["RegisterStream"] = self.plumbing.streamed_in(self._register_stream, "RegisterStream")
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    # ------------------------------------------------------------------ methods

    def _register(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        # The constants' data stay in the request bytes (views): no copy of them (issue 20).
        req, datas = codec.decode_register_request(request)
        variant_of = req.variant_of if req.HasField("variant_of") else None
        alias = req.alias if req.HasField("alias") else None
        batching = req.batching if req.HasField("batching") else None
        key, created, variant = self.core.register(
            req.graph, variant_of, alias, batching, tenant=record.owner.tenant, datas=datas
        )
        return _pb.service.RegisterResponse(key=key, created=created, variant=variant).SerializeToString()

    async def _register_stream(self, requests: AsyncIterator[bytes], call: Streamed) -> bytes:
        """RegisterStream: the graph's large constants arrive as chunks (wire.stream),
        each copied on a worker, while the next is received, straight into its
        constant's own buffer (BufferSink), which the registered graph then keeps:
        the server holds the graph and the chunk in flight, never the graph as one
        message (issue 20: a unary Register's receive alone is 3 times the graph).
        Then Register's own path: the same key, checks, store and answer.

        As a streamed stack is (_streamed): a client that stops sending is ended after
        --stream-idle-seconds, and the constants' bytes its header declares are held in
        server/streams.py's budget (--max-stream-buffer-bytes, and per token), taken
        before anything is allocated, until Register answers or the stream ends: stalled
        RegisterStreams cannot take the memory the others need."""
        record, deadline = call.record, call.deadline
        hold = self.core.stream_buffers.hold(record.owner)

        def check(specs: list[TensorSpec]) -> None:
            sizes = [s.nbytes for s in specs]
            self.core.check_graph_stream(sizes)
            hold.take(sum(sizes))

        assembler = Assembler("register", sink=BufferSink, check=check)
        try:
            await self._assemble(requests, assembler, call)
            datas = assembler.finish()
            header = assembler.header
            return await self.plumbing.on_worker(
                record, deadline, functools.partial(self._register_assembled, header.request, datas, record)
            )
        finally:
            assembler.release()
            hold.release()

    async def _assemble(self, requests: AsyncIterator[bytes], assembler: Assembler, call: Streamed) -> None:
        """Feeds every message of a request stream to `assembler`, each on a worker
        (the caller's share) while the next is received, until the stream ends (or goes
        idle: _next_message); `call.received` counts them."""
        pending: asyncio.Future[None] | None = None
        try:
            messages = aiter(requests)
            while (raw := await self._next_message(messages)) is not None:
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(
                    self.plumbing.on_worker(call.record, call.deadline, functools.partial(assembler.feed, raw))
                )
                call.received += len(raw)
            if pending is not None:
                await pending
        finally:
            _drop(pending)  # its worker, if it has one, runs on; the caller releases what it fills

    def _register_assembled(
        self, req: _pb.service.RegisterRequest, streamed: list[memoryview | None], record: CallRecord
    ) -> bytes:
        """Register of a streamed graph: its constants' data are the assembled buffers
        (and, for a constant that took no chunk, the header's own data)."""
        graph = req.graph
        datas: list[codec.Buffer] | None = [
            c.data if d is None else d for c, d in zip(graph.constants, streamed)
        ]
        if codec.has_unknown_fields(graph):
            # A graph's key covers fields this server does not know (server/intake.py): it goes
            # whole, the way a unary Register takes such a graph, its data put back (copied).
            for c, d in zip(graph.constants, streamed):
                if d is not None:
                    c.data = bytes(d)
            datas = None
        del streamed
        variant_of = req.variant_of if req.HasField("variant_of") else None
        alias = req.alias if req.HasField("alias") else None
        batching = req.batching if req.HasField("batching") else None
        key, created, variant = self.core.register(
            graph, variant_of, alias, batching, tenant=record.owner.tenant, datas=datas
        )
        return _pb.service.RegisterResponse(key=key, created=created, variant=variant).SerializeToString()

    def _execute(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        return self._run(request, deadline, arrived, record, fused=True)

    def _fallback(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        return self._run(request, deadline, arrived, record, fused=False)

    async def _run_small(
        self,
        fused: bool,
        loop: asyncio.AbstractEventLoop,
        request: bytes,
        deadline: float | None,
        record: CallRecord,
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
        if req.free_handles:
            self.core.release_handles(record.owner, req.free_handles)
        call: Call | None = None
        if not req.wait_for_compile and not req.graphs and not req.shm_session:
            # Timed as run_us.
            call = self.core.prepare(
                req.key, req.stack, fused=fused, variants=req.variants, owner=record.owner,
                keep=req.keep_outputs, planned_only=True, who=record.identity,
            )  # fmt: skip
            if call is not None and self.core.light(call):
                batcher = self.core.batcher  # None unless --batch-window-us: then one check, nothing more
                if (
                    batcher is not None
                    and not req.no_batching
                    and (bkey := batcher.batch_key(call)) is not None
                ):
                    result = await batcher.submit(bkey, call, deadline, self._pool)
                    return self._respond(req, result, decode_ns, 0, record)
                return self._respond(req, self.core.run(call, deadline=deadline), decode_ns, 0, record)
        queued = time.perf_counter_ns()
        return await self.plumbing.off_loop(
            loop,
            record,
            deadline,
            lambda: self._finish(
                req, decode_ns, time.perf_counter_ns() - queued, deadline, record, fused, call
            ),
        )

    def _run(
        self, request: bytes, deadline: float | None, arrived: int, record: CallRecord, *, fused: bool
    ) -> bytes:
        started = time.perf_counter_ns()
        req = codec.decode_execute_request(request)
        del request  # the decoded tensors keep what they need of it
        if req.free_handles:
            self.core.release_handles(record.owner, req.free_handles)
        return self._finish(req, time.perf_counter_ns() - started, started - arrived, deadline, record, fused)

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
        """On a worker: registers what the call carries, then runs it (as the
        loop prepared it, or through Core.execute), responds."""
        # Registered first, in this same call: a separate Register could reach
        # another replica than this call did (see ExecuteRequest.graphs).
        registered = self.core.adopt(req.key, req.graphs, req.alias, record.owner.tenant) if req.graphs else 0
        if call is not None:
            result = self.core.run(call, wait=req.wait_for_compile, deadline=deadline, answer=record.answer)
            return self._respond(req, result, decode_ns, queue_ns, record, registered)
        shared = (
            SharedCall(req.shm_session, req.shm_slot, req.shm_fresh_output, req.shm_cuda_outputs)
            if req.shm_session
            else None
        )
        result = self.core.execute(
            req.key, req.stack, fused=fused, wait=req.wait_for_compile, deadline=deadline, variants=req.variants,
            owner=record.owner, keep=req.keep_outputs, shared=shared, answer=record.answer, who=record.identity,
        )  # fmt: skip
        if shared is not None:
            decode_ns += shared.read_ns  # reading the client's regions is this call's decoding
        return self._respond(req, result, decode_ns, queue_ns, record, registered, shared)

    def _respond(
        self,
        req: codec.ExecuteRequest,
        result: Result,
        decode_ns: int,
        queue_ns: int,
        record: CallRecord,
        registered: int = 0,
        shared: SharedCall | None = None,
    ) -> bytes:
        timings = _pb.service.Timings(
            decode_us=decode_ns // 1000,
            queue_us=queue_ns // 1000,
            run_us=result.run_us,
        )
        if shared is not None and shared.slot:
            timings.encode_us = shared.place_ns // 1000  # the response's encoding adds to it
        try:
            out = codec.encode_execute_response(
                result.stack,
                result.path,
                result.reason,
                result.detail,
                timings,
                limit=self.limit,
                clock=time.perf_counter_ns,
                variant=result.variant,
                registered=registered,
            )
        except BaseException:
            self.core.release_handles(record.owner, result.kept)  # a call that fails keeps nothing
            raise
        if result.kept:
            # Should the caller give up before this response reaches it, what it kept goes too.
            record.drop = functools.partial(self.core.release_handles, record.owner, result.kept)
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
        req = parse(_pb.service.DescribeRequest, request)
        info = self.core.describe(req.key, include_source=req.include_source, tenant=record.owner.tenant)
        return _pb.service.DescribeResponse(kernel=info).SerializeToString()

    def _list(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        parse(_pb.service.ListRequest, request)
        resident = self.core.resident_info(record.owner)
        kernels = self.core.list(record.owner.tenant)
        return _pb.service.ListResponse(kernels=kernels, resident=resident).SerializeToString()

    def _unregister(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        req = parse(_pb.service.UnregisterRequest, request)
        removed = self.core.unregister(req.key, record.owner.tenant)
        return _pb.service.UnregisterResponse(removed=removed).SerializeToString()

    # ------------------------------------------------------------------ streamed

    async def _streamed(
        self, fused: bool, requests: AsyncIterator[bytes], call: Streamed
    ) -> AsyncIterator[bytes]:
        """ExecuteStream/FallbackStream: the stack arrives as chunks (wire.stream),
        each copied straight into its tensor's destination on a worker while the
        next one is received; the call then runs as Execute/Fallback does, and
        the result goes back as chunks made one at a time from the output
        tensors' memory (the next one made while the current one is sent)."""
        record, deadline = call.record, call.deadline
        loop = asyncio.get_running_loop()
        # Its share of what streams still arriving may hold: taken by the header's
        # check, given back once the complete stack has its worker or the stream ends
        # (a stack waiting for a worker is memory held too: the budget counts it).
        hold = self.core.stream_buffers.hold(record.owner)
        assembler = Assembler(
            "request",
            sink=self._stream_sink,
            check=lambda specs: self.core.check_stream([s.nbytes for s in specs], hold),
        )
        # Whatever happens (an error, a client that went away), a large call
        # hands its freed memory back once it is over.
        call.context.add_done_callback(lambda _: self._after_stream(loop, assembler, call, hold))
        nxt: asyncio.Future[bytes | None] | None = None
        try:
            await self._assemble(requests, assembler, call)
            stack = assembler.finish()
            header = assembler.header
            call.received = assembler.bytes
            decode_ns = time.perf_counter_ns() - call.arrived
            queued = time.perf_counter_ns()

            def run(values: list[Any]) -> tuple[Any, int]:
                waited = time.perf_counter_ns() - queued
                hold.release()  # it has its worker: the call's now, bounded as every call is
                return self.core.execute(
                    header.key, values, fused=fused, wait=header.options.wait_for_compile,
                    deadline=deadline, variants=tuple(header.options.variants), transport="stream",
                    owner=record.owner, keep=header.options.keep_outputs, answer=record.answer,
                    who=record.identity,
                ), waited  # fmt: skip

            result, queue_ns = await self.plumbing.off_loop(
                loop, record, deadline, functools.partial(run, stack)
            )
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
            yield first
            chunks = writer.chunks()

            def encode() -> asyncio.Future[bytes | None]:
                return asyncio.ensure_future(
                    self.plumbing.on_worker(record, deadline, functools.partial(next, chunks, None))
                )

            nxt = encode()
            while True:
                chunk = await nxt
                if chunk is None:
                    break
                nxt = encode()
                yield chunk
            timings = _pb.service.Timings(
                decode_us=decode_ns // 1000,
                queue_us=queue_ns // 1000,
                run_us=run_us,
                encode_us=(time.perf_counter_ns() - encode_start) // 1000,
            )
            record.timings = timings
            yield writer.end(timings)
        finally:
            _drop(nxt)  # its worker, if it has one, runs on
            call.received = assembler.bytes
            assembler.release()
            hold.release()

    async def _next_message(self, messages: AsyncIterator[bytes]) -> bytes | None:
        """The stream's next message, None at its end; DeadlineExceeded naming
        --stream-idle-seconds when the client sends none for that long. A client
        that stops mid-stack would otherwise hold its stack's memory for as long as
        it keeps the call open (without a deadline: for ever). DEADLINE_EXCEEDED, not
        CANCELLED: a time limit passed, and the status table has no CANCELLED."""
        idle = self.core.settings.stream_idle_seconds
        try:
            async with asyncio.timeout(idle):  # not wait_for: on 3.11 it may swallow a cancel
                return await anext(messages)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            self.core.stream_buffers.idle_ends += 1  # on the event loop only
            raise DeadlineExceeded(
                f"the client sent nothing for {idle:g} s before its stream was complete "
                "(--stream-idle-seconds); the call is ended and what it sent is freed"
            ) from None

    def _stream_sink(self, nbytes: int) -> Any:
        # Past the keep-for-reuse budget a buffer is not kept anyway: give it
        # pages of its own, returned when it dies whatever the order of events.
        release_above = self.plumbing.release_above
        own = release_above is not None and nbytes > release_above
        return self.core.placement.stream_sink(nbytes, own_pages=own)

    def _after_stream(
        self, loop: asyncio.AbstractEventLoop, assembler: Assembler, call: Streamed, hold: Hold
    ) -> None:
        assembler.release()
        hold.release()
        release_above = self.plumbing.release_above
        if release_above is not None and assembler.declared + call.sent > release_above:
            loop.call_soon(release_host_memory)

    def _fetch_handles(
        self, request: bytes, deadline: float | None, arrived: int, record: CallRecord
    ) -> bytes:
        req = parse(_pb.service.FetchHandlesRequest, request)
        tensors = self.core.fetch_handles(record.owner, list(req.ids), req.free)
        return codec.encode_stack(tensors, field=1, limit=self.limit)

    def _free_handles(
        self, request: bytes, deadline: float | None, arrived: int, record: CallRecord
    ) -> bytes:
        req = parse(_pb.service.FreeHandlesRequest, request)
        freed, nbytes = self.core.free_handles(record.owner, list(req.ids), req.all)
        return _pb.service.FreeHandlesResponse(freed=freed, freed_bytes=nbytes).SerializeToString()

    def _open_shared_memory(
        self, request: bytes, deadline: float | None, arrived: int, record: CallRecord
    ) -> bytes:
        parse(_pb.service.OpenSharedMemoryRequest, request)
        shared = self.core.shared
        address, ticket, session = shared.open(record.owner)
        return _pb.service.OpenSharedMemoryResponse(
            socket=address,
            ticket=ticket,
            session=session,
            max_bytes=shared.max_bytes,
            max_slots=MAX_SLOTS,
            fresh_outputs=True,
            cuda_devices=shared.cuda_devices,
            cuda_outputs=shared.cuda_outputs,
        ).SerializeToString()

    def _renew_lease(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        parse(_pb.service.RenewLeaseRequest, request)
        return _pb.service.RenewLeaseResponse(usage=self.core.renew_lease(record.owner)).SerializeToString()


def _drop(future: asyncio.Future[Any] | None) -> None:
    """A stream's chunk on a worker that the stream no longer waits for (it ended):
    cancelled if still to come, its error retrieved if it had one (asyncio logs none)."""
    if future is None:
        return
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()
