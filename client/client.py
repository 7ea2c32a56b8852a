"""The Python client: Client (blocking) and AsyncClient (asyncio), one behaviour."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuseport.client.resident import CLIENT_ID_KEY, Leases, RemoteTensor
from fuseport.wire import _pb, codec
from fuseport.wire.capture import capture
from fuseport.wire.errors import (
    ERROR_METADATA_KEY,
    FuseportError,
    KernelNotFound,
    NoMatchingVariant,
    error_from_status,
)
from fuseport.wire.security import (
    bearer_metadata,
    channel_credentials,
    is_loopback,
    open_channel,
    token_from_env,
)

__all__ = ["AsyncClient", "Client", "ExecuteResult", "RemoteTensor", "Timings"]

log = logging.getLogger(__name__)


DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
_SERVICE = "fuseport.v1.KernelService"
_RETRY_BUFFER_BYTES = 16 << 20

# Every fuseport call is idempotent (keys are content addresses, kernels are
# pure), so gRPC may retry all of them when the server is briefly unavailable.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": _SERVICE}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


@dataclass(frozen=True)
class Timings:
    """Where the time of one call went, in microseconds. `total_us` is what the
    client saw, from encoding the request to decoding the response."""

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


@dataclass
class _Known:
    """A kernel this client registered: the function it was captured from (None
    for a graph registered as such) and every graph it registered under the key."""

    fn: Any
    graphs: dict[int, _pb.graph.Graph] = field(default_factory=dict)  # variant key -> graph, in order

    @property
    def arity(self) -> int:
        return len(next(iter(self.graphs.values())).inputs)


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


def _result(raw: bytes, started: int) -> ExecuteResult:
    resp = codec.decode_execute_response(raw)
    t = resp.timings
    reason = _pb.service.FallbackReason.Name(resp.reason).removeprefix("FALLBACK_REASON_").lower()
    return ExecuteResult(
        stack=resp.stack,
        path="fused" if resp.path == _pb.service.PATH_FUSED else "fallback",
        reason="" if reason == "unspecified" else reason,
        detail=resp.detail,
        timings=Timings(t.decode_us, t.queue_us, t.run_us, t.encode_us, (time.perf_counter_ns() - started) // 1000),
        variant=resp.variant,
    )


class _Base:
    """What both clients share: options, the graph cache, request building."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
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
    ) -> None:
        self.target = target
        self.timeout = timeout
        from_files = channel_credentials(tls_ca, tls_cert, tls_key)
        if credentials is not None and from_files is not None:
            raise ValueError("give either credentials= or tls_ca/tls_cert/tls_key, not both")
        self._credentials = credentials or from_files
        if tls_server_name:
            # The name the server's certificate must carry, when it is not the
            # target's host (a health check that reaches the server as 127.0.0.1).
            options = [*options, ("grpc.ssl_target_name_override", tls_server_name)]
        self._options = _channel_options(max_message_bytes, options)
        # None reads FUSEPORT_TOKEN; "" means no token whatever the environment says.
        self._metadata = bearer_metadata(token_from_env() if token is None else token)
        if self._metadata and self._credentials is None and not is_loopback(target.rsplit(":", 1)[0]):
            log.warning("sending a token to %s without TLS: anyone on the path can read it", target)
        self._max = max_message_bytes
        # Kernels this client registered, so that a server that lost them (a
        # restart without its store, another replica) can be healed, and new
        # variants captured for stacks the registered ones do not cover.
        self._known: dict[int, _Known] = {}
        # Kernels this client unregistered itself: NOT_FOUND for one says so, and
        # is not healed (registering it again would undo the user's own call).
        self._unregistered: set[int] = set()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    @staticmethod
    def _graph_of(fn_or_graph: Any, example_inputs: Sequence[Any] | None) -> _pb.graph.Graph:
        if isinstance(fn_or_graph, _pb.graph.Graph):
            return fn_or_graph
        if example_inputs is None:
            raise TypeError("register(fn_or_module, example_inputs): example inputs are needed to capture")
        return capture(fn_or_graph, list(example_inputs))

    def _execute_request(self, key: int, stack: Sequence[Any], wait: bool, keep: bool = False) -> bytes:
        # A client that registered the kernel runs only the variants it
        # registered itself: another client's graph under the same key is
        # never trusted with this client's function.
        known = self._known.get(key)
        variants = list(known.graphs) if known else ()
        values = self._wire_stack(stack)
        return codec.encode_execute_request(
            key, values, wait_for_compile=wait, limit=self._max, variants=variants, keep_outputs=keep
        )

    def _wire_stack(self, stack: Sequence[Any]) -> list[Any]:
        """The stack as it travels (RemoteTensors become handles); the async
        client has no RemoteTensors, so they cannot travel from it."""
        return list(stack)

    # Requests and their parsers, shared by both clients (which differ only in
    # how they wait for the call).

    def _register_call(
        self, fn_or_graph: Any, example_inputs: Sequence[Any] | None, variant_of: int | None = None
    ) -> tuple[bytes, Callable[[bytes], int]]:
        graph = self._graph_of(fn_or_graph, example_inputs)
        fn = None if isinstance(fn_or_graph, _pb.graph.Graph) else fn_or_graph
        return self._register_graph(graph, fn, variant_of)

    def _register_graph(
        self, graph: _pb.graph.Graph, fn: Any, variant_of: int | None
    ) -> tuple[bytes, Callable[[bytes], int]]:
        def registered(raw: bytes) -> int:
            resp = _pb.service.RegisterResponse.FromString(raw)
            self._unregistered.discard(resp.key)
            known = self._known.setdefault(resp.key, _Known(fn))
            if known.fn is None:
                known.fn = fn
            known.graphs[resp.variant] = graph
            return resp.key

        request = _pb.service.RegisterRequest(graph=graph)
        if variant_of is not None:
            request.variant_of = variant_of
        return request.SerializeToString(), registered

    def _recovery(
        self, e: FuseportError, key: int, stack: Sequence[Any]
    ) -> list[tuple[bytes, Callable[[bytes], int]]] | None:
        """The Register calls that let a failed Execute succeed when retried, or
        None when there are none (the error stands).

        * NOT_FOUND for a kernel this client registered: the server lost it
          (a restart without its store, another replica): register every graph again.
        * NoMatchingVariant for a kernel registered from a function: capture
          the function again on these very inputs and add that variant.
        """
        known = self._known.get(key)
        if known is None:
            if isinstance(e, KernelNotFound) and key in self._unregistered:
                raise KernelNotFound(f"{e}: this client unregistered it; register it again to use it", key) from e
            return None
        if isinstance(e, KernelNotFound):
            log.info("server lost kernel %d; registering it again", key)
            graphs = list(known.graphs.items())
            return [self._register_graph(g, known.fn, None if v == key else key) for v, g in graphs]
        if isinstance(e, NoMatchingVariant) and known.fn is not None and len(stack) >= known.arity:
            inputs = list(stack[len(stack) - known.arity :])
            if any(isinstance(v, RemoteTensor) for v in inputs):
                # Capture needs the values here; a RemoteTensor's are on the server.
                log.info("kernel %d: no variant covers these inputs, and RemoteTensors cannot be captured on", key)
                return None
            log.info("kernel %d: no variant covers these inputs; capturing one (%s)", key, e)
            try:
                graph = capture(known.fn, inputs)
            except FuseportError as capture_error:
                # Inputs the function cannot take (a string for a float): the
                # server's message says what is wrong with them.
                log.info("kernel %d: cannot capture for these inputs: %s", key, capture_error)
                return None
            return [self._register_graph(graph, known.fn, key)]
        return None

    @staticmethod
    def _describe_request(key: int, include_source: bool) -> bytes:
        return _pb.service.DescribeRequest(key=key, include_source=include_source).SerializeToString()

    @staticmethod
    def _described(raw: bytes) -> _pb.service.KernelInfo:
        return _pb.service.DescribeResponse.FromString(raw).kernel

    @staticmethod
    def _listed(raw: bytes) -> list[_pb.service.KernelInfo]:
        return list(_pb.service.ListResponse.FromString(raw).kernels)

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

    def __init__(self, target: str = DEFAULT_TARGET, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self.channel = open_channel(target, self._credentials, self._options)
        self._methods = {
            name: self.channel.unary_unary(f"/{_SERVICE}/{name}")
            for name in (
                "Register", "Execute", "Fallback", "Describe", "List", "Unregister",
                "FetchHandles", "FreeHandles", "RenewLease",
            )
        }  # fmt: skip
        self._health = health_pb2_grpc.HealthStub(self.channel)
        # Random per client: the server binds the handles this client makes to it.
        self._leases = Leases(self._call)
        self._metadata = (*self._metadata, (CLIENT_ID_KEY, self._leases.client_id))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Frees this client's handles on the server, then closes the channel."""
        self._leases.close(self.timeout)
        self.channel.close()

    @property
    def client_id(self) -> str:
        """The random id this client sends as "fuseport-client-id" metadata."""
        return self._leases.client_id

    def _wire_stack(self, stack: Sequence[Any]) -> list[Any]:
        return [self._leases.to_wire(v) for v in stack]

    def _call(self, method: str, request: bytes, timeout: float | None) -> bytes:
        try:
            return self._methods[method](  # type: ignore[no-any-return]
                request, timeout=self._timeout(timeout), metadata=self._metadata or None
            )
        except grpc.RpcError as e:
            raise _translate(e) from e

    def register(
        self,
        fn_or_module: Any,
        example_inputs: Sequence[Any] | None = None,
        *,
        variant_of: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """Captures `fn_or_module` on `example_inputs` (or takes a Graph) and registers it.

        Returns the kernel's key. With `variant_of`, the graph becomes another
        variant of that kernel (for stacks its variants do not cover); a client
        that registered a function does this by itself when a stack needs it."""
        request, registered = self._register_call(fn_or_module, example_inputs, variant_of)
        return registered(self._call("Register", request, timeout))

    def execute_detailed(
        self,
        key: int,
        stack: Sequence[Any],
        *,
        wait: bool = False,
        keep: bool = False,
        timeout: float | None = None,
    ) -> ExecuteResult:
        """Execute, with which path ran, why, and where the time went."""
        return self._run("Execute", key, stack, wait, timeout, keep)

    def fallback_detailed(
        self, key: int, stack: Sequence[Any], *, keep: bool = False, timeout: float | None = None
    ) -> ExecuteResult:
        return self._run("Fallback", key, stack, False, timeout, keep)

    def execute(
        self,
        key: int,
        stack: Sequence[Any],
        *,
        wait: bool = False,
        keep: bool = False,
        timeout: float | None = None,
    ) -> list[Any]:
        """The resulting stack: the kernel's inputs on top are replaced by its outputs.

        With `keep`, tensor outputs stay on the server's device and come back
        as RemoteTensors (stack values for later calls of this client)."""
        return self.execute_detailed(key, stack, wait=wait, keep=keep, timeout=timeout).stack

    def fallback(
        self, key: int, stack: Sequence[Any], *, keep: bool = False, timeout: float | None = None
    ) -> list[Any]:
        return self.fallback_detailed(key, stack, keep=keep, timeout=timeout).stack

    def _run(
        self, method: str, key: int, stack: Sequence[Any], wait: bool, timeout: float | None, keep: bool = False
    ) -> ExecuteResult:
        started = time.perf_counter_ns()
        try:
            raw = self._call(method, self._execute_request(key, stack, wait, keep), timeout)
        except FuseportError as e:
            steps = self._recovery(e, key, stack)
            if steps is None:
                raise
            for request, registered in steps:
                registered(self._call("Register", request, timeout))
            raw = self._call(method, self._execute_request(key, stack, wait, keep), timeout)
        result = _result(raw, started)
        if any(isinstance(v, (codec.Handle, list)) for v in result.stack):
            result = dataclasses.replace(result, stack=[self._leases.adopt(v) for v in result.stack])
        return result

    # Device-resident values -------------------------------------------------

    def fetch(
        self, tensors: Sequence[RemoteTensor], *, free: bool = False, timeout: float | None = None
    ) -> list[Any]:
        """The values of several RemoteTensors in one call (freed too, with `free`)."""
        handles = [t.handle() for t in tensors]
        out = self._leases.fetch([h.id for h in handles], free, timeout)
        if free:
            for t in tensors:
                t._forget()
        return out

    def free(self, tensors: Sequence[RemoteTensor], *, timeout: float | None = None) -> int:
        """Frees several RemoteTensors in one call (all or none); returns how many."""
        live = [t for t in tensors if not t.freed]
        ids = [t.handle().id for t in live]
        if not ids:
            return 0
        freed = self._leases.free(ids, timeout)
        for t in live:
            t._forget()
        return freed

    def renew_lease(self, *, timeout: float | None = None) -> _pb.service.ResidentUsage:
        """Renews this client's lease now (done in the background while it holds
        RemoteTensors); says what it holds and its limits."""
        return self._leases.renew(timeout)

    def resident(self, *, timeout: float | None = None) -> _pb.service.ResidentInfo:
        """The server's device-resident values: totals, budget, and this client's own."""
        return _pb.service.ListResponse.FromString(self._call("List", b"", timeout)).resident

    def describe(self, key: int, *, include_source: bool = False, timeout: float | None = None) -> _pb.service.KernelInfo:
        """Signature, every ArgSpec with its state, run counts, generated source."""
        return self._described(self._call("Describe", self._describe_request(key, include_source), timeout))

    def list(self, *, timeout: float | None = None) -> list[_pb.service.KernelInfo]:
        return self._listed(self._call("List", b"", timeout))

    def unregister(self, key: int, *, timeout: float | None = None) -> bool:
        request, unregistered = self._unregister_call(key)
        return unregistered(self._call("Unregister", request, timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's health status name: "SERVING", "NOT_SERVING", ..."""
        try:
            return self._status(self._health.Check(self._health_request(service), timeout=self._timeout(timeout)))
        except grpc.RpcError as e:
            raise _translate(e) from e


class AsyncClient(_Base):
    """The same client for asyncio: every method is a coroutine.

    >>> async with AsyncClient("127.0.0.1:50051") as c:  # doctest: +SKIP
    ...     out = await c.execute(key, [x, y])
    """

    def __init__(self, target: str = DEFAULT_TARGET, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self.channel = open_channel(target, self._credentials, self._options, aio=True)
        self._methods = {
            name: self.channel.unary_unary(f"/{_SERVICE}/{name}")
            for name in ("Register", "Execute", "Fallback", "Describe", "List", "Unregister")
        }
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: str, request: bytes, timeout: float | None) -> bytes:
        try:
            return await self._methods[method](  # type: ignore[no-any-return]
                request, timeout=self._timeout(timeout), metadata=self._metadata or None
            )
        except grpc.RpcError as e:
            raise _translate(e) from e

    async def register(
        self,
        fn_or_module: Any,
        example_inputs: Sequence[Any] | None = None,
        *,
        variant_of: int | None = None,
        timeout: float | None = None,
    ) -> int:
        request, registered = self._register_call(fn_or_module, example_inputs, variant_of)
        return registered(await self._call("Register", request, timeout))

    async def execute_detailed(
        self, key: int, stack: Sequence[Any], *, wait: bool = False, timeout: float | None = None
    ) -> ExecuteResult:
        return await self._run("Execute", key, stack, wait, timeout)

    async def fallback_detailed(self, key: int, stack: Sequence[Any], *, timeout: float | None = None) -> ExecuteResult:
        return await self._run("Fallback", key, stack, False, timeout)

    async def execute(
        self, key: int, stack: Sequence[Any], *, wait: bool = False, timeout: float | None = None
    ) -> list[Any]:
        return (await self.execute_detailed(key, stack, wait=wait, timeout=timeout)).stack

    async def fallback(self, key: int, stack: Sequence[Any], *, timeout: float | None = None) -> list[Any]:
        return (await self.fallback_detailed(key, stack, timeout=timeout)).stack

    async def _run(
        self, method: str, key: int, stack: Sequence[Any], wait: bool, timeout: float | None
    ) -> ExecuteResult:
        started = time.perf_counter_ns()
        try:
            raw = await self._call(method, self._execute_request(key, stack, wait), timeout)
        except FuseportError as e:
            steps = self._recovery(e, key, stack)
            if steps is None:
                raise
            for request, registered in steps:
                registered(await self._call("Register", request, timeout))
            raw = await self._call(method, self._execute_request(key, stack, wait), timeout)
        return _result(raw, started)

    async def describe(
        self, key: int, *, include_source: bool = False, timeout: float | None = None
    ) -> _pb.service.KernelInfo:
        return self._described(await self._call("Describe", self._describe_request(key, include_source), timeout))

    async def list(self, *, timeout: float | None = None) -> list[_pb.service.KernelInfo]:
        return self._listed(await self._call("List", b"", timeout))

    async def unregister(self, key: int, *, timeout: float | None = None) -> bool:
        request, unregistered = self._unregister_call(key)
        return unregistered(await self._call("Unregister", request, timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        try:
            return self._status(await self._health.Check(self._health_request(service), timeout=self._timeout(timeout)))
        except grpc.RpcError as e:
            raise _translate(e) from e
