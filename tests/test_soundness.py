"""Capture is sound: a graph never answers for a stack outside what export proved, and one key serves every rank.

Each function here branches on something capture could specialise away (a
size, an equality of sizes, an int or a float). Every test runs the kernel
through the real server on stacks the first capture did not cover and checks
the eager result on both paths; a raw gRPC client, which cannot capture, gets
SignatureMismatch naming the condition instead of a wrong answer.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from fuseport.client import Client, NoMatchingVariant, SignatureMismatch, capture
from fuseport.v1 import service_pb2, service_pb2_grpc, values_pb2
from fuseport.wire.graph import signature_of

from .conftest import ServerProcess


def _both_paths(client: Client, key: int, stack: list, expected: torch.Tensor) -> None:
    fused = client.execute_detailed(key, stack, wait=True)
    unfused = client.fallback_detailed(key, stack)
    for res in (fused, unfused):
        torch.testing.assert_close(res.stack[-1], expected, rtol=0, atol=0)
    assert fused.path == "fused", (fused.reason, fused.detail)


def _raw_execute(target: str, key: int, tensor: torch.Tensor) -> grpc.RpcError:
    """What a client in another language does: generated stubs only. Returns the error it gets."""
    t = tensor.contiguous()
    value = values_pb2.Value(
        tensor=values_pb2.Tensor(dtype=values_pb2.DTYPE_FLOAT32, shape=list(t.shape), data=t.numpy().tobytes())
    )
    with grpc.insecure_channel(target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            service_pb2_grpc.KernelServiceStub(ch).Execute(service_pb2.ExecuteRequest(key=key, stack=[value]), timeout=60)
    return e.value


# ---------------------------------------------------------------- the three wrong answers


def test_branch_on_a_size_is_not_served_outside_the_range_it_was_captured_for(client: Client) -> None:
    def f(x):
        return x * 2 if x.shape[0] > 3 else x - 1

    key = client.register(f, [torch.randn(4)])
    _both_paths(client, key, [torch.ones(2)], torch.zeros(2))  # eager: [0, 0]; the old server said [2, 2]
    _both_paths(client, key, [torch.ones(6)], torch.full((6,), 2.0))
    variants = client.describe(key).variants
    assert len(variants) == 2
    assert "x.shape[0] >= 4" in variants[0].conditions
    assert variants[0].variant == key


def test_size_one_is_not_served_by_a_graph_captured_for_larger_sizes(client: Client) -> None:
    def f(x):
        return x + 100 if x.shape[0] == 1 else x * 2

    key = client.register(f, [torch.randn(4)])
    _both_paths(client, key, [torch.ones(1)], torch.tensor([101.0]))  # the old server said [2.]
    _both_paths(client, key, [torch.ones(3)], torch.full((3,), 2.0))


def test_branch_on_a_float_scalar_is_never_baked_in(client: Client) -> None:
    def f(x, a):
        return x * a if a > 0 else x * 0 - 100

    key = client.register(f, [torch.randn(3), 0.5])
    assert signature_of(capture(f, [torch.randn(3), 0.5])).inputs[1].static
    # Both 0.5 and 0.5 * 1.37 + 0.61 take the first branch: one perturbation could not tell.
    _both_paths(client, key, [torch.ones(3), -1.0], torch.full((3,), -100.0))  # the old server said -1
    _both_paths(client, key, [torch.ones(3), 2.0], torch.full((3,), 2.0))
    _both_paths(client, key, [torch.ones(3), 0.5], torch.full((3,), 0.5))


def test_float_used_only_as_data_stays_an_input(client: Client) -> None:
    def f(x, a):
        return torch.clamp(x * a + 1, max=a)

    graph = capture(f, [torch.randn(3), 0.5])
    assert not signature_of(graph).inputs[1].static
    key = client.register(f, [torch.randn(3), 0.5])
    x = torch.randn(5)
    for a in (-2.0, 0.25, 3.0):
        _both_paths(client, key, [x, a], f(x, a))
    assert len(client.describe(key).variants) == 1


def test_branch_on_an_int_scalar_becomes_a_condition(client: Client) -> None:
    def f(x, n):
        return x * n if n > 2 else x - n

    graph = capture(f, [torch.randn(4), 5])
    assert not signature_of(graph).inputs[1].static
    assert "n >= 3" in [c.text for c in signature_of(graph).conditions]
    key = client.register(f, [torch.randn(4), 5])
    x = torch.randn(4)
    for n in (7, 1, -3):
        _both_paths(client, key, [x, n], f(x, n))


def test_equalities_and_divisibility_of_sizes_are_conditions(client: Client) -> None:
    def f(x, y):
        return x.view(-1, 2) + y

    texts = [c.text for c in signature_of(capture(f, [torch.randn(8), torch.randn(4, 2)])).conditions]
    assert "x.shape[0] % 2 == 0" in texts and "x.shape[0] // 2 == y.shape[0]" in texts
    key = client.register(f, [torch.randn(8), torch.randn(4, 2)])
    for n in (6, 2):  # 2: y has one row, which broadcasts: a variant of its own
        x, y = torch.randn(n), torch.randn(n // 2, 2)
        _both_paths(client, key, [x, y], f(x, y))


# ---------------------------------------------------------------- one key, every rank


def test_one_key_serves_every_rank(client: Client) -> None:
    def f(t):
        return t * 2 + 1

    key = client.register(f, (torch.randn(3, 5),))
    for shape in [(7,), (), (2, 3, 4), (1, 5), (0, 5)]:
        t = torch.randn(shape)
        _both_paths(client, key, [t], f(t))
    info = client.describe(key)
    assert len(info.variants) == 6
    assert {v.variant for v in info.variants} >= {key}
    assert {a.variant for a in info.arg_specs} <= {v.variant for v in info.variants}


def test_raw_client_gets_signature_mismatch_naming_the_condition(server: ServerProcess, client: Client) -> None:
    def f(x):  # a graph of its own: no other test's client added variants to it
        return x * 5 if x.shape[0] > 3 else x - 5

    key = client.register(f, [torch.randn(4)])
    err = _raw_execute(server.target, key, torch.ones(2))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "x.shape[0] >= 4" in err.details() and "x.shape[0] = 2" in err.details(), err.details()
    assert ("fuseport-error", "NoMatchingVariant") in err.trailing_metadata()
    err = _raw_execute(server.target, key, torch.ones(2, 2))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and "rank" in err.details()
    assert client.health() == "SERVING"


def test_raw_graph_without_its_function_is_not_recaptured(client: Client) -> None:
    graph = capture(lambda x: x * 2 if x.shape[0] > 3 else x - 1, [torch.randn(4)])
    key = client.register(graph)
    with pytest.raises(NoMatchingVariant, match=r"x.shape\[0\] >= 4") as e:
        client.execute(key, [torch.ones(2)])
    assert isinstance(e.value, SignatureMismatch)


def test_client_runs_only_variants_it_captured_itself(server: ServerProcess, client: Client) -> None:
    def honest(t):
        return t + 1

    key = client.register(honest, [torch.randn(4)])
    with Client(server.target, timeout=120) as attacker:
        # Claims the ranks the honest variant does not cover, under the honest key.
        evil = capture(lambda t: t * 0 - 7, [torch.randn(2, 2)])
        assert attacker.register(evil, variant_of=key) == key
    t = torch.randn(2, 2)
    _both_paths(client, key, [t], honest(t))
    variants = [v.variant for v in client.describe(key).variants]
    assert len(variants) == 3  # honest, the attacker's, the honest client's own for rank 2


def test_variants_survive_a_restart_with_their_store(tmp_path) -> None:
    from .conftest import start_server

    def f(x):
        return x * 2 if x.shape[0] > 3 else x - 1

    store = tmp_path / "store"
    first = start_server(tmp_path / "a", store, "--compile-mode", "off")
    try:
        with Client(first.target, timeout=120) as c:
            key = c.register(f, [torch.randn(4)])
            c.execute(key, [torch.ones(2)])
            before = [v.variant for v in c.describe(key).variants]
    finally:
        first.stop()
    second = start_server(tmp_path / "b", store, "--compile-mode", "off")
    try:
        with Client(second.target, timeout=120) as c:
            assert sorted(v.variant for v in c.describe(key).variants) == sorted(before)
            # A client that never registered the kernel sends no variant list:
            # the variant captured before the restart answers.
            assert torch.equal(c.execute(key, [torch.ones(2)])[0], torch.zeros(2))
    finally:
        second.stop()
