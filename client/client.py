"""The Python client: Client (blocking) and AsyncClient (asyncio), one behaviour."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2

from fuseport.client.connections import HANDLE_METHODS, SERVICE, Connection, Connections, check_connections
from fuseport.client.info import KernelInfo
from fuseport.client.resident import CLIENT_ID_KEY, Leases, RemoteTensor, Request
from fuseport.client.shm import SharedSession
from fuseport.wire import _pb, codec, dtypes, shm
from fuseport.wire.capture import capture
from fuseport.wire.errors import (
    ERROR_METADATA_KEY,
    CudaIpcUnavailable,
    DeadlineExceeded,
    FuseportError,
    InternalError,
    InvalidArgument,
    InvalidStack,
    KernelNotFound,
    NoMatchingVariant,
    ResourceExhausted,
    ResultTooLarge,
    SharedMemoryUnavailable,
    Unavailable,
    error_from_status,
)
from fuseport.wire.hostmem import PagePool
from fuseport.wire.keys import check_alias, key_for
from fuseport.wire.security import (
    bearer_metadata,
    channel_credentials,
    is_loopback,
    open_channel,
    token_from_env,
)
from fuseport.wire.stream import CHUNK_BYTES, Assembler, HostSink, Writer
from fuseport.wire.targets import PROCESS_METADATA_KEY, parse_target

__all__ = ["AsyncClient", "Client", "ExecuteResult", "KernelInfo", "RemoteTensor", "Timings"]

log = logging.getLogger(__name__)

T = TypeVar("T")
# A call's stack: tensors, ints, floats, bools, strings, None, lists of those,
# and RemoteTensors of the same client.
Stack: TypeAlias = Sequence[Any]

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
_RETRY_BUFFER_BYTES = 16 << 20
# Stacks with at least this many tensor bytes go through ExecuteStream/FallbackStream.
# Measured on the 2-core CPU machine (docs/perf.md, "Streamed stacks"): below
# it one unary message is as fast or faster; above it the stream wins, and grows
# its lead with size (unary pays for the whole message at once, twice).
DEFAULT_STREAM_ABOVE = 16 << 20
# Register sends a graph of at least `stream_above` bytes (or one over a message)
# through RegisterStream: a unary Register costs the server 3 times the graph at
# its peak (gRPC's receive), the stream the graph and a chunk (docs/perf.md,
# "Register's peak memory"). Its constants of at least this many bytes travel as
# chunks; smaller ones stay in the header, where a chunk of their own would cost
# a message each for nothing.
_STREAM_CONSTANT_BYTES = 64 << 10
# Stacks with at least this many tensor bytes go through shared memory when the
# server is on this host (docs/perf.md, "Shared memory"): on the CPU machine shm
# took 0.48x unary's time at 256 KiB and 1.34x at 64 KiB (the copies and the
# slot cost more than the bytes do in one small message).
DEFAULT_SHARED_ABOVE = 256 << 10
# A streamed result's bytes land in pages reused from an earlier result the caller
# dropped (one process-wide pool): a fresh 256 MiB tensor page-faults its way in, a
# fifth of the call on the CPU machine (wire.hostmem.PagePool).
_RESULT_PAGES = PagePool()
_result_sink = functools.partial(HostSink, pool=_RESULT_PAGES)
# A client that found no shared memory (not on the server's host, or the server
# has it off) asks again after this long: the server may have been restarted.
_SHARED_RETRY_SECONDS = 60.0
# Calls in a row that carry a kernel's graphs without filling a replica before
# the client stops sending them: round robin reaches every replica well within
# this many calls, unless there are more replicas than this (a later NOT_FOUND
# starts it again).
_HEAL_PATIENCE = 32
# How often a thread waiting for a call on an AsyncClient's event loop looks
# whether that loop has closed (then the call will never run).
_LOOP_POLL_SECONDS = 0.5

# gRPC retries a call that failed with UNAVAILABLE: the server refused it
# unstarted (draining) or the connection broke (a replica died), and under
# round_robin the next attempt goes to another ready replica. Each method is
# safe to run twice:
# * Register: keys are content addresses; the same graph gets the same key and
#   is stored once (a second Register answers created=false).
# * Execute, Fallback: a kernel is a pure function of its inputs and changes
#   nothing on the server but caches and counters (random ops draw anew, and the
#   caller sees one result). The graphs a retry after NOT_FOUND carries are
#   registered as Register would: idempotent too.
# * Describe, List: read only.
# * Unregister: removing a key twice leaves it removed (the second answers
#   removed=false). It reaches one replica: see docs/guides/replicas.md.
# round_robin spreads calls over every address the target resolves to (one
# server: the same as gRPC's default), skipping replicas that are down.
_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": SERVICE}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            },
            {
                # Opening a session twice costs a ticket the server drops unused. A forked
                # child's first call on its parent's channel has failed UNKNOWN "Stream
                # removed (Closed on fork)" (tests/test_shm_hostile.py, once under a busy
                # suite): its session is then had on the second try, not given up on.
                "name": [{"service": SERVICE, "method": "OpenSharedMemory"}],
                "retryPolicy": {  # the service's own, UNKNOWN added (method configs do not merge)
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "UNKNOWN"],
                },
            },
        ],
    }
)


@dataclass(frozen=True)
class Timings:
    """Where the time of one call went, in microseconds.

    The first four are the server's, from its response: `decode_us` (the request into
    tensors), `queue_us` (waiting for a worker thread), `run_us` (placing the inputs, running
    the kernel, fetching the outputs; with `wait=True` it includes waiting for the compile)
    and `encode_us` (the result into the response).

    `total_us` is the client's: the whole `execute`/`fallback` call as the caller waited for
    it, from the client's first step (sizing the stack, opening a shared-memory session,
    encoding the request) to the decoded response (through shared memory: before the
    result tensors are made over its region), retries and the re-capture of a new variant
    included. What it holds besides the server's four stages is the client's own
    encode and decode, gRPC on both sides (HTTP/2 framing, the channel's threads, the
    handler's dispatch onto the server's event loop) and the network; for a small call
    that is most of it (the hot-path notes in docs/perf.md measure where it goes)."""

    decode_us: int
    queue_us: int
    run_us: int
    encode_us: int
    total_us: int


@dataclass(frozen=True)
class ExecuteResult:
    stack: list[Any]
    path: str  # "fused" or "fallback"
    reason: str  # "" when fused, else e.g. "compiling", "compile_failed", "requested"
    detail: str
    timings: Timings
    variant: int  # content key of the variant that ran (the kernel's key for its own graph)
    # How the stacks travelled: "unary" (one Execute/Fallback message each way),
    # "stream" (ExecuteStream/FallbackStream chunks, for large stacks), "shm"
    # (shared memory, with a server on this host) or "cuda_ipc" (shared memory,
    # and CUDA inputs or results passed device to device, on the server's GPU host).
    transport: str = "unary"
    # The serving process that answered, "INDEX PID", under `fuseport serve
    # --processes N` (its "fuseport-process" trailing metadata); "" for a server
    # of one process.
    process: str = ""


@dataclass(frozen=True)
class _Shared:
    """A call going through shared memory: its stack as sent (tensors replaced
    by Shared values in the slot's region), the session and the output slot."""

    stack: list[Any]
    session: str
    slot: int
    fresh: bool = False  # ExecuteOptions.shared_memory_fresh_output (see SharedSession.fresh_output)
    cuda: bool = False  # ExecuteOptions.shared_memory_cuda_outputs (see SharedSession.device_results)


class _AsyncSlot:
    """A slot of a SharedSession held by one of an AsyncClient's calls, from
    its first copy to its last, and given back on every path.

    It is taken on the loop: the client's semaphore of the session's slots
    admits at most as many calls as there are slots, so session.slot() finds
    one free at once (the session is the client's, and its calls run on its
    loop). Its blocking work (`run`) goes to a thread. A call cancelled while
    such a thread still copies into or out of the slot's regions gives the
    slot back when that thread is done, not before: another call must not
    write there meanwhile."""

    def __init__(self, session: SharedSession, gate: asyncio.Semaphore) -> None:
        self._session = session
        self._gate = gate
        self._busy: asyncio.Future[Any] | None = None
        self.slot = 0

    async def __aenter__(self) -> _AsyncSlot:
        await self._gate.acquire()
        try:
            self._held = self._session.slot()
            self.slot = self._held.__enter__()
        except BaseException:
            self._gate.release()
            raise
        return self

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        self._busy = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
        # Shielded: a cancelled call stops waiting, the copy goes on to its end (see __aexit__).
        return await asyncio.shield(self._busy)

    async def __aexit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: Any) -> None:
        busy = self._busy
        if busy is None or busy.done():
            self._give_back(kind, e, tb)
        else:
            busy.add_done_callback(lambda f: (f.cancelled() or f.exception(), self._give_back(kind, e, tb)))

    def _give_back(self, kind: type[BaseException] | None, e: BaseException | None, tb: Any) -> None:
        try:
            self._held.__exit__(kind, e, tb)  # the slot (it re-raises nothing: `e` is on its way already)
        finally:
            self._gate.release()


def _close_opened(opening: asyncio.Future[SharedSession | None]) -> None:
    if not opening.cancelled() and opening.exception() is None and (session := opening.result()) is not None:
        session.close()


@dataclass
class _Known:
    """A kernel this client registered: the function it was captured from (None
    for a graph registered as such) and every graph it registered under the key.

    `heal` counts replicas that answered NOT_FOUND (or lacked a variant) and
    that no call has filled since: while it is above 0, calls for the key carry
    its graphs, since which replica a call reaches is the balancer's choice. A
    response saying it registered them fills one; `_HEAL_PATIENCE` calls in a
    row that filled none end it (that replica is gone, or was filled by another)."""

    fn: Any
    graphs: dict[int, _pb.graph.Graph] = field(default_factory=dict)  # variant key -> graph, in order
    alias: str | None = None  # given at Register: a server that lost the kernel gets it again
    heal: int = 0
    barren: int = 0  # calls in a row that carried graphs and filled no replica
    # ExecuteRequest heads (key, options, the variants held) by (wait, keep, no_batching,
    # len(graphs)): made once, not at every call. Graphs are only ever added, so the
    # count names the set of variants; a head made from fewer is never used again.
    heads: dict[tuple[bool, bool, bool, int], bytes] = field(default_factory=dict)

    @property
    def arity(self) -> int:
        return len(next(iter(self.graphs.values())).inputs)

    def hold(self, variant: int, graph: _pb.graph.Graph) -> None:
        """Holds `graph` as a variant of the kernel (in its place, where it was held already)."""
        self.graphs[variant] = graph
        self.heads.clear()  # heads of fewer variants are never used again (see `heads`)

    def head(self, key: int, wait: bool, keep: bool, no_batching: bool) -> bytes:
        """The head of a call with these options that runs only the variants held."""
        options = (wait, keep, no_batching, len(self.graphs))
        head = self.heads.get(options)
        if head is None:
            head = self.heads[options] = codec.execute_request_head(
                key,
                wait_for_compile=wait,
                keep_outputs=keep,
                no_batching=no_batching,
                variants=list(self.graphs),
            )
        return head

    def carried(self, registered: int) -> None:
        """A call that carried the graphs succeeded, registering `registered` of them."""
        if registered:
            self.heal, self.barren = max(0, self.heal - 1), 0
            return
        self.barren += 1
        if self.barren >= _HEAL_PATIENCE:
            self.heal = self.barren = 0


@dataclass
class _Recovery:
    """A failed call's second attempt: `request` carries the graphs (then
    `adopted` records them once it succeeded), or, when that is None, the
    `registers` go first and the call is sent again as it was."""

    request: bytes | None
    adopted: Callable[[], None]
    registers: list[tuple[_Call | _RegisterStream, Callable[[bytes], int]]]


# The execute flow, written once (_Base._run_flow) as a generator that yields
# the steps it needs done and is sent their results (or has their errors thrown
# in): httpx's Auth.auth_flow shape. Client drives it in place, AsyncClient
# awaits each step; the decisions, the recovery above all, live in one place.


class _Job:
    """An Execute or Fallback call as its caller asked for it, and what its stack
    holds: its tensor bytes (what decides the transport) and whether it names
    RemoteTensors (which only a unary call carries), found in one walk."""

    __slots__ = ("key", "keep", "method", "remote", "results_on", "size", "stack", "started", "wait")

    def __init__(
        self, method: str, key: int, stack: Stack, wait: bool, keep: bool, results_on: torch.device | None = None
    ) -> None:
        self.started = time.perf_counter_ns()  # for Timings.total_us
        self.method = method  # "Execute" or "Fallback"
        self.key = key
        self.stack = stack
        self.wait = wait
        self.keep = keep
        self.results_on = results_on  # a CUDA device of this process, or None: host memory
        self.size, self.remote = _survey(stack)


def _results_device(results_on: str | torch.device | None, keep: bool) -> torch.device | None:
    """`results_on` as a CUDA device with its index, or None for host memory; ValueError for anything else."""
    if results_on is None:
        return None
    try:
        device = torch.device(results_on)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"results_on={results_on!r} is not a device: {e}") from None
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise ValueError(f"results_on={results_on!r}: results go to host memory (None, 'cpu') or a CUDA device")
    if keep:
        raise ValueError("results_on= with keep=True: kept results stay on the server, as RemoteTensors")
    if not torch.cuda.is_available():
        raise ValueError(f"results_on={results_on!r}: this process sees no CUDA device")
    index = torch.cuda.current_device() if device.index is None else device.index
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"results_on={results_on!r}: this process sees {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)


def _shape_of(size: tuple[Any, ...]) -> torch.Size:
    """torch.empty's shape arguments (dims, or one sequence of them) as a Size; ValueError for a negative dim."""
    shape = torch.Size(size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size)
    if any(d < 0 for d in shape):
        raise ValueError(f"empty(): negative dimension in {list(shape)}")
    return shape


def _empty(shape: torch.Size, dtype: torch.dtype, session: SharedSession | None) -> torch.Tensor:
    """Client.empty's tensor: in `session`'s shared memory where it takes one (blocks: it
    waits for the server's OK), else an ordinary one."""
    if dtypes.code_for(dtype) is None:
        raise InvalidStack(f"empty(): dtype {dtype} cannot travel on the wire")
    if session is not None and not session.closed:
        try:
            t = session.empty(shape, dtype)
        except (SharedMemoryUnavailable, OSError) as e:  # OSError: no memory for the region here
            log.info("no tensor in shared memory (%s): an ordinary one", e)
        else:
            if t is not None:
                return t
    return torch.empty(shape, dtype=dtype)


def _on_device(stack: list[Any]) -> bool:
    """Whether a shared-memory result names the slot's device output region."""
    found: list[bool] = []
    shm.replace(stack, lambda v, _where: found.append(bool(v.cuda_device)), codec.Shared)
    return any(found)


def _moved(result: ExecuteResult, device: torch.device | None) -> ExecuteResult:
    """The result with every tensor on `device` (None: as it came)."""
    if device is None:
        return result
    moved = shm.replace(result.stack, lambda t, _where: t if t.device == device else t.to(device), torch.Tensor)
    return dataclasses.replace(result, stack=moved)


def _survey(stack: Stack) -> tuple[int, bool]:
    """A stack's tensor bytes (lists included) and whether it holds RemoteTensors (at any depth)."""
    size, remote = 0, False
    for v in stack:
        if isinstance(v, torch.Tensor):
            size += v.numel() * v.element_size()
        elif isinstance(v, RemoteTensor):
            remote = True
        elif isinstance(v, (list, tuple)):
            inner, held = _survey(v)
            size, remote = size + inner, remote or held
    return size, remote


@dataclass(frozen=True)
class _Call:
    """A unary call of `method`; the driver answers with the response's bytes."""

    method: str
    request: bytes


@dataclass(frozen=True)
class _Run:
    """The Execute or Fallback call itself; the driver answers with the response's
    bytes and the serving process that answered (ExecuteResult.process)."""

    method: str
    request: bytes


@dataclass(frozen=True)
class _Stream:
    """A streamed call: the driver sends `requests` and feeds every response
    message to `assembler`; it answers with the assembler and the serving
    process that answered."""

    method: str
    requests: Iterator[bytes]
    assembler: Assembler


@dataclass(frozen=True)
class _RegisterStream:
    """A Register whose graph's large constants travel as chunks (RegisterStream):
    the driver sends `messages()` and answers with the RegisterResponse's bytes.
    `unary()` is the same Register as one message, for a server older than
    RegisterStream (UNIMPLEMENTED)."""

    messages: Callable[[], Iterator[bytes]]
    unary: Callable[[], bytes]


@dataclass(frozen=True)
class _Session:
    """The client's shared-memory session for a stack of `size` tensor bytes, or None."""

    size: int


@dataclass(frozen=True)
class _InSlot:
    """Hold a slot of `session` while the driver runs `flow(slot)` to its end
    (answering with its result, or throwing its error back)."""

    session: SharedSession
    flow: Callable[[int], _Flow[Any]]


@dataclass(frozen=True)
class _Blocking:
    """`fn(*args)`, which blocks (copies into or out of a slot): AsyncClient runs it in a thread."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


_Op = _Call | _Run | _Stream | _RegisterStream | _Session | _InSlot | _Blocking
_Flow = Generator[_Op, Any, T]
# A unary call's first request, whether it carries graphs, the dropped handles it frees (_Base._prepare).
_First = tuple[bytes, bool, list[str]]


@dataclass(frozen=True)
class _Done:
    value: Any


def _resume(flow: _Flow[Any], reply: Any, error: BaseException | None) -> _Op | _Done:
    """The flow's next step, given the last one's answer or error; _Done at its end."""
    try:
        return flow.throw(error) if error is not None else flow.send(reply)
    except StopIteration as stop:
        return _Done(stop.value)


class _Sent:
    """A streamed call's requests as sent: the first (its header), and whether all were."""

    def __init__(self, requests: Iterator[bytes]) -> None:
        self._requests = requests
        self.first: bytes | None = None
        self.done = False

    def __iter__(self) -> Iterator[bytes]:
        for message in self._requests:
            if self.first is None:
                self.first = message
            yield message
        self.done = True


@contextlib.contextmanager
def _reading(call: Any) -> Iterator[None]:
    """Around reading a streamed call's responses: its errors typed, and the
    call cancelled when the client stops reading for another reason."""
    try:
        yield
    except grpc.RpcError as e:
        raise _translate(e) from e
    except BaseException:
        call.cancel()  # a response this client cannot read: stop the server's work too
        raise


def _channel_options(max_message_bytes: int, extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _SERVICE_CONFIG),
        # gRPC retries a call only while its request fits this buffer (256 KiB
        # by default): 16 MiB covers most calls without holding large ones twice.
        ("grpc.per_rpc_retry_buffer_size", _RETRY_BUFFER_BYTES),
        *extra,
    ]


def _translate(e: grpc.RpcError) -> FuseportError:
    """The typed error for a failed call (the server names its class in metadata)."""
    name = None
    trailing = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    for k, v in trailing or ():
        if k == ERROR_METADATA_KEY:
            name = v
    return error_from_status(e.code(), e.details() or "", name)


def _result(raw: bytes, started: int, known: _Known | None, carried: bool, process: str) -> ExecuteResult:
    resp = codec.decode_execute_response(raw)
    if carried and known is not None:
        known.carried(resp.registered)
    return _make_result(
        resp.stack, resp.path, resp.reason, resp.detail, resp.timings, resp.variant, started, "unary", process
    )


def _streamed_result(assembler: Assembler, started: int, process: str) -> ExecuteResult:
    stack = assembler.finish()
    h = assembler.header
    assert assembler.ended is not None  # finish() says so
    t = assembler.ended.timings
    return _make_result(stack, h.path, h.reason, h.detail, t, h.variant, started, "stream", process)


def _process_of(trailing: Sequence[tuple[str, Any]] | None) -> str:
    """The serving process a call's trailing metadata names ("" for none: one process)."""
    for k, v in trailing or ():
        if k == PROCESS_METADATA_KEY:
            return str(v)
    return ""


_PATH_FUSED = _pb.service.PATH_FUSED
# ExecuteResult.reason of each FallbackReason ("" for UNSPECIFIED), made once.
_REASONS = {
    code: "" if name == "FALLBACK_REASON_UNSPECIFIED" else name.removeprefix("FALLBACK_REASON_").lower()
    for name, code in _pb.service.FallbackReason.items()
}


def _make_result(
    stack: list[Any],
    path: int,
    reason_code: int,
    detail: str,
    t: _pb.service.Timings,
    variant: int,
    started: int,
    transport: str,
    process: str,
) -> ExecuteResult:
    reason = _REASONS.get(reason_code)
    if reason is None:  # a code this client does not know: Name() says so, as it always has
        reason = _pb.service.FallbackReason.Name(reason_code)
    return ExecuteResult(
        stack=stack,
        path="fused" if path == _PATH_FUSED else "fallback",
        reason=reason,
        detail=detail,
        timings=Timings(
            t.decode_us, t.queue_us, t.run_us, t.encode_us, (time.perf_counter_ns() - started) // 1000
        ),
        variant=variant,
        transport=transport,
        process=process,
    )


@functools.lru_cache(maxsize=256)
def _bare_head(key: int, wait: bool, keep: bool, no_batching: bool) -> bytes:
    """The head of a call of a kernel this client did not register (any variant runs)."""
    return codec.execute_request_head(key, wait_for_compile=wait, keep_outputs=keep, no_batching=no_batching)


class _Base:
    """What both clients share: options, the graph cache, request building."""

    # Set by each client (its calls differ): the client's RemoteTensors and lease.
    _leases: Leases

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        stream_above: int | None = DEFAULT_STREAM_ABOVE,
        stream_chunk_bytes: int = CHUNK_BYTES,
        shared_memory: bool = True,
        shared_above: int = DEFAULT_SHARED_ABOVE,
        batching: bool = True,
        connections: int = 1,
    ) -> None:
        """`connections`: how many TCP connections (gRPC channels) to open to
        the target. Behind `fuseport serve --processes N` each connection
        reaches one serving process: several let one client's concurrent calls
        (from threads, or tasks of an AsyncClient) reach several processes. A
        call goes to the connection with the fewest calls in flight (ties in
        turn); one naming a RemoteTensor to the connection whose call made it;
        each connection opens its own shared-memory session. 1 (the default):
        one channel, as a client has always had.

        `batching`: False marks every Execute of this client never to be
        batched with other calls (ExecuteOptions.no_batching): each runs at once
        as its own launch, on a server with --batch-window-us.

        `stream_above`: stacks with at least this many tensor bytes are sent
        as a stream of chunks (ExecuteStream/FallbackStream), as are stacks too
        large for one message; None sends every stack as one message. Register
        does the same with graphs of at least this many bytes (RegisterStream:
        their large constants in chunks, so that the server holds the graph once).

        `shared_memory`: when the server is on this host and offers it, stacks
        with at least `shared_above` tensor bytes travel through shared memory
        (ExecuteResult.transport says "shm", or "cuda_ipc" where CUDA inputs
        went by CUDA IPC handle); False: never."""
        check_connections(connections)  # before anything is opened
        self.target = target
        self.connections = connections
        self.batching = batching
        self.stream_above = stream_above
        self.shared_above = shared_above
        self.stream_chunk_bytes = stream_chunk_bytes
        # One server, or replicas: dns:///NAME:PORT, ipv4:A:P,B:P, or a list of host:port.
        self._target = parse_target(target)
        # One server only: replicas' calls alternate between hosts, and a
        # session belongs to one serving process.
        self._shared_wanted = shared_memory and not self._target.replicas
        self.timeout = timeout
        from_files = channel_credentials(tls_ca, tls_cert, tls_key)
        if credentials is not None and from_files is not None:
            raise ValueError("give either credentials= or tls_ca/tls_cert/tls_key, not both")
        self._credentials = credentials or from_files
        if not tls_server_name and self._credentials is not None and self._target.server_name is not None:
            # A list of addresses has no host for TLS to check: the one they share.
            tls_server_name = self._target.server_name
        elif (
            not tls_server_name
            and self._credentials is not None
            and self._target.uri.startswith(("ipv4:", "ipv6:"))
        ):
            raise ValueError(
                f"TLS to replicas of different hosts ({', '.join(self._target.hosts)}) needs tls_server_name=: "
                "the name every replica's certificate carries (or use dns:///NAME:PORT)"
            )
        if tls_server_name:
            # The name the server's certificate must carry, when it is not the
            # target's host (a health check that reaches the server as 127.0.0.1).
            options = [*options, ("grpc.ssl_target_name_override", tls_server_name)]
        self._options = _channel_options(max_message_bytes, options)
        # None reads FUSEPORT_TOKEN; "" means no token whatever the environment says.
        self._metadata = bearer_metadata(token_from_env() if token is None else token)
        hosts = self._target.hosts
        if self._metadata and self._credentials is None and not all(is_loopback(h) for h in hosts):
            log.warning("sending a token to %s without TLS: anyone on the path can read it", target)
        self._max = max_message_bytes
        # Kernels this client registered, so that a server that lost them (a
        # restart without its store, another replica) can be healed, and new
        # variants captured for stacks the registered ones do not cover.
        self._known: dict[int, _Known] = {}
        # Kernels this client unregistered itself: NOT_FOUND for one says so, and
        # is not healed (registering it again would undo the user's own call).
        self._unregistered: set[int] = set()

    def _bind(self, aio: bool) -> None:
        """The client's channels (blocking or asyncio) and their methods
        (client/connections.py); `channel` is the first."""
        self._pool = Connections(
            self.connections,
            lambda options: open_channel(self._target.uri, self._credentials, options, aio=aio),
            self._options,
        )
        self.channel = self._pool.first.channel

    @property
    def _shared(self) -> SharedSession | None:
        """The first connection's shared-memory session (the client's only one with connections=1)."""
        return self._pool.first.shared

    @property
    def _shared_retry_at(self) -> float:
        """When the first connection asks for a session again (after none could be had)."""
        return self._pool.first.shared_retry_at

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    @staticmethod
    def _graph_of(fn_or_graph: Any, example_inputs: Sequence[Any] | None) -> _pb.graph.Graph:
        if isinstance(fn_or_graph, _pb.graph.Graph):
            return fn_or_graph
        if example_inputs is None:
            raise TypeError("register(fn_or_module, example_inputs): example inputs are needed to capture")
        return capture(fn_or_graph, list(example_inputs))

    def _execute_request(
        self,
        key: int,
        stack: Stack,
        wait: bool,
        graphs: dict[int, _pb.graph.Graph] | None = None,
        keep: bool = False,
        shared: _Shared | None = None,
        free_handles: Sequence[str] = (),
        remote: bool = True,
    ) -> bytes:
        """`remote`: whether `stack` may hold RemoteTensors (False: it is sent as it is)."""
        # A client that registered the kernel runs only the variants it
        # registered itself: another client's graph under the same key is
        # never trusted with this client's function.
        known = self._known.get(key)
        if graphs is None and shared is None and not free_handles:  # the common call: its head made once
            head = (
                known.head(key, wait, keep, not self.batching)
                if known is not None
                else _bare_head(key, wait, keep, not self.batching)
            )
            return codec.encode_execute_request(
                key, self._wire_stack(stack) if remote else stack, limit=self._max, head=head
            )
        variants = list(graphs if graphs is not None else known.graphs if known else ())
        return codec.encode_execute_request(
            key,
            self._wire_stack(shared.stack if shared else stack),
            wait_for_compile=wait,
            limit=self._max,
            variants=variants,
            graphs=list(graphs.values()) if graphs else (),
            alias=known.alias if graphs and known else None,
            keep_outputs=keep,
            shm_session=shared.session if shared else "",
            shm_slot=shared.slot if shared else 0,
            shm_fresh_output=shared.fresh if shared else False,
            shm_cuda_outputs=shared.cuda if shared else False,
            no_batching=not self.batching,
            free_handles=free_handles,
        )

    @property
    def client_id(self) -> str:
        """The random id this client sends as "fuseport-client-id" metadata."""
        return self._leases.client_id

    def _wire_stack(self, stack: Stack) -> list[Any]:
        """The stack as it travels: RemoteTensors become handles (another
        client's are refused here, before anything is sent)."""
        return [self._leases.to_wire(v) for v in stack]

    def _adopt(self, result: ExecuteResult) -> ExecuteResult:
        """The result with the handles of kept outputs wrapped as RemoteTensors."""
        for v in result.stack:
            if isinstance(v, (codec.Handle, list)):
                return dataclasses.replace(result, stack=[self._leases.adopt(v) for v in result.stack])
        return result

    @staticmethod
    def _ordered(key: int, graphs: dict[int, _pb.graph.Graph]) -> dict[int, _pb.graph.Graph] | None:
        """The graphs as a call carries them, the kernel's own first (the server
        checks that it hashes to the key); None without it (only variants of
        another's kernel: a server lacking the kernel could not take them)."""
        if key not in graphs:
            return None
        return {key: graphs[key], **{v: g for v, g in graphs.items() if v != key}}

    def _first_request(
        self,
        key: int,
        stack: Stack,
        wait: bool,
        keep: bool = False,
        shared: _Shared | None = None,
        free_handles: Sequence[str] = (),
        remote: bool = True,
    ) -> tuple[bytes, bool]:
        """The call's request, and whether it carries the kernel's graphs (while
        some replica is known to lack them)."""
        known = self._known.get(key)
        if known is not None and known.heal > 0 and (graphs := self._ordered(key, known.graphs)) is not None:
            try:
                return self._execute_request(key, stack, wait, graphs, keep, shared, free_handles), True
            except ResourceExhausted:
                pass  # over the message limit with them: the retry path registers them
        return self._execute_request(key, stack, wait, None, keep, shared, free_handles, remote), False

    def _streams(self, size: int) -> bool:
        """Whether a stack of `size` tensor bytes goes as a stream: past the
        threshold, or too large for one message (the stream has no such limit)."""
        over = size > codec.message_room(self._max)
        return (self.stream_above is not None and size >= self.stream_above) or over

    def _stream_requests(self, key: int, stack: Stack, wait: bool) -> Iterator[bytes]:
        """The request stream: header, data chunks straight from the tensors, end."""
        # Every chunk is one message: never larger than the channel lets through.
        writer = Writer(list(stack), max(1, min(self.stream_chunk_bytes, codec.message_room(self._max))))
        known = self._known.get(key)
        header = _pb.service.StreamRequestHeader(key=key, stack=writer.header_stack, sizes=writer.sizes)
        if wait:
            header.options.wait_for_compile = True
        if known:
            header.options.variants.extend(known.graphs)
        yield _pb.service.StackChunk(request=header).SerializeToString()
        yield from writer.chunks()
        yield writer.end()

    # Shared memory: the decisions both clients take. The blocking parts (the
    # session's socket waits and copies) Client runs in place, AsyncClient in
    # threads off its loop.

    def _shared_wants(self, size: int) -> bool:
        """Whether a stack of `size` tensor bytes goes through shared memory
        where a session can be had."""
        return self._shared_wanted and size >= self.shared_above

    def _empty_wants(self, shape: torch.Size, dtype: torch.dtype) -> int:
        """The stack size to open a session for, for Client.empty: at least what shared memory is used for."""
        return max(self.shared_above, shape.numel() * dtype.itemsize)

    @staticmethod
    def _shared_now(conn: Connection) -> SharedSession | bool | None:
        """The session a large stack on `conn` goes through; None: the network;
        True: one is to be opened first. Under `conn.shared_lock`."""
        if conn.shared is not None and conn.shared.pid != os.getpid():
            # A forked child: the session's socket and regions are its parent's
            # (its writes would land in the parent's inputs). It lets go of its
            # copies only, and opens a session of its own.
            conn.shared.close()
            conn.shared, conn.shared_retry_at = None, 0.0
        if conn.shared is not None and not conn.shared.closed:
            return conn.shared
        return None if time.monotonic() < conn.shared_retry_at else True

    def _shared_open(self, conn: Connection, opened: bytes, timeout: float | None) -> SharedSession | None:
        """The session the OpenSharedMemory answer `opened` names (blocks: it
        connects and waits for the server's hello); None, and no new try for a
        while, when there is none to be had."""
        try:
            response = _pb.service.OpenSharedMemoryResponse.FromString(opened)
            return SharedSession(response, self._timeout(timeout) or 30.0)
        except (FuseportError, OSError) as e:
            # OSError: the server's socket is not reachable from here (another
            # host or network namespace), the usual case for a remote server.
            return self._no_shared(conn, e)

    def _no_shared(self, conn: Connection, why: BaseException) -> None:
        """No shared memory on `conn`, and no new try for a while. Called inside the
        `except` that caught `why`: an exception kept in a local of the frame its
        traceback holds is a cycle, which kept that call's result alive until the
        collector ran (a 256 MiB result, for a client of a server on another host)."""
        log.info("no shared memory with %s (%s); using the network", self.target, why)
        conn.shared_retry_at = time.monotonic() + _SHARED_RETRY_SECONDS

    @staticmethod
    def _shared_write(session: SharedSession, slot: int, job: _Job) -> tuple[_Shared, bool]:
        """The call as sent through `slot` (blocks: copies), and whether CUDA
        inputs went by CUDA IPC handle. Tensor outputs come back through the
        slot's region (its device one, for results asked for on the server's
        GPU), unless kept."""
        written, by_cuda = session.write(slot, list(job.stack))
        fresh = not job.keep and session.fresh_output(slot)
        cuda = job.results_on is not None and session.device_results(job.results_on)
        return _Shared(written, session.id, 0 if job.keep else slot, fresh, cuda), by_cuda

    @staticmethod
    def _no_cuda_ipc(session: SharedSession, e: CudaIpcUnavailable) -> None:
        # The server cannot open our handles (another PID/IPC namespace, say).
        # Nothing ran: this session sends CUDA tensors through its regions from
        # now on, this call first.
        log.info("CUDA IPC unavailable (%s); CUDA tensors go through host memory", e)
        session.cuda_devices = frozenset()

    @staticmethod
    def _no_cuda_outputs(session: SharedSession, e: CudaIpcUnavailable) -> None:
        # The server's device output region cannot be mapped here: the call runs again
        # (a result is a pure function of the call), and the session's results come
        # through host memory from now on.
        log.info("results cannot come device to device (%s); they come through host memory", e)
        session.cuda_outputs = False

    @staticmethod
    def _shared_read(session: SharedSession, result: ExecuteResult, device_to_device: bool) -> ExecuteResult:
        """The result with its tensors over the slot's region (or copied out of it,
        from a server without `fresh_outputs`; results in the slot's device region
        copied out of it); blocks until the region is here. `device_to_device`: CUDA
        inputs went by handle or results came in the device region (transport "cuda_ipc")."""
        transport = "cuda_ipc" if device_to_device else "shm"
        return dataclasses.replace(result, stack=session.read(result.stack), transport=transport)

    def _shared_abandoned(self, session: SharedSession, e: BaseException) -> None:
        """After a call through `session` ended with `e`: where the server may
        still be running it (no answer came: a deadline, a cancellation, a broken
        connection), it will write the results into the call's slot later, where
        a later call given that slot would read them as its own. So the session
        goes, and the next large call opens a new one."""
        if isinstance(e, FuseportError) and not isinstance(e, (DeadlineExceeded, Unavailable)):
            return  # the server's own answer: the call is over there
        log.info("a shared-memory call ended without the server's answer (%r): its session is given up", e)
        self._shared_drop(session)

    def _shared_lost(self, session: SharedSession, e: SharedMemoryUnavailable) -> None:
        # Nothing ran: this call goes over the network, and the next large one
        # opens a new session (this one is closed, or was opened on another
        # serving process than the one the channel reaches now).
        log.info("shared memory unavailable (%s); using the network", e)
        self._shared_drop(session)

    def _shared_drop(self, session: SharedSession) -> None:
        """Closes `session`; the next large call on its connection opens a new one."""
        for conn in self._pool.all:
            with conn.shared_lock:
                if conn.shared is session:
                    session.close()
                    conn.shared = None
                    return
        session.close()

    # Requests and their parsers, shared by both clients (which differ only in
    # how they wait for the call).

    def _register_call(
        self,
        fn_or_graph: Any,
        example_inputs: Sequence[Any] | None,
        variant_of: int | None = None,
        alias: str | None = None,
        batching: bool | None = None,
    ) -> tuple[_Call | _RegisterStream, Callable[[bytes], int]]:
        if alias is not None:
            check_alias(alias)  # before capturing: the server would refuse it anyway
        graph = self._graph_of(fn_or_graph, example_inputs)
        fn = None if isinstance(fn_or_graph, _pb.graph.Graph) else fn_or_graph
        return self._register_graph(graph, fn, variant_of, alias, batching)

    def _register_graph(
        self,
        graph: _pb.graph.Graph,
        fn: Any,
        variant_of: int | None,
        alias: str | None = None,
        batching: bool | None = None,
    ) -> tuple[_Call | _RegisterStream, Callable[[bytes], int]]:
        """The Register of `graph` (unary, or streamed for a large graph) and what makes its key of the answer."""

        def registered(raw: bytes) -> int:
            resp = _pb.service.RegisterResponse.FromString(raw)
            self._unregistered.discard(resp.key)
            known = self._known.setdefault(resp.key, _Known(fn))
            if known.fn is None:
                known.fn = fn
            if alias is not None:
                known.alias = alias
            known.hold(resp.variant, graph)
            return resp.key

        def request(g: _pb.graph.Graph) -> _pb.service.RegisterRequest:
            out = _pb.service.RegisterRequest(graph=g)
            if variant_of is not None:
                out.variant_of = variant_of
            if alias is not None:
                out.alias = alias
            if batching is not None:
                out.batching = batching
            return out

        if self._streams_graph(graph):
            return _RegisterStream(
                functools.partial(self._graph_messages, graph, request),
                lambda: request(graph).SerializeToString(),
            ), registered
        return _Call("Register", request(graph).SerializeToString()), registered

    def _streams_graph(self, graph: _pb.graph.Graph) -> bool:
        """Whether a graph goes through RegisterStream: from `stream_above` bytes on, or
        over one message. A graph carrying fields this client does not know goes whole
        (its key covers them; a server that knows them keys it as sent)."""
        size = graph.ByteSize()
        over = size > codec.message_room(self._max)
        wanted = (self.stream_above is not None and size >= self.stream_above) or over
        return wanted and not codec.has_unknown_fields(graph)

    def _graph_messages(
        self, graph: _pb.graph.Graph, request: Callable[[_pb.graph.Graph], _pb.service.RegisterRequest]
    ) -> Iterator[bytes]:
        """RegisterStream's messages: the header (the graph, its large constants without
        their data), their chunks, one constant at a time (each read once more from the
        graph, the copy dropped before the next), and the end."""
        header = _pb.graph.Graph()
        header.CopyFrom(graph)  # every field, known now or added later, as the key sees it
        sizes: list[int] = []
        for c in header.constants:
            n = len(c.data)
            if n >= _STREAM_CONSTANT_BYTES:
                c.ClearField("data")
            sizes.append(n if n >= _STREAM_CONSTANT_BYTES else 0)
        first = _pb.service.StackChunk(
            register=_pb.service.StreamRegisterHeader(request=request(header), sizes=sizes)
        ).SerializeToString()
        del header
        yield first
        writer = Writer([], max(1, min(self.stream_chunk_bytes, codec.message_room(self._max))))
        for i, n in enumerate(sizes):
            if n:
                yield from writer.data_chunks(i, memoryview(graph.constants[i].data))
        yield writer.end()

    # The execute flow (see _Call): what both clients run for Execute/Fallback.

    def _run_flow(self, job: _Job) -> _Flow[ExecuteResult]:
        """A call through shared memory where the server is on this host and the
        stack is large enough, else over the network (unary or streamed)."""
        size = job.size
        # A small stack never asks for the session (nor waits for its lock).
        session: SharedSession | None = (yield _Session(size)) if self._shared_wants(size) else None
        if session is not None and size <= session.max_bytes:
            try:
                return (yield _InSlot(session, functools.partial(self._shared_flow, job, session)))
            except ResultTooLarge as e:
                # Nothing ran: the results would not fit the session's room nor one
                # message. The stream carries them (the session stays), unless the call
                # cannot stream (results kept, handles in the stack: see _execute_flow).
                if job.keep or job.remote:
                    raise
                log.info("results over what shared memory can take (%s); sending the call as a stream", e)
                return (yield from self._execute_flow(job, stream=True))
            except SharedMemoryUnavailable as e:
                self._shared_lost(session, e)
            except BaseException as e:
                self._shared_abandoned(session, e)
                raise
        # A stack over what the session may map goes over the network: as a
        # stream where it is over one message (_streams).
        return (yield from self._execute_flow(job))

    def _shared_flow(self, job: _Job, session: SharedSession, slot: int) -> _Flow[ExecuteResult]:
        """The call through `slot` of `session`: inputs copied in, the call, outputs copied out."""
        while True:  # at most three times: each CudaIpcUnavailable turns one way off for good
            shared, by_cuda = yield _Blocking(self._shared_write, (session, slot, job))
            try:
                result = yield from self._execute_flow(job, shared)
            except CudaIpcUnavailable as e:
                if not by_cuda:
                    raise
                self._no_cuda_ipc(session, e)  # the server could not open an input's handle: nothing ran
                continue
            on_device = _on_device(result.stack)
            try:
                if session.views and not on_device:
                    # Only the wait for the regions blocks; the tensors over them are made here, not
                    # handed back through a thread's future (a worker that has not yet dropped it
                    # would keep them alive, and the region from being written again).
                    yield _Blocking(session.wait_outputs, (result.stack,))
                    return self._shared_read(session, result, by_cuda)
                # Results on the device are copies of the caller's own, made (and waited for) off the loop.
                return (yield _Blocking(self._shared_read, (session, result, by_cuda or on_device)))
            except CudaIpcUnavailable as e:
                if not shared.cuda:
                    raise
                self._no_cuda_outputs(session, e)  # its device region cannot be mapped here: run it again

    def _unary(self, job: _Job) -> _First | None:
        """The first request of a call that goes as one message (no shared memory,
        no stream), as _execute_flow would send it; None for a call that goes
        another way. The clients send it themselves, and hand _execute_flow the
        request (`first`) only when it fails: the common small call then runs no
        flow at all (a third of the client's own CPU per call)."""
        if self._shared_wants(job.size) or (not job.keep and not job.remote and self._streams(job.size)):
            return None
        return self._prepare(job, None)

    def _prepare(self, job: _Job, shared: _Shared | None) -> _First:
        """A unary call's first request, whether it carries the kernel's graphs,
        and the ids of dropped RemoteTensors whose frees it carries."""
        # The frees of RemoteTensors dropped since the last call ride on this one (one
        # connection only: with several, a handle's free must reach its own process).
        carrying = [] if self._pool.many else self._leases.take_dropped()
        try:
            request, carried = self._first_request(
                job.key, job.stack, job.wait, job.keep, shared, carrying, job.remote
            )
        except BaseException:
            self._leases.untake(carrying)  # never sent: the lease thread frees them
            raise
        return request, carried, carrying

    def _answered(self, job: _Job, raw: bytes, process: str, carried: bool) -> ExecuteResult:
        """The result of a unary call's response."""
        return self._adopt(_result(raw, job.started, self._known.get(job.key), carried, process))

    def _execute_flow(
        self, job: _Job, shared: _Shared | None = None, stream: bool = False, first: _First | None = None
    ) -> _Flow[ExecuteResult]:
        """The call, and its recovery when the server lacks the kernel or a variant.

        A large stack streams (any stack, with `stream`); its recovery registers
        graphs by Register (a stream's header carries none), a unary call
        carries them (see _plan_recovery). Handles travel only in unary calls
        (a stream's chunks carry bytes). A unary call whose result the server
        refused as over one message (ResultTooLarge: nothing ran) is sent again
        as a stream, which carries any result --max-stream-bytes allows.
        `first`: the unary request _unary made (its first step is that call)."""
        method, key, stack, wait, keep = job.method, job.key, job.stack, job.wait, job.keep
        can_stream = shared is None and not keep and not job.remote
        streamed = first is None and can_stream and (stream or self._streams(job.size))
        request, carried, carrying = (b"", False, []) if streamed else first or self._prepare(job, shared)
        adopted: Callable[[], None] | None = None
        attempt = 0
        while True:  # NoMatchingVariant may take two more: the variants held, then a new capture
            try:
                if streamed:
                    requests = self._stream_requests(key, stack, wait)
                    assembler, process = yield _Stream(method, requests, Assembler("response", _result_sink))
                    return _streamed_result(assembler, job.started, process)
                try:
                    raw, process = yield _Run(method, request)
                except BaseException:
                    # The server may not have read them (refused at the door, a lost
                    # connection): the lease thread frees them; the retries carry none.
                    self._leases.untake(carrying)
                    carrying = []
                    raise
            except ResultTooLarge as e:
                if streamed or not can_stream:
                    raise
                log.info("the result is over one message (%s); sending the call as a stream", e)
                streamed = True
                continue
            except FuseportError as e:
                again = (
                    self._plan_recovery(e, key, stack, wait, carried, streamed, keep, shared)
                    if attempt < 2
                    else None
                )
                attempt += 1
                if again is None:
                    raise
                if again.request is None:
                    for register, registered in again.registers:
                        registered((yield register))
                    if not streamed:
                        request, carried = (
                            self._execute_request(
                                key, stack, wait, keep=keep, shared=shared, remote=job.remote
                            ),
                            False,
                        )
                else:
                    request, carried, adopted = again.request, True, again.adopted
                continue
            if adopted is not None:
                adopted()
            return self._answered(job, raw, process, carried)

    def _open_stream(self, op: _Stream, timeout: float | None, conn: Connection) -> Any:
        return conn.stream_methods[op.method](
            op.requests, timeout=self._timeout(timeout), metadata=self._metadata or None
        )

    def _plan_recovery(
        self,
        e: FuseportError,
        key: int,
        stack: Stack,
        wait: bool,
        carried: bool,
        streamed: bool = False,
        keep: bool = False,
        shared: _Shared | None = None,
    ) -> _Recovery | None:
        """How a failed Execute/Fallback may succeed when sent again, or None
        when it cannot (the error stands). `carried`: the failed call carried
        every graph this client holds for the key.

        * NOT_FOUND for a kernel this client registered: the server lost it
          (a restart without its store, another replica): send every graph again.
        * NoMatchingVariant for a kernel registered from a function: with
          replicas, first send the variants this client holds (another replica
          may have been given one this one lacks); if the server had them all,
          capture the function again on these very inputs and add that variant.

        The graphs travel in the retried call itself (ExecuteRequest.graphs):
        a Register of its own could reach one replica and the retried call
        another that lacks them, round after round. Only when they would make
        the call larger than the message limit, or the call is streamed (a
        stream's header carries no graphs), are they registered first.
        """
        known = self._known.get(key)
        if known is None:
            if isinstance(e, KernelNotFound) and key in self._unregistered:
                raise KernelNotFound(
                    f"{e}: this client unregistered it; register it again to use it", key
                ) from e
            return None
        graphs = dict(known.graphs)
        if isinstance(e, KernelNotFound) and not carried:
            log.info("a server lacks kernel %d; sending its graphs with the call", key)
        elif isinstance(e, NoMatchingVariant) and not carried and len(graphs) > 1 and self._target.replicas:
            log.info(
                "kernel %d: no variant there covers these inputs; sending the variants this client holds", key
            )
        elif isinstance(e, NoMatchingVariant) and known.fn is not None and len(stack) >= known.arity:
            inputs = list(stack[len(stack) - known.arity :])
            if any(isinstance(v, RemoteTensor) for v in inputs):
                # Capture needs the values here; a RemoteTensor's are on the server.
                log.info(
                    "kernel %d: no variant covers these inputs, and RemoteTensors cannot be captured on", key
                )
                return None
            log.info("kernel %d: no variant covers these inputs; capturing one (%s)", key, e)
            try:
                graph = capture(known.fn, inputs)
            except FuseportError as capture_error:
                # Inputs the function cannot take (a string for a float): the
                # server's message says what is wrong with them.
                log.info("kernel %d: cannot capture for these inputs: %s", key, capture_error)
                return None
            if key_for(graph) in graphs:
                return None  # the same graph again: the server's refusal stands
            graphs[key_for(graph)] = graph
        else:
            return None
        ordered = self._ordered(key, graphs)
        if ordered is None:
            return None
        known.heal += 1  # some replica lacks graphs: calls carry them until one is filled
        request: bytes | None = None
        if not streamed:
            try:
                request = self._execute_request(key, stack, wait, ordered, keep, shared)
            except ResourceExhausted:
                pass  # graphs and stack together are over the limit: Register them one by one

        def adopted() -> None:
            for v, g in ordered.items():
                if v not in known.graphs:
                    known.hold(v, g)

        registers = [
            self._register_graph(g, known.fn, None if v == key else key, known.alias if v == key else None)
            for v, g in ordered.items()
        ]
        return _Recovery(request, adopted, registers)

    @staticmethod
    def _describe_request(key: int, include_source: bool) -> bytes:
        return _pb.service.DescribeRequest(key=key, include_source=include_source).SerializeToString()

    @staticmethod
    def _described(answer: tuple[bytes, str]) -> KernelInfo:
        raw, process = answer
        return KernelInfo(_pb.service.DescribeResponse.FromString(raw).kernel, process)

    @staticmethod
    def _listed(answer: tuple[bytes, str]) -> list[KernelInfo]:
        raw, process = answer
        return [KernelInfo(k, process) for k in _pb.service.ListResponse.FromString(raw).kernels]

    def _unregister_call(self, key: int) -> tuple[bytes, Callable[[bytes], bool]]:
        def unregistered(raw: bytes) -> bool:
            self._known.pop(key, None)
            self._unregistered.add(key)
            return _pb.service.UnregisterResponse.FromString(raw).removed

        return _pb.service.UnregisterRequest(key=key).SerializeToString(), unregistered

    @staticmethod
    def _health_request(service: str) -> health_pb2.HealthCheckRequest:
        return health_pb2.HealthCheckRequest(service=service)

    @staticmethod
    def _status(resp: health_pb2.HealthCheckResponse) -> str:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class Client(_Base):
    """A blocking client. Use as a context manager, or call close().

    >>> with Client("127.0.0.1:50051") as c:            # doctest: +SKIP
    ...     key = c.register(lambda x, y: x * y + 1, [torch.ones(4), torch.ones(4)])
    ...     c.execute(key, [torch.ones(4), torch.full((4,), 2.0)])

    `execute(..., keep=True)` leaves the tensor outputs on the server's device
    and returns RemoteTensors, which later stacks of this client take as they
    are (no transfer). close() frees every handle the client still holds.
    """

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._bind(aio=False)
        # Random per client: the server binds the handles this client makes to it.
        self._leases = Leases(self._call)
        self._leases.calls_carry = not self._pool.many
        self._metadata = (*self._metadata, (CLIENT_ID_KEY, self._leases.client_id))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Frees this client's handles on the server, then closes the channels."""
        self._leases.close(self.timeout)
        for conn in self._pool.all:
            if conn.shared is not None:
                conn.shared.close()
        for channel in self._pool.channels():
            channel.close()

    def _call(
        self, method: str, request: bytes, timeout: float | None, conn: Connection | None = None
    ) -> bytes:
        """A unary call on `conn`; None: on the connection the pool chooses
        (for a handle method: where the handles live, see Connections.handle_calls)."""
        pool = self._pool
        if conn is None and pool.many:
            if method in HANDLE_METHODS:
                calls = pool.handle_calls(method, request)
                return calls.join([self._call(method, body, timeout, c) for c, body, _ in calls.parts])
            conn = pool.acquire()
            try:
                return self._call(method, request, timeout, conn)
            finally:
                pool.release(conn)
        try:
            return (conn or pool.first).methods[method](  # type: ignore[no-any-return]
                request, timeout=self._timeout(timeout), metadata=self._metadata or None
            )
        except grpc.RpcError as e:
            raise _translate(e) from e

    def _call_on_any(self, method: str, request: bytes, timeout: float | None) -> tuple[bytes, str]:
        """A call on the connection the pool chooses, and the serving process that answered it."""
        conn = self._pool.acquire()
        try:
            return self._call_answered(method, request, timeout, conn)
        finally:
            self._pool.release(conn)

    def _call_answered(
        self, method: str, request: bytes, timeout: float | None, conn: Connection
    ) -> tuple[bytes, str]:
        """A call on `conn`, and the serving process that answered it."""
        try:
            raw, call = conn.methods[method].with_call(
                request, timeout=self._timeout(timeout), metadata=self._metadata or None
            )
        except grpc.RpcError as e:
            raise _translate(e) from e
        return raw, _process_of(call.trailing_metadata())

    def register(
        self,
        fn_or_module: Any,
        example_inputs: Stack | None = None,
        *,
        variant_of: int | None = None,
        alias: str | None = None,
        batching: bool | None = None,
        timeout: float | None = None,
    ) -> int:
        """Captures a function (or takes a graph) and registers it as a kernel.

        A client that registered a function captures it again by itself when a
        later stack needs another variant, and sends its graphs again to a
        server (or replica) that lost them. A graph of `stream_above` bytes or
        more, or one over the message limit, travels as a stream of chunks
        (RegisterStream), with the same key and errors.

        Args:
            fn_or_module: A function or `torch.nn.Module` to capture, or a
                `fuseport.v1` Graph to register as it is.
            example_inputs: The inputs to capture on (not needed for a Graph).
            variant_of: Register the graph as another variant of this kernel
                (for stacks its variants do not cover).
            alias: A name the kernel is also known by (the model name KServe v2
                clients call it by).
            batching: False keeps the kernel's calls out of dynamic batches on
                the server (--batch-window-us), whatever its graph; True lets them
                in again where the graph is proven batchable; None leaves it as it is.
            timeout: Seconds for the call; None: the client's `timeout`.

        Returns:
            The kernel's key: the content key of its graph, the same on every server.

        Raises:
            CaptureError: The function cannot be captured on these inputs.
            InvalidAlias: The alias is malformed or names another kernel.
            InvalidGraph: The server refuses the graph (OpNotAllowed: an op
                outside its allowlist).
            KernelNotFound: `variant_of` names no kernel on the server.
            ResourceExhausted: The graph is over the server's --max-graph-bytes
                (to a server older than RegisterStream: over the message limit),
                or the server's store is full.
            Unauthenticated: No token, or one the server does not know.
            PermissionDenied: The token's role may not call Register.
            Unavailable: The server cannot be reached or is shutting down.
            DeadlineExceeded: No answer within the timeout.
        """
        op, registered = self._register_call(fn_or_module, example_inputs, variant_of, alias, batching)
        return registered(self._register(op, timeout))

    def _register(
        self, op: _Call | _RegisterStream, timeout: float | None, conn: Connection | None = None
    ) -> bytes:
        """A Register's response: one message, or the graph streamed (RegisterStream)."""
        if isinstance(op, _Call):
            return self._call(op.method, op.request, timeout, conn)
        held = conn or self._pool.acquire()
        try:
            return held.register_stream(  # type: ignore[no-any-return]
                op.messages(), timeout=self._timeout(timeout), metadata=self._metadata or None
            )
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.UNIMPLEMENTED:
                log.info(
                    "%s has no RegisterStream (an older server): registering the graph as one message",
                    self.target,
                )
                return self._call("Register", op.unary(), timeout, held)
            raise _translate(e) from e
        finally:
            if conn is None:
                self._pool.release(held)

    def execute_detailed(
        self,
        key: int,
        stack: Stack,
        *,
        wait: bool = False,
        keep: bool = False,
        timeout: float | None = None,
        results_on: str | torch.device | None = None,
    ) -> ExecuteResult:
        """Runs a kernel on a stack, fused where it can; says how it went.

        The kernel's inputs are the top of the stack (its last values); they
        are replaced by its outputs, and the values below stay where they are.
        Large stacks travel as streamed chunks, or through shared memory when
        the server is on this host (`ExecuteResult.transport` says which).

        Args:
            key: The kernel's key (from `register`).
            stack: The values; RemoteTensors of this client run where they are.
            wait: Wait for a kernel still compiling for these inputs instead of
                running the fallback meanwhile.
            keep: Leave the tensor outputs on the server's device and return
                them as RemoteTensors.
            timeout: Seconds for the call; None: the client's `timeout`.
            results_on: A CUDA device of this process ("cuda", "cuda:1"): every
                tensor of the resulting stack is there. Where the server runs on
                that very GPU and shared memory is on, they come device to
                device (`transport` "cuda_ipc"); otherwise through host memory,
                copied there by the client. None or "cpu": host memory.

        Returns:
            The resulting stack, which path ran (fused or fallback) and why,
            the variant, the transport, the serving process, and the timings.

        Raises:
            KernelNotFound: The server lacks the kernel and this client did not
                register it (a client that did sends its graphs again).
            SignatureMismatch: The stack's top does not match the kernel's
                inputs (NoMatchingVariant: no variant covers them, and this
                client cannot capture one).
            InvalidStack: A value cannot be encoded or decoded.
            ExecutionFailed: The kernel raised on these inputs.
            HandleNotFound: A RemoteTensor was freed, expired or is another client's.
            ResourceExhausted: Out of device memory, or over a limit the
                message names.
            Unauthenticated: No token, or one the server does not know.
            PermissionDenied: The token's role may not call the method.
            Unavailable: The server cannot be reached or is shutting down.
            DeadlineExceeded: No answer within the timeout.
            ValueError: `results_on` is no CUDA device of this process, or
                given with `keep`.
        """
        return self._run("Execute", key, stack, wait, timeout, keep, results_on)

    def fallback_detailed(
        self,
        key: int,
        stack: Stack,
        *,
        keep: bool = False,
        timeout: float | None = None,
        results_on: str | torch.device | None = None,
    ) -> ExecuteResult:
        """Runs a kernel's unfused graph on a stack; says how it went.

        Args, return value and errors: as `execute_detailed` (no `wait`: the
        fallback never compiles).
        """
        return self._run("Fallback", key, stack, False, timeout, keep, results_on)

    def execute(
        self,
        key: int,
        stack: Stack,
        *,
        wait: bool = False,
        keep: bool = False,
        timeout: float | None = None,
        results_on: str | torch.device | None = None,
    ) -> list[Any]:
        """Runs a kernel on a stack, fused where it can.

        Args, errors: as `execute_detailed`.

        Returns:
            The resulting stack: the kernel's inputs on top replaced by its
            outputs (RemoteTensors for tensor outputs, with `keep`).
        """
        return self.execute_detailed(key, stack, wait=wait, keep=keep, timeout=timeout, results_on=results_on).stack

    def fallback(
        self,
        key: int,
        stack: Stack,
        *,
        keep: bool = False,
        timeout: float | None = None,
        results_on: str | torch.device | None = None,
    ) -> list[Any]:
        """Runs a kernel's unfused graph on a stack; returns the resulting stack.

        Args, errors: as `execute_detailed`.
        """
        return self.fallback_detailed(key, stack, keep=keep, timeout=timeout, results_on=results_on).stack

    def _run(
        self,
        method: str,
        key: int,
        stack: Stack,
        wait: bool,
        timeout: float | None,
        keep: bool = False,
        results_on: str | torch.device | None = None,
    ) -> ExecuteResult:
        job = _Job(method, key, stack, wait, keep, _results_device(results_on, keep))
        pool = self._pool
        if not pool.many:
            return _moved(self._job(job, timeout, pool.first), job.results_on)
        # Every step of the call on one connection: its shared-memory session is that connection's.
        conn = pool.acquire(stack)
        try:
            result = self._job(job, timeout, conn)
        finally:
            pool.release(conn)
        if keep:
            pool.learn(conn, result.stack)
        return _moved(result, job.results_on)

    def _job(self, job: _Job, timeout: float | None, conn: Connection) -> ExecuteResult:
        """The call on `conn`: a unary one made here, its failure (and any other
        call) left to the flow, which decides what follows."""
        first = self._unary(job)
        if first is None:
            return self._drive(self._run_flow(job), timeout, conn)
        try:
            raw, process = self._call_answered(job.method, first[0], timeout, conn)
        except BaseException as e:
            return self._drive(self._execute_flow(job, first=first), timeout, conn, e)
        return self._answered(job, raw, process, first[1])

    def _drive(
        self, flow: _Flow[T], timeout: float | None, conn: Connection, failed: BaseException | None = None
    ) -> T:
        """Runs `flow` to its end on `conn`, making each call it asks for, in place.
        `failed`: its first step was made already, and failed so."""
        reply: Any = None
        error: BaseException | None = None
        if failed is not None:
            step = _resume(flow, None, None)  # the call that was made: answered by its failure
            assert isinstance(step, _Run)
            error = failed
        try:
            while not isinstance(step := _resume(flow, reply, error), _Done):
                try:
                    reply, error = self._perform(step, timeout, conn), None
                except BaseException as e:  # the flow decides (a KeyboardInterrupt gives up a shm session)
                    reply, error = None, e
        finally:
            # An exception caught here has this frame in its traceback: held here, the two
            # would be a cycle keeping `step` (the call's result) alive until the collector ran.
            error = failed = None
        return step.value  # type: ignore[no-any-return]

    def _perform(self, op: _Op, timeout: float | None, conn: Connection) -> Any:
        match op:
            case _Call():
                return self._call(op.method, op.request, timeout, conn)
            case _Run():
                return self._call_answered(op.method, op.request, timeout, conn)
            case _Stream():
                call = self._open_stream(op, timeout, conn)
                with _reading(call):
                    for raw in call:
                        op.assembler.feed(raw)
                    return op.assembler, _process_of(call.trailing_metadata())
            case _RegisterStream():
                return self._register(op, timeout, conn)
            case _Session():
                return self._shared_session(op.size, timeout, conn)
            case _InSlot():
                with op.session.slot() as slot:
                    return self._drive(op.flow(slot), timeout, conn)
            case _Blocking():
                return op.fn(*op.args)

    def _shared_session(self, size: int, timeout: float | None, conn: Connection) -> SharedSession | None:
        """This client's shared-memory session on `conn`, opened at the first
        stack of `size` tensor bytes large enough; None when the server is not
        on this host or has it off."""
        if not self._shared_wants(size):
            return None  # without waiting for the lock (held while a session opens)
        with conn.shared_lock:
            now = self._shared_now(conn)
            if now is not True:
                return now
            try:
                opened = self._call("OpenSharedMemory", b"", timeout, conn)
            except FuseportError as e:
                self._no_shared(conn, e)
                conn.shared = None
                return None
            conn.shared = self._shared_open(conn, opened, timeout)
            return conn.shared

    def empty(self, *size: int, dtype: torch.dtype = torch.float32, timeout: float | None = None) -> torch.Tensor:
        """An uninitialized host tensor that calls pass to a server on this host without
        copying it: it lies in shared memory handed to the server when made, so a stack
        that holds it names its bytes where they are (fill it once, call many times).

        Elsewhere (a server on another host, shared memory off on either side, the
        server's budget or region count reached) it is an ordinary tensor, and calls
        copy it as they copy any other. Its memory is freed, on both sides, when the
        last tensor over it dies. Calls on this client's first connection only find it
        (with `connections` > 1, the others copy it). A kernel may read it while you
        write it: as with any shared-memory input, that changes only your own result.

        Args:
            size: Its shape, as for `torch.empty`.
            dtype: Its dtype (one the wire carries).
            timeout: Seconds for opening the session, if this opens it.
        """
        shape = _shape_of(size)
        return _empty(shape, dtype, self._shared_session(self._empty_wants(shape, dtype), timeout, self._pool.first))


    # Device-resident values -------------------------------------------------

    def fetch(
        self, tensors: Sequence[RemoteTensor], *, free: bool = False, timeout: float | None = None
    ) -> list[Any]:
        """The values of several RemoteTensors, in one call.

        Args:
            tensors: RemoteTensors of this client.
            free: Also release them on the server.
            timeout: Seconds for the call; None: the client's `timeout`.

        Returns:
            The tensors, on this host, in the order given.

        Raises:
            HandleNotFound: One was freed, expired, or is another client's
                (HandleElsewhere: it lives on another serving process).
            Unavailable, DeadlineExceeded: As for any call.
        """
        return self._leases.send(self._leases.fetch_tensors(tensors, free), timeout)

    def free(self, tensors: Sequence[RemoteTensor], *, timeout: float | None = None) -> int:
        """Releases several RemoteTensors on the server, in one call (all or none).

        Args:
            tensors: RemoteTensors of this client; ones already freed are skipped.
            timeout: Seconds for the call; None: the client's `timeout`.

        Returns:
            How many were freed.

        Raises:
            HandleNotFound: One expired or is another client's.
            Unavailable, DeadlineExceeded: As for any call.
        """
        request = self._leases.free_tensors(tensors)
        return 0 if request is None else self._leases.send(request, timeout)

    def renew_lease(self, *, timeout: float | None = None) -> _pb.service.ResidentUsage:
        """Renews this client's lease on its RemoteTensors now.

        The client does this in the background while it holds any; a client
        that stops renewing has its values freed once the lease runs out.

        Args:
            timeout: Seconds for the call; None: the client's `timeout`.

        Returns:
            What this client holds on the server, and its limits.

        Raises:
            Unavailable, DeadlineExceeded: As for any call.
        """
        return self._leases.renew(timeout)

    def resident(self, *, timeout: float | None = None) -> _pb.service.ResidentInfo:
        """The server's device-resident values: totals, budget, and this client's own.

        Args:
            timeout: Seconds for the call; None: the client's `timeout`.

        Raises:
            Unauthenticated, PermissionDenied, Unavailable, DeadlineExceeded: As
                for any call.
        """
        return _pb.service.ListResponse.FromString(self._call("List", b"", timeout)).resident

    # Kernels and the server -------------------------------------------------

    def describe(self, key: int, *, include_source: bool = False, timeout: float | None = None) -> KernelInfo:
        """One kernel: its signature, variants, every ArgSpec with its state, run counts.

        Args:
            key: The kernel's key.
            include_source: Also return the generated source of its fused kernels.
            timeout: Seconds for the call; None: the client's `timeout`.

        Returns:
            The kernel's description: its fields as attributes, and `str()` of it a
                readable summary (what `fuseport describe` prints).

        Raises:
            KernelNotFound: The server has no kernel under this key.
            Unauthenticated, PermissionDenied, Unavailable, DeadlineExceeded: As
                for any call.
        """
        request = self._describe_request(key, include_source)
        return self._described(self._call_on_any("Describe", request, timeout))

    def list(self, *, timeout: float | None = None) -> list[KernelInfo]:
        """Every kernel the server holds (without generated source).

        Args:
            timeout: Seconds for the call; None: the client's `timeout`.

        Raises:
            Unauthenticated, PermissionDenied, Unavailable, DeadlineExceeded: As
                for any call.
        """
        return self._listed(self._call_on_any("List", b"", timeout))

    def unregister(self, key: int, *, timeout: float | None = None) -> bool:
        """Removes a kernel from the server (with replicas: from the one the call reaches).

        This client then no longer sends its graphs again where it is missing.

        Args:
            key: The kernel's key.
            timeout: Seconds for the call; None: the client's `timeout`.

        Returns:
            Whether it was there to remove.

        Raises:
            Unauthenticated, PermissionDenied, Unavailable, DeadlineExceeded: As
                for any call.
        """
        request, unregistered = self._unregister_call(key)
        return unregistered(self._call("Unregister", request, timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's gRPC health status (open to every caller, no token needed).

        Args:
            service: The service to ask about; "": the server as a whole.
            timeout: Seconds for the call; None: the client's `timeout`.

        Returns:
            The status name: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", ...

        Raises:
            Unavailable: The server cannot be reached.
            DeadlineExceeded: No answer within the timeout.
        """
        conn = self._pool.acquire()
        try:
            return self._status(
                conn.health.Check(self._health_request(service), timeout=self._timeout(timeout))
            )
        except grpc.RpcError as e:
            raise _translate(e) from e
        finally:
            self._pool.release(conn)


class AsyncClient(_Base):
    """The same client for asyncio: every method is a coroutine.

    >>> async with AsyncClient("127.0.0.1:50051") as c:  # doctest: +SKIP
    ...     out = await c.execute(key, [x, y])

    `execute(..., keep=True)` returns RemoteTensors, as the blocking Client's
    does; `await c.fetch([...])` and `await c.free([...])` are their fetch and
    free. A RemoteTensor's own blocking `fetch()`/`free()` works from another
    thread, and raises TypeError on the client's event loop (it would wait for
    the loop it blocks). close() frees every handle the client still holds.

    The lease is renewed by the blocking client's lease thread (Leases), whose
    calls go through this client's channels on its event loop
    (`_call_from_thread`): one copy of the lease logic, and the client's own
    connections, so renewals reach the serving processes that hold the handles
    (with several processes on one port, a new channel could reach another).
    The price: a loop kept busy for longer than the lease stalls renewals, as
    it stalls every call of the client.

    Shared memory works as the blocking Client's (one SharedSession per
    connection, the same decisions in _Base); its blocking parts, the session's
    copies and socket waits, run in the loop's default executor (_AsyncSlot).
    """

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._bind(aio=True)
        # The loop the channel's calls run on: the last one a call ran on (a
        # grpc.aio channel serves one loop).
        self._loop: asyncio.AbstractEventLoop | None = None
        # Random per client: the server binds the handles this client makes to it.
        self._leases = Leases(self._call_from_thread, self._refuse_on_loop)
        self._leases.calls_carry = not self._pool.many
        self._metadata = (*self._metadata, (CLIENT_ID_KEY, self._leases.client_id))
        # Per connection: one opener of its shared-memory session at a time
        # (`opening`, and `pending`: a session still opening); and the session's
        # slots as a semaphore (`gate`), so that a call waits for one on the
        # loop, never in a thread (threads waiting for slots could take every
        # worker the calls holding them need to finish).
        for conn in self._pool.all:
            conn.opening = asyncio.Lock()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Frees this client's handles on the server, then closes the channels."""
        request = self._leases.closing()
        if request is not None:
            try:
                await self._send(request, self.timeout)
            except FuseportError as e:  # the server is gone: its lease frees them
                log.info("could not free this client's handles on close: %s", e)
        for conn in self._pool.all:
            if conn.shared is not None:
                conn.shared.close()
            if conn.pending is not None:  # a session still opening for a cancelled call
                conn.pending.add_done_callback(_close_opened)
        for channel in self._pool.channels():
            await channel.close()

    async def _call(
        self, method: str, request: bytes, timeout: float | None, conn: Connection | None = None
    ) -> bytes:
        """As Client._call."""
        self._loop = asyncio.get_running_loop()
        pool = self._pool
        if conn is None and pool.many:
            if method in HANDLE_METHODS:
                calls = pool.handle_calls(method, request)
                return calls.join([await self._call(method, body, timeout, c) for c, body, _ in calls.parts])
            conn = pool.acquire()
            try:
                return await self._call(method, request, timeout, conn)
            finally:
                pool.release(conn)
        try:
            return await (conn or pool.first).methods[method](  # type: ignore[no-any-return]
                request, timeout=self._timeout(timeout), metadata=self._metadata or None
            )
        except grpc.RpcError as e:
            raise _translate(e) from e

    async def _call_on_any(self, method: str, request: bytes, timeout: float | None) -> tuple[bytes, str]:
        """As Client._call_on_any."""
        conn = self._pool.acquire()
        try:
            return await self._call_answered(method, request, timeout, conn)
        finally:
            self._pool.release(conn)

    async def _call_answered(
        self, method: str, request: bytes, timeout: float | None, conn: Connection
    ) -> tuple[bytes, str]:
        """A call on `conn`, and the serving process that answered it."""
        self._loop = asyncio.get_running_loop()
        call = conn.methods[method](request, timeout=self._timeout(timeout), metadata=self._metadata or None)
        try:
            return await call, _process_of(await call.trailing_metadata())
        except grpc.RpcError as e:
            raise _translate(e) from e

    async def _send(self, request: Request[T], timeout: float | None) -> T:
        method, body, answer = request
        return answer(await self._call(method, body, timeout))

    def _call_from_thread(self, method: str, request: bytes, timeout: float | None) -> bytes:
        """A blocking call for another thread than the loop's (the lease
        thread, a RemoteTensor's own fetch or free), run on the client's loop."""
        loop = self._loop
        if loop is None:
            raise Unavailable(f"{method}: this AsyncClient has not called the server from an event loop yet")
        self._refuse_on_loop(method)
        coro = self._call(method, request, timeout)
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop is closed
            coro.close()
            raise self._loop_gone(method) from None
        wait = self._timeout(timeout)
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                # In slices: a loop that closes before running the call never
                # resolves it. The call's timeout bounds the wait for the loop too.
                return future.result(_LOOP_POLL_SECONDS)
            except concurrent.futures.TimeoutError:
                if loop.is_closed():
                    future.cancel()
                    if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
                        coro.close()  # the loop never started it: no "never awaited" warning
                    raise self._loop_gone(method) from None
                if deadline is not None and time.monotonic() >= deadline:
                    future.cancel()
                    raise DeadlineExceeded(
                        f"{method}: the AsyncClient's event loop did not run it within {wait} s"
                    ) from None
            except concurrent.futures.CancelledError:  # the loop is ending (asyncio.run cancels its tasks)
                raise self._loop_gone(method) from None

    def _loop_gone(self, method: str) -> Unavailable:
        """The client's loop closed: it cannot call any more (its channel is
        bound to that loop). Its lease thread ends, and the server's lease frees
        its handles, as for a client that died."""
        if not self._leases.closed:
            self._leases.closed = True
            log.warning(
                "an AsyncClient's event loop ended before close(): its handles expire on the server "
                "(--handle-lease-seconds)"
            )
        return Unavailable(
            f"{method}: the AsyncClient's event loop has ended; its handles expire on the server"
        )

    def _refuse_on_loop(self, method: str) -> None:
        """A blocking call on the client's own loop would wait for that loop,
        which it blocks: refused, naming the coroutine to await instead."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is self._loop:
            name = {"FetchHandles": "fetch", "FreeHandles": "free"}.get(method, method)
            raise TypeError(
                f"RemoteTensor.{name}() blocks, and on its AsyncClient's event loop it would wait for the "
                f"loop it blocks: use `await client.{name}([tensor])` (or call it from another thread)"
            )

    async def register(
        self,
        fn_or_module: Any,
        example_inputs: Stack | None = None,
        *,
        variant_of: int | None = None,
        alias: str | None = None,
        batching: bool | None = None,
        timeout: float | None = None,
    ) -> int:
        """As [Client.register][fuseport.client.client.Client.register]: the same arguments, result and errors."""
        op, registered = self._register_call(fn_or_module, example_inputs, variant_of, alias, batching)
        return registered(await self._register(op, timeout))

    async def _register(
        self, op: _Call | _RegisterStream, timeout: float | None, conn: Connection | None = None
    ) -> bytes:
        """As Client._register."""
        if isinstance(op, _Call):
            return await self._call(op.method, op.request, timeout, conn)
        self._loop = asyncio.get_running_loop()
        held = conn or self._pool.acquire()
        sent = _Sent(op.messages())
        try:
            return await held.register_stream(  # type: ignore[no-any-return]
                iter(sent), timeout=self._timeout(timeout), metadata=self._metadata or None
            )
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.UNIMPLEMENTED:
                log.info(
                    "%s has no RegisterStream (an older server): registering the graph as one message",
                    self.target,
                )
                return await self._call("Register", op.unary(), timeout, held)
            error = _translate(e)
            if isinstance(error, InternalError) and not sent.done and sent.first is not None:
                # As for a streamed Execute (_why_stream_ended): the server's refusal of the
                # header (over --max-graph-bytes, say) reaches grpc.aio as a failed write.
                probe = held.register_stream(
                    iter([sent.first]), timeout=self._timeout(timeout), metadata=self._metadata or None
                )
                try:
                    await probe
                except grpc.RpcError as again:
                    told = _translate(again)
                    if not isinstance(told, InvalidArgument):  # the header taken: the stream just ended early
                        raise told from e
            raise error from e
        finally:
            if conn is None:
                self._pool.release(held)

    async def execute_detailed(
        self,
        key: int,
        stack: Stack,
        *,
        wait: bool = False,
        keep: bool = False,
        timeout: float | None = None,
        results_on: str | torch.device | None = None,
    ) -> ExecuteResult:
        """As [Client.execute_detailed][fuseport.client.client.Client.execute_detailed]."""
        return await self._run("Execute", key, stack, wait, timeout, keep, results_on)

    async def fallback_detailed(
        self,
        key: int,
        stack: Stack,
        *,
        keep: bool = False,
        timeout: float | None = None,
        results_on: str | torch.device | None = None,
    ) -> ExecuteResult:
        """As [Client.fallback_detailed][fuseport.client.client.Client.fallback_detailed]."""
        return await self._run("Fallback", key, stack, False, timeout, keep, results_on)

    async def execute(
        self,
        key: int,
        stack: Stack,
        *,
        wait: bool = False,
        keep: bool = False,
        timeout: float | None = None,
        results_on: str | torch.device | None = None,
    ) -> list[Any]:
        """As [Client.execute][fuseport.client.client.Client.execute]."""
        return (await self._run("Execute", key, stack, wait, timeout, keep, results_on)).stack

    async def fallback(
        self,
        key: int,
        stack: Stack,
        *,
        keep: bool = False,
        timeout: float | None = None,
        results_on: str | torch.device | None = None,
    ) -> list[Any]:
        """As [Client.fallback][fuseport.client.client.Client.fallback]."""
        return (await self._run("Fallback", key, stack, False, timeout, keep, results_on)).stack

    async def _run(
        self,
        method: str,
        key: int,
        stack: Stack,
        wait: bool,
        timeout: float | None,
        keep: bool = False,
        results_on: str | torch.device | None = None,
    ) -> ExecuteResult:
        job = _Job(method, key, stack, wait, keep, _results_device(results_on, keep))
        pool = self._pool
        if not pool.many:
            return _moved(await self._job(job, timeout, pool.first), job.results_on)
        conn = pool.acquire(stack)  # as Client._run: the whole call on one connection
        try:
            result = await self._job(job, timeout, conn)
        finally:
            pool.release(conn)
        if keep:
            pool.learn(conn, result.stack)
        return _moved(result, job.results_on)

    async def _job(self, job: _Job, timeout: float | None, conn: Connection) -> ExecuteResult:
        """As Client._job."""
        first = self._unary(job)
        if first is None:
            return await self._drive(self._run_flow(job), timeout, conn)
        try:
            raw, process = await self._call_answered(job.method, first[0], timeout, conn)
        except BaseException as e:  # a cancellation too: the flow gives back the frees it carried
            return await self._drive(self._execute_flow(job, first=first), timeout, conn, failed=e)
        return self._answered(job, raw, process, first[1])

    async def _drive(
        self,
        flow: _Flow[T],
        timeout: float | None,
        conn: Connection,
        held: _AsyncSlot | None = None,
        failed: BaseException | None = None,
    ) -> T:
        """Runs `flow` to its end on `conn`, awaiting each call it asks for; the
        blocking steps of a call in `held` (a shared-memory slot) go to a thread.
        `failed`: as for Client._drive."""
        reply: Any = None
        error: BaseException | None = None
        if failed is not None:
            step = _resume(flow, None, None)
            assert isinstance(step, _Run)
            error = failed
        try:
            while not isinstance(step := _resume(flow, reply, error), _Done):
                try:
                    reply, error = await self._perform(step, timeout, conn, held), None
                except BaseException as e:  # a cancellation too: the flow gives up its shm session
                    reply, error = None, e
        finally:
            error = failed = None  # as in Client._drive: no cycle through this frame
        return step.value  # type: ignore[no-any-return]

    async def _perform(
        self, op: _Op, timeout: float | None, conn: Connection, held: _AsyncSlot | None
    ) -> Any:
        match op:
            case _Call():
                return await self._call(op.method, op.request, timeout, conn)
            case _Run():
                return await self._call_answered(op.method, op.request, timeout, conn)
            case _Stream():
                sent = _Sent(op.requests)
                call = self._open_stream(dataclasses.replace(op, requests=iter(sent)), timeout, conn)
                try:
                    with _reading(call):
                        async for raw in call:
                            op.assembler.feed(raw)
                        return op.assembler, _process_of(await call.trailing_metadata())
                except InternalError:
                    if sent.done or sent.first is None:
                        raise
                    await self._why_stream_ended(op.method, sent.first, timeout, conn)
                    raise
            case _RegisterStream():
                return await self._register(op, timeout, conn)
            case _Session():
                return await self._shared_session(op.size, timeout, conn)
            case _InSlot():
                async with _AsyncSlot(op.session, self._gate(conn, op.session)) as slot:
                    return await self._drive(op.flow(slot.slot), timeout, conn, slot)
            case _Blocking():
                assert held is not None  # a flow asks for blocking steps only in a slot
                return await held.run(op.fn, *op.args)

    async def _why_stream_ended(
        self, method: str, header: bytes, timeout: float | None, conn: Connection
    ) -> None:
        """After a streamed call failed INTERNAL before all of it was sent: grpc.aio
        reports a write that failed because the server had already ended the call
        (a header it refused: over --max-stream-bytes, say) as INTERNAL, and the
        server's own status is lost. The header alone, sent again, gets that status
        (raised here); where the server takes the header (then it answers that the
        stream ended early: InvalidArgument), the INTERNAL stands. Nothing runs."""
        probe = self._open_stream(_Stream(method, iter([header]), Assembler("response")), timeout, conn)
        try:
            with _reading(probe):
                async for _ in probe:
                    pass
        except InvalidArgument:
            return
        except FuseportError as e:
            raise e from None

    async def _shared_session(
        self, size: int, timeout: float | None, conn: Connection
    ) -> SharedSession | None:
        """As Client._shared_session; the session opens in a thread."""
        if not self._shared_wants(size):
            return None
        async with conn.opening:
            with conn.shared_lock:
                now = self._shared_now(conn)
            if now is not True:
                return now
            if conn.pending is None:
                try:
                    opened = await self._call("OpenSharedMemory", b"", timeout, conn)
                except FuseportError as e:
                    self._no_shared(conn, e)
                    with conn.shared_lock:
                        conn.shared = None
                    return None
                loop = asyncio.get_running_loop()
                conn.pending = loop.run_in_executor(None, self._shared_open, conn, opened, timeout)
            # Else a call cancelled while its session opened: the thread went on,
            # and the session it opens is this connection's all the same.
            opening = conn.pending
            try:
                await asyncio.shield(opening)
            finally:
                # Done (even as this call is cancelled): the session is kept. Not yet:
                # the next large call waits for it.
                if opening.done():
                    conn.pending = None
                    if not opening.cancelled() and opening.exception() is None:
                        with conn.shared_lock:
                            conn.shared = opening.result()
            return conn.shared

    @staticmethod
    def _gate(conn: Connection, session: SharedSession) -> asyncio.Semaphore:
        """The semaphore of `session`'s slots (a new one with each session of `conn`)."""
        if conn.gate is None or conn.gate[0] is not session:
            conn.gate = (session, asyncio.Semaphore(session.slots))
        return conn.gate[1]  # type: ignore[no-any-return]

    # Device-resident values -------------------------------------------------

    async def empty(self, *size: int, dtype: torch.dtype = torch.float32, timeout: float | None = None) -> torch.Tensor:
        """As [Client.empty][fuseport.client.client.Client.empty]."""
        shape = _shape_of(size)
        session = await self._shared_session(self._empty_wants(shape, dtype), timeout, self._pool.first)
        if session is None:
            return _empty(shape, dtype, None)
        return await asyncio.get_running_loop().run_in_executor(None, _empty, shape, dtype, session)

    async def fetch(
        self, tensors: Sequence[RemoteTensor], *, free: bool = False, timeout: float | None = None
    ) -> list[Any]:
        """As [Client.fetch][fuseport.client.client.Client.fetch]."""
        return await self._send(self._leases.fetch_tensors(tensors, free), timeout)

    async def free(self, tensors: Sequence[RemoteTensor], *, timeout: float | None = None) -> int:
        """As [Client.free][fuseport.client.client.Client.free]."""
        request = self._leases.free_tensors(tensors)
        return 0 if request is None else await self._send(request, timeout)

    async def renew_lease(self, *, timeout: float | None = None) -> _pb.service.ResidentUsage:
        """As [Client.renew_lease][fuseport.client.client.Client.renew_lease]."""
        return await self._send(self._leases.renew_request(), timeout)

    async def resident(self, *, timeout: float | None = None) -> _pb.service.ResidentInfo:
        """As [Client.resident][fuseport.client.client.Client.resident]."""
        return _pb.service.ListResponse.FromString(await self._call("List", b"", timeout)).resident

    # Kernels and the server -------------------------------------------------

    async def describe(
        self, key: int, *, include_source: bool = False, timeout: float | None = None
    ) -> KernelInfo:
        """As [Client.describe][fuseport.client.client.Client.describe]."""
        request = self._describe_request(key, include_source)
        return self._described(await self._call_on_any("Describe", request, timeout))

    async def list(self, *, timeout: float | None = None) -> list[KernelInfo]:
        """As [Client.list][fuseport.client.client.Client.list]."""
        return self._listed(await self._call_on_any("List", b"", timeout))

    async def unregister(self, key: int, *, timeout: float | None = None) -> bool:
        """As [Client.unregister][fuseport.client.client.Client.unregister]."""
        request, unregistered = self._unregister_call(key)
        return unregistered(await self._call("Unregister", request, timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """As [Client.health][fuseport.client.client.Client.health]."""
        conn = self._pool.acquire()
        try:
            request = self._health_request(service)
            return self._status(await conn.health.Check(request, timeout=self._timeout(timeout)))
        except grpc.RpcError as e:
            raise _translate(e) from e
        finally:
            self._pool.release(conn)
