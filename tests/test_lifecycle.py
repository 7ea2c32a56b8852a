"""Errors, persistence, concurrency, shutdown and interoperability, against real servers."""

from __future__ import annotations

import random
import signal
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from fuseport.client import (
    Client,
    DeadlineExceeded,
    ExecutionFailed,
    KernelNotFound,
    NoMatchingVariant,
    OpNotAllowed,
    ResourceExhausted,
    SignatureMismatch,
    Unavailable,
    capture,
)
from fuseport.wire import _pb

from .conftest import ServerProcess, start_server


def _status(exc: pytest.ExceptionInfo) -> grpc.StatusCode:
    cause = exc.value.__cause__
    assert isinstance(cause, grpc.RpcError), "typed errors are raised from the grpc.RpcError"
    return cause.code()


def _double(x):
    return x * 2


# ---------------------------------------------------------------- errors keep the server serving


@pytest.mark.compat
def test_unknown_key_is_not_found_and_next_call_succeeds(client: Client) -> None:
    with pytest.raises(KernelNotFound, match="no kernel with key 123; register it first") as e:
        client.execute(123, [torch.ones(2)])
    assert _status(e) is grpc.StatusCode.NOT_FOUND
    key = client.register(_double, [torch.ones(2)])
    torch.testing.assert_close(client.fallback(key, [torch.ones(2)])[0], torch.full((2,), 2.0))


@pytest.mark.compat
def test_malformed_stack_is_invalid_argument_naming_the_element(server: ServerProcess, client: Client) -> None:
    key = client.register(_double, [torch.ones(4, 4)])
    bad = _pb.service.ExecuteRequest(
        key=key,
        stack=[
            _pb.values.Value(int_value=1),
            _pb.values.Value(tensor=_pb.values.Tensor(dtype=_pb.values.DTYPE_FLOAT32, shape=[4, 4], data=bytes(60))),
        ],
    ).SerializeToString()
    with grpc.insecure_channel(server.target) as ch:
        call = ch.unary_unary("/fuseport.v1.KernelService/Execute")
        with pytest.raises(grpc.RpcError) as e:
            call(bad, timeout=30)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "stack[1]: float32 tensor of shape [4, 4] needs 64 bytes, got 60"
    assert ("fuseport-error", "InvalidStack") in e.value.trailing_metadata()
    torch.testing.assert_close(client.fallback(key, [torch.ones(4, 4)])[0], torch.full((4, 4), 2.0))


def test_disallowed_op_is_rejected_naming_the_op(client: Client) -> None:
    graph = capture(_double, [torch.ones(3)])
    graph.nodes[0].op = "aten::_foreach_add.Scalar"
    with pytest.raises(OpNotAllowed, match="aten::_foreach_add.Scalar") as e:
        client.register(graph)
    assert _status(e) is grpc.StatusCode.INVALID_ARGUMENT
    graph.nodes[0].op = "builtins::eval"
    with pytest.raises(OpNotAllowed, match="builtins::eval"):
        client.register(graph)
    assert client.health() == "SERVING"


@pytest.mark.compat
def test_wrong_arity_kind_and_dtype_name_the_input(client: Client) -> None:
    def f(x, alpha):
        return x * alpha

    # Registered as a graph: the client has no function to capture a variant
    # from, so what the server says about the inputs reaches the caller.
    key = client.register(capture(f, [torch.ones(3), 2.0]))
    with pytest.raises(SignatureMismatch, match="takes 2 inputs but the stack holds 1 value$"):
        client.execute(key, [torch.ones(3)])
    with pytest.raises(NoMatchingVariant, match=r"stack\[1\].*'alpha'.*expected a float, got a str"):
        client.execute(key, [torch.ones(3), "two"])
    with pytest.raises(NoMatchingVariant, match=r"stack\[0\].*expected a float32 tensor, got int64"):
        client.execute(key, [torch.ones(3, dtype=torch.int64), 2.0])


def test_client_with_the_function_captures_a_variant_for_another_dtype(client: Client) -> None:
    def f(x, alpha):
        return x * alpha

    key = client.register(f, [torch.ones(3), 2.0])
    x = torch.arange(3)
    out = client.execute(key, [x, 2.0])[0]
    assert out.dtype == torch.float32 and torch.equal(out, f(x, 2.0))
    # A string is no input of the function: nothing to capture, the server's word stands.
    with pytest.raises(NoMatchingVariant, match=r"stack\[1\].*'alpha'.*expected a float, got a str"):
        client.execute(key, [torch.ones(3), "two"])


def test_a_graph_specialised_on_a_nan_scalar_accepts_nan(client: Client) -> None:
    # NaN is not equal to itself: the static check compared with != and refused NaN for NaN.
    key = client.register(lambda x, a: x * a, [torch.ones(3), float("nan")])
    out = client.execute(key, [torch.ones(3), float("nan")])[0]
    assert out.shape == (3,) and bool(out.isnan().all()), out


def test_static_input_accepts_only_its_captured_value(client: Client) -> None:
    def f(x, double):
        return x * 2 if double else x + 0

    graph = capture(f, [torch.ones(3), True])  # a bool shapes the graph: static
    key = client.register(graph)
    torch.testing.assert_close(client.execute(key, [torch.ones(3), True])[0], torch.full((3,), 2.0))
    with pytest.raises(NoMatchingVariant, match=r"stack\[1\].*'double'.*static.*only True is accepted, got False"):
        client.execute(key, [torch.ones(3), False])
    # With the function, the client captures the other value as a variant of the same key.
    with Client(client.target, timeout=120) as c:
        assert c.register(f, [torch.ones(3), True]) == key
        torch.testing.assert_close(c.execute(key, [torch.ones(3), False])[0], torch.ones(3))


def test_shapes_that_do_not_broadcast_fail_as_invalid_argument(client: Client) -> None:
    def f(x, y):
        return x + y

    # With its conditions, the graph refuses sizes that do not match by name.
    key = client.register(capture(f, [torch.ones(4), torch.ones(4)]))
    with pytest.raises(NoMatchingVariant, match=r"y.shape\[0\] == x.shape\[0\] does not hold \(y.shape\[0\] = 5"):
        client.execute(key, [torch.ones(4), torch.ones(5)], wait=True)
    # A hand-made graph that claims no conditions: the shape error is found
    # before either path runs (the same for both), never by a compile.
    bare = capture(lambda x, y: x + y + 0, [torch.ones(4), torch.ones(4)])
    del bare.conditions[:]
    key = client.register(bare)
    for run in (client.execute, client.fallback):
        with pytest.raises(ExecutionFailed, match="failed on these inputs.*aten::add.Tensor"):
            run(key, [torch.ones(4), torch.ones(5)])
    res = client.execute_detailed(key, [torch.ones(4), torch.ones(4)], wait=True)
    assert res.path == "fused", (res.reason, res.detail)
    torch.testing.assert_close(res.stack[0], torch.full((4,), 2.0))


@pytest.mark.compat
def test_out_of_memory_is_resource_exhausted_and_server_keeps_serving(client: Client) -> None:
    def blow_up(x):
        # 2**21 x 2**20 float32 = 8 TiB in the middle: no allocator can satisfy it.
        return (x.reshape(1, -1).expand(2**21, -1) * 2).sum()

    key = client.register(blow_up, [torch.ones(2**20)])
    for run in (client.fallback, client.execute):
        with pytest.raises(ResourceExhausted, match="out of memory.*8796093022208 bytes.*refused before running") as e:
            run(key, [torch.ones(2**20)])
        assert _status(e) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.health() == "SERVING"
    key2 = client.register(_double, [torch.ones(2)])
    torch.testing.assert_close(client.fallback(key2, [torch.ones(2)])[0], torch.full((2,), 2.0))


def _uncached_constant() -> float:
    """A constant no earlier run compiled: Inductor's on-disk cache cannot make
    the compile instant, so it is still running when the test needs it to be."""
    return 1 + random.random()


@pytest.mark.compat
def test_deadline_exceeded_while_waiting_for_compile(client: Client) -> None:
    c = _uncached_constant()

    def f(x):
        return torch.erf(x) * c + 3

    key = client.register(f, [torch.randn(9)])
    with pytest.raises(DeadlineExceeded) as e:
        client.execute(key, [torch.randn(9)], wait=True, timeout=0.05)
    assert _status(e) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.execute_detailed(key, [torch.randn(9)]).stack[0].shape == (9,)


@pytest.mark.compat
def test_unregister_frees_and_the_client_heals_a_lost_kernel(server: ServerProcess, client: Client) -> None:
    def f(x):
        return x.abs() + 4

    key = client.register(f, [torch.randn(3)])
    store_file = server.store_dir / f"{key & (2**64 - 1):016x}.pb"
    assert store_file.exists()
    with Client(server.target) as other:  # someone else removes it
        assert other.unregister(key) is True
        assert other.unregister(key) is False
        with pytest.raises(KernelNotFound, match="this client unregistered it"):
            other.execute(key, [torch.randn(3)])
    assert not store_file.exists()
    with Client(server.target) as bystander, pytest.raises(KernelNotFound) as info:
        bystander.execute(key, [torch.randn(3)])  # never knew it: a plain NOT_FOUND
    assert "unregistered" not in str(info.value)
    x = torch.randn(3)
    # This client registered it, so it registers it again and retries once.
    torch.testing.assert_close(client.execute(key, [x])[0], f(x))


@pytest.mark.compat
def test_unreachable_server_raises_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=5) as c:
        with pytest.raises(Unavailable):
            c.list()


# ---------------------------------------------------------------- interop, health, reflection


@pytest.mark.compat
def test_generated_stubs_and_plain_protobuf_talk_to_the_server(server: ServerProcess, client: Client) -> None:
    """What a client in another language does: its own generated code, no fuseport codec."""
    from fuseport.v1 import service_pb2, service_pb2_grpc, values_pb2

    key = client.register(_double, [torch.ones(2, 2)])
    x = torch.arange(4, dtype=torch.float32).reshape(2, 2)
    request = service_pb2.ExecuteRequest(
        key=key,
        options=service_pb2.ExecuteOptions(wait_for_compile=True),
        stack=[
            values_pb2.Value(string_value="below"),
            values_pb2.Value(tensor=values_pb2.Tensor(dtype=values_pb2.DTYPE_FLOAT32, shape=[2, 2], data=struct.pack("<4f", *x.flatten().tolist()))),
        ],
    )
    with grpc.insecure_channel(server.target) as ch:
        # This call waits for the kernel's first compile, which CI's compat slice runs
        # beside the whole suite on two cores: 120 s was seen to pass before it ended.
        # The deadline is there to end a hang, not to time the compile.
        resp = service_pb2_grpc.KernelServiceStub(ch).Execute(request, timeout=900)
    assert resp.path == service_pb2.PATH_FUSED
    assert resp.stack[0].string_value == "below"
    out = resp.stack[1].tensor
    assert list(out.shape) == [2, 2] and out.dtype == values_pb2.DTYPE_FLOAT32
    assert torch.equal(torch.frombuffer(bytearray(out.data), dtype=torch.float32).reshape(2, 2), x * 2)


@pytest.mark.compat
def test_reflection_lists_the_services(server: ServerProcess) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.target) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"fuseport.v1.KernelService", "grpc.health.v1.Health"} <= services


# ---------------------------------------------------------------- concurrency


def test_concurrent_register_of_one_graph_gives_one_key_and_one_spec(server: ServerProcess, client: Client) -> None:
    def f(x):
        return torch.tanh(x) * 5

    graph = capture(f, [torch.randn(6)])
    barrier = threading.Barrier(8)

    def register(_: int) -> int:
        with Client(server.target, timeout=60) as c:
            barrier.wait()
            return c.register(graph)

    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(register, range(8)))
    assert len(keys) == 1
    key = keys.pop()
    assert [k.key for k in client.list()].count(key) == 1
    name = f"{key & (2**64 - 1):016x}.pb"
    assert [p.name for p in server.store_dir.iterdir()].count(name) == 1
    assert not [p for p in server.store_dir.iterdir() if p.name.startswith(".tmp")]


# ---------------------------------------------------------------- persistence and shutdown


def test_restart_after_kill_keeps_every_registered_key(tmp_path: Path) -> None:
    store = tmp_path / "store"
    # No compiles: the store is the point, and restarts are quicker without the warm-up.
    first = start_server(tmp_path / "a", store, "--compile-mode", "off")
    functions = [lambda x: x + 1, lambda x: x * x, lambda x: torch.exp(x) - 1]
    try:
        with Client(first.target, timeout=60) as c:
            keys = [c.register(fn, [torch.randn(4)]) for fn in functions]
    finally:
        first.stop(signal.SIGKILL)  # no chance to flush anything after Register returned
    # What a crash mid-write leaves behind: read by nobody, removed at start.
    (store / ".tmp-crashed.pb").write_bytes(b"half a graph")
    second = start_server(tmp_path / "b", store, "--compile-mode", "off")
    try:
        with Client(second.target, timeout=60) as c:
            assert sorted(k.key for k in c.list()) == sorted(keys)
            x = torch.randn(4)
            for fn, key in zip(functions, keys):
                torch.testing.assert_close(c.fallback(key, [x])[0], fn(x))
        assert not (store / ".tmp-crashed.pb").exists()
        assert "removing .tmp-crashed.pb" in second.log()
    finally:
        second.stop()


def test_sigterm_drains_an_in_flight_call_and_refuses_new_ones(tmp_path: Path) -> None:
    server = start_server(tmp_path, None, "--grace-seconds", "120")
    try:
        with Client(server.target, timeout=120) as c:
            scale = _uncached_constant()

            def f(x):
                return torch.sinh(x) * scale

            key = c.register(f, [torch.randn(3)])
            x = torch.randn(3)
            with ThreadPoolExecutor(1) as pool:
                # In flight: it waits for a compile that takes seconds.
                pending = pool.submit(c.execute_detailed, key, [x], wait=True)
                deadline = time.monotonic() + 60
                # The call is in flight once the server lists its ArgSpec as compiling.
                while not c.describe(key).arg_specs:
                    assert not pending.done(), pending.result()
                    assert time.monotonic() < deadline, "the Execute never reached the server"
                server.proc.send_signal(signal.SIGTERM)
                result = pending.result(timeout=120)
            assert result.path == "fused"
            torch.testing.assert_close(result.stack[0], f(x))
        assert server.proc.wait(timeout=60) == 0
        with Client(server.target, timeout=5) as c, pytest.raises(Unavailable):
            c.list()
    finally:
        server.stop(signal.SIGKILL)


def test_message_over_the_limit_is_resource_exhausted_with_the_limit(tmp_path: Path) -> None:
    server = start_server(tmp_path, None, "--max-message-bytes", "1000000", "--compile-mode", "off")
    try:
        # The network's messages (next to the server, this stack would take shared memory).
        with Client(server.target, timeout=60, shared_memory=False) as c:
            key = c.register(_double, [torch.ones(4)])
            with pytest.raises(ResourceExhausted, match="1000000"):
                # Over the server's limit: the client's own limit is higher.
                c.execute(key, [torch.ones(300_000)])
            torch.testing.assert_close(c.fallback(key, [torch.ones(4)])[0], torch.full((4,), 2.0))
            # A response over the limit: the request fits, the result does not. The server
            # refuses it before running (ResultTooLarge) and the client streams it instead.
            def grow(x):
                return x.repeat(4)

            key2 = c.register(grow, [torch.ones(4)])
            r = c.fallback_detailed(key2, [torch.arange(100_000.0)])
            assert r.transport == "stream" and torch.equal(r.stack[0], torch.arange(100_000.0).repeat(4))
            assert c.health() == "SERVING"
    finally:
        server.stop()

