"""One gRPC call's life, the same for every servicer: deadline, dispatch, observer, error to status, trailing metadata.

A servicer (service.py: fuseport's own; kserve.py: KServe v2) writes its
methods as plain functions of (request bytes, deadline, arrival time,
CallRecord) that decode, call the core and encode; `Plumbing.unary`,
`Plumbing.streamed` and `Plumbing.streamed_in` turn them into gRPC handlers. Everything a call does
besides translating is here, once: the deadline, the caller (`Owner`, from the
metadata), where the method runs (a worker thread, or the event loop for what
a servicer says is small), the observer that counts the call, the error a
failure answers with (wire/errors.py's one table) and the trailing metadata
that names its class (what the client raises).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from fuseport.server.devices import is_out_of_memory
from fuseport.server.penalties import TOKEN_IDENTITY
from fuseport.server.resident import CLIENT_ID_KEY, NO_OWNER, Owner, owner_of
from fuseport.server.rpc.poll import BusyPoll
from fuseport.server.rpc.share import WorkerShare
from fuseport.server.security import presented_token_digest
from fuseport.wire import _pb
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

__all__ = [
    "CallObserver",
    "CallRecord",
    "Method",
    "Plumbing",
    "Streamed",
    "abort",
    "error_of",
    "identity_of",
    "parse",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# The unary methods that run a kernel on a worker: a deadline or --max-call-seconds
# that passes while it runs is answered at once (Plumbing.off_loop).
RUNS_KERNELS = frozenset({"Execute", "Fallback", "ModelInfer"})


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
    # Who the caller is for the workers' fair share and runaway penalties (identity_of).
    identity: bytes = b""
    # For a call run on a worker: how the core answers it at once when its deadline or
    # --max-call-seconds passes while its kernel runs on (Plumbing.off_loop).
    answer: Callable[[FuseportError], None] | None = None
    # Undoes what the call left on the server for its caller (the handles it kept), should
    # its handler give up before the response is sent (Plumbing.on_worker, off_loop).
    drop: Callable[[], None] | None = None
    # It handed work to a worker thread (the loop does not poll after it: server/rpc/poll.py).
    on_worker: bool = False


class CallObserver:
    """Told of every call the servicer finished, at the point where its status
    is decided (server/metrics.py counts them); does nothing here. Called on the
    event loop: it must be quick and must not raise."""

    def finished(
        self, record: CallRecord, code: grpc.StatusCode, seconds: float, received: int, sent: int
    ) -> None:
        """`seconds` from the handler's start to the response (or error) being
        ready; `received`/`sent` are the message sizes in bytes (0 sent on an error)."""


# A unary method: (request, deadline (time.monotonic) or None, arrived (perf_counter_ns), record) -> response.
Method = Callable[[bytes, "float | None", int, CallRecord], bytes]
# A method's event-loop path for small requests: (loop, request, deadline, record) -> response.
Inline = Callable[[asyncio.AbstractEventLoop, bytes, "float | None", CallRecord], Awaitable[bytes]]


@dataclass
class Streamed:
    """A streamed call under way: its record, deadline, start (perf_counter_ns)
    and gRPC context, and the bytes it has received and sent so far (what the
    observer is told; the body keeps `received` up to date, `sent` is counted here)."""

    record: CallRecord
    deadline: float | None
    arrived: int
    context: grpc.aio.ServicerContext
    received: int = 0
    sent: int = 0


def error_of(e: Exception, name: str) -> FuseportError:
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


def parse(cls: type[T], data: bytes) -> T:
    """A request message from its bytes; InvalidArgument naming the message if they are not one."""
    try:
        return cls.FromString(data)  # type: ignore[attr-defined,no-any-return]
    except Exception as e:  # protobuf's DecodeError and friends
        raise InvalidArgument(f"malformed {cls.__name__}: {e}") from None


async def abort(
    context: grpc.aio.ServicerContext, error: FuseportError, metadata: tuple[tuple[str, str], ...] = ()
) -> None:
    """Ends the call with `error`: its status code from wire/errors.py's table, its
    class in the trailing metadata (the client raises the same class), `metadata` beside it."""
    await context.abort(
        status_for(error),
        str(error),
        trailing_metadata=((ERROR_METADATA_KEY, type(error).__name__), *metadata),
    )


async def _fail(context: grpc.aio.ServicerContext, error: FuseportError) -> None:
    """A servicer's call ends with `error` (logged unless INTERNAL: error_of logged that with its traceback)."""
    if status_for(error) is not grpc.StatusCode.INTERNAL:
        log.info("%s: %s", status_for(error).name, error)
    await abort(context, error)


def _no_tenant(metadata: Any) -> bytes:
    return b""


def owner(context: grpc.aio.ServicerContext, tenant_of: Callable[[Any], bytes] = _no_tenant) -> Owner:
    """Who the call is: its client id and, with tokens, its token and kernel namespace."""
    metadata = context.invocation_metadata() or ()
    client_id = None
    for key, value in metadata:
        if key == CLIENT_ID_KEY and isinstance(value, str):
            client_id = value
    return owner_of(client_id, presented_token_digest(metadata), tenant_of(metadata))


def identity_of(owner: Owner, peer: str, tokens: bool) -> bytes:
    """Who a caller is, for what callers share (the workers, runaway penalties): with
    tokens (`tokens`: the gate checked the call's), its token; without, its host, from
    the transport (`peer`, gRPC's "ipv4:ADDR:PORT"). Never the client id, nor anything
    else a caller chooses: a made-up id must not buy another share. Without tokens,
    every caller of one host (and every caller behind one proxy) is one identity."""
    if tokens and owner.token:
        return TOKEN_IDENTITY + owner.token
    return _host_of(peer)


@functools.lru_cache(maxsize=1024)
def _host_of(peer: str) -> bytes:
    # The port is the connection's, which a caller picks by opening another one.
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        address = address.rpartition(":")[0] or address
    return f"host:{kind}:{address}".encode()


class Plumbing:
    """The worker threads, the observer and the caller's namespace that every
    servicer's calls share; `unary` and `streamed` make their gRPC handlers."""

    def __init__(
        self,
        workers: int,
        release_above: int | None = None,
        per_identity: int | None = None,
        max_waiting: int = 64,
        busy_poll_us: int = 0,
        warm: Callable[[], bool] | None = None,
        warm_every_us: int = 0,
    ) -> None:
        """`per_identity`: the most workers one identity's calls hold at once
        (server/rpc/share.py; None: `workers` minus one, at least 1); `max_waiting`:
        the most of its calls that may wait for one; `busy_poll_us`: how long the loop
        may poll for the next call once the last one ends (server/rpc/poll.py); `warm`
        called every `warm_every_us` meanwhile (the GPU's keep-warm kernel)."""
        # Decoding, running and encoding happen here unless a method runs inline
        # (so large messages never block the event loop).
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="fuseport-worker")
        # Every call takes its worker through here (on_worker, off_loop): a fair share per identity.
        self.share = WorkerShare(
            workers, max(1, workers - 1) if per_identity is None else per_identity, max_waiting
        )
        # Whether the gate checks tokens (set by the app): then a caller is its token.
        self.tokens = False
        # A call that moved more than this many bytes hands freed host memory back
        # once it is over (see wire.hostmem); None: memory is left to the allocator.
        self.release_above = release_above
        self.observer = CallObserver()
        self.poll = BusyPoll(busy_poll_us, warm=warm, warm_every_us=warm_every_us)
        # The kernel namespace of a call, from its metadata (set by the app where
        # tokens are checked: a user token's own; b"" the shared one).
        self.tenant_of: Callable[[Any], bytes] = _no_tenant

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def unary(
        self, fn: Method, method: str, *, inline: Inline | None = None, inline_max_bytes: int = 0
    ) -> grpc.RpcMethodHandler:
        """`fn` as a unary-unary handler of raw bytes, run on a worker thread;
        a request of at most `inline_max_bytes` goes to `inline` instead, on the
        event loop (which may still hand it to a worker: see service.py)."""
        name = fn.__name__
        watched = method in RUNS_KERNELS

        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            arrived = time.perf_counter_ns()
            record = CallRecord(method)
            error: FuseportError
            loop = asyncio.get_running_loop()
            self.poll.begin()
            try:
                deadline = self._admit(record, context)
                if inline is not None and len(request) <= inline_max_bytes:
                    out = await inline(loop, request, deadline, record)
                elif watched:
                    out = await self.off_loop(
                        loop, record, deadline, lambda: fn(request, deadline, arrived, record)
                    )
                else:
                    out = await self.on_worker(
                        record, deadline, functools.partial(fn, request, deadline, arrived, record)
                    )
                self.observe(record, grpc.StatusCode.OK, arrived, len(request), len(out))
                if self.release_above is not None and len(request) + len(out) > self.release_above:
                    # Once the response is sent and its buffers dropped (the next turn
                    # of the loop after the call is done), not while they are held.
                    context.add_done_callback(lambda _: loop.call_soon(release_host_memory))
                return out
            except Exception as e:  # noqa: BLE001 - the last line of defence
                error = error_of(e, name)
            finally:
                self.poll.end(loop, not record.on_worker)
            self.observe(record, status_for(error), arrived, len(request), 0)
            await _fail(context, error)
            raise AssertionError("unreachable")  # context.abort raises

        call.__name__ = name
        return grpc.unary_unary_rpc_method_handler(call)

    def _admit(self, record: CallRecord, context: grpc.aio.ServicerContext) -> float | None:
        """A call's owner and identity, read from its context, into `record`; its
        deadline (time.monotonic; None: none), DeadlineExceeded if it has passed."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("deadline passed before the call started")
        record.owner = owner(context, self.tenant_of)
        record.identity = identity_of(record.owner, context.peer(), self.tokens)
        return None if remaining is None else time.monotonic() + remaining

    def streamed(
        self,
        body: Callable[[AsyncIterator[bytes], Streamed], AsyncIterator[bytes]],
        method: str,
    ) -> grpc.RpcMethodHandler:
        """`body(requests, call)` as a stream-stream handler of raw bytes: it
        yields the response messages and keeps `call.received` up to date (it
        runs on the event loop; it hands its own work to `self.pool`)."""

        async def call(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            state = Streamed(CallRecord(method), None, time.perf_counter_ns(), context)
            arrived = state.arrived
            error: FuseportError
            responses: AsyncIterator[bytes] | None = None
            self.poll.begin()
            try:
                state.deadline = self._admit(state.record, context)
                responses = body(requests, state)
                async for message in responses:
                    state.sent += len(message)
                    yield message
                self.observe(state.record, grpc.StatusCode.OK, arrived, state.received, state.sent)
                return
            except Exception as e:  # noqa: BLE001 - the last line of defence
                error = error_of(e, method)
            finally:
                # A client that went away closes this generator at its yield: the
                # body's own clean-up (its finally) runs now, not when it is collected.
                try:
                    if responses is not None:
                        await responses.aclose()  # type: ignore[attr-defined]
                finally:
                    self.poll.end(asyncio.get_running_loop(), ran_on_loop=False)
            self.observe(state.record, status_for(error), arrived, state.received, 0)
            await _fail(context, error)

        call.__name__ = method
        return grpc.stream_stream_rpc_method_handler(call)

    def streamed_in(
        self,
        body: Callable[[AsyncIterator[bytes], Streamed], Awaitable[bytes]],
        method: str,
    ) -> grpc.RpcMethodHandler:
        """`body(requests, call)` as a stream-unary handler of raw bytes (a request
        that arrives as a stream, one response: RegisterStream): it answers the
        response and keeps `call.received` up to date (it runs on the event loop;
        it hands its own work to `self.pool`)."""

        async def call(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            state = Streamed(CallRecord(method), None, time.perf_counter_ns(), context)
            arrived = state.arrived
            error: FuseportError
            self.poll.begin()
            try:
                state.deadline = self._admit(state.record, context)
                out = await body(requests, state)
                self.observe(state.record, grpc.StatusCode.OK, arrived, state.received, len(out))
                return out
            except Exception as e:  # noqa: BLE001 - the last line of defence
                error = error_of(e, method)
            finally:
                loop = asyncio.get_running_loop()
                self.poll.end(loop, ran_on_loop=False)
                if self.release_above is not None and state.received > self.release_above:
                    # gRPC's buffers of the received chunks, and a failed call's own.
                    context.add_done_callback(lambda _: loop.call_soon(release_host_memory))
            self.observe(state.record, status_for(error), arrived, state.received, 0)
            await _fail(context, error)
            raise AssertionError("unreachable")  # context.abort raises

        call.__name__ = method
        return grpc.stream_unary_rpc_method_handler(call)

    async def _started(
        self, loop: asyncio.AbstractEventLoop, record: CallRecord, deadline: float | None, fn: Callable[[], T]
    ) -> asyncio.Future[T]:
        """`fn` started on a worker once the caller's share gives it a place, which
        stays the caller's until `fn` returns."""
        identity = record.identity
        record.on_worker = True
        await self.share.acquire(identity, deadline)
        try:
            work = loop.run_in_executor(self.pool, fn)
        except BaseException:
            self.share.release(identity)  # the pool is shut down: nothing runs
            raise
        work.add_done_callback(lambda _: self.share.release(identity))
        return work

    async def on_worker(self, record: CallRecord, deadline: float | None, fn: Callable[[], T]) -> T:
        """What `fn` returns, run on a worker once the caller's fair share gives it one
        (server/rpc/share.py: DeadlineExceeded if `deadline` passes first, ResourceExhausted
        past --max-waiting-calls-per-identity): whatever a call does on a worker (decode,
        register, describe, a stream's chunk) goes through here, so that one caller never
        holds every worker, whatever it calls. The place is the caller's until `fn` returns,
        even if the handler gave up on it (cancelled by gRPC): it still holds the thread."""
        work = await self._started(asyncio.get_running_loop(), record, deadline, fn)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(functools.partial(_abandoned, record))
            raise

    async def off_loop(
        self, loop: asyncio.AbstractEventLoop, record: CallRecord, deadline: float | None, fn: Callable[[], T]
    ) -> T:
        """What `fn` returns, run on a worker once the caller's fair share gives it one
        (server/rpc/share.py: DeadlineExceeded if `deadline` passes first); or, should
        the core answer the call first (`record.answer`: its deadline or
        --max-call-seconds passed while its kernel runs on, see server/watchdog.py),
        that answer, raised at once: the loop does not wait for the kernel, whose
        results the core drops when it ends. The worker counts as the caller's until
        `fn` returns, answered or not: a kernel that runs on still holds its thread."""
        answered: asyncio.Future[T] = loop.create_future()

        def answer(error: FuseportError) -> None:  # from the watchdog's thread
            loop.call_soon_threadsafe(_settle, answered, error)

        record.answer = answer
        work = await self._started(loop, record, deadline, fn)
        try:
            await asyncio.wait((work, answered), return_when=asyncio.FIRST_COMPLETED)
        finally:
            answered.cancel()  # an answer on its way now finds it done
            if not work.done():
                # The handler goes on without it (answered, or cancelled by gRPC): what the
                # worker ends with is retrieved, and dropped, whenever that is.
                work.add_done_callback(functools.partial(_abandoned, record))
        if work.done():
            return work.result()
        error = answered.exception() if not answered.cancelled() else None
        raise error or DeadlineExceeded("the call was answered at its limit")

    def observe(
        self, record: CallRecord, code: grpc.StatusCode, arrived: int, received: int, sent: int
    ) -> None:
        try:
            self.observer.finished(record, code, (time.perf_counter_ns() - arrived) / 1e9, received, sent)
        except Exception:  # noqa: BLE001 - counting must never fail a call
            log.exception("call observer failed")

    def refused(self, method: str, code: grpc.StatusCode, arrived: int, received: int) -> None:
        """Counts a call refused before its handler ran (the app's gate: no token,
        a role that may not call it, a server draining)."""
        self.observe(CallRecord(method), code, arrived, received, 0)


def _settle(future: asyncio.Future[Any], error: FuseportError) -> None:
    if not future.done():
        future.set_exception(error)


def _abandoned(record: CallRecord, future: asyncio.Future[Any]) -> None:
    """A worker's call whose handler gave up on it ended: what it ends with is retrieved
    and dropped, and what it kept for a caller that will never hear of it goes too."""
    if future.cancelled() or future.exception() is not None or record.drop is None:
        return
    try:
        record.drop()
    except Exception:  # noqa: BLE001 - a done callback must not raise
        log.exception("dropping what an abandoned call kept failed")
