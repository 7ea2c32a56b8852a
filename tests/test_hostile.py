"""What a hostile client sends: each gets a typed error, the same on both paths, and the server keeps serving.

The findings of the trust review, each pinned here: an allowlisted backward op
that segfaulted the process on a bad index, indices out of range, raw strides,
results too large to send (refused before they are computed), an allocation
that fails while the response is encoded.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from fuseport.client import (
    Client,
    ExecutionFailed,
    FuseportError,
    InvalidGraph,
    OpNotAllowed,
    ResourceExhausted,
)
from fuseport.wire import _pb

from ._graphs import one_op
from .conftest import ServerProcess, start_server


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def _both_fail(client: Client, key: int, stack: list, error: type[FuseportError], match: str) -> None:
    """Execute (waiting for the fused kernel) and Fallback fail alike, and the server stays up."""
    with pytest.raises(error, match=match):
        client.execute(key, stack, wait=True)
    with pytest.raises(error, match=match):
        client.fallback(key, stack)
    assert client.health() == "SERVING"


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of this module's own, so that its memory is not another test's compile."""
    s = start_server(tmp_path_factory.mktemp("hostile"), None, "--compile-mode", "off")
    with Client(s.target, timeout=120) as c:
        # Every path of a call once (plan, run, encode): what torch initialises on first
        # use is not what the tests below measure.
        key = c.register(lambda x: x.repeat(3, 1), [torch.ones(2, 4)])
        for run in (c.execute, c.fallback):
            assert run(key, [torch.ones(2, 4)])[0].shape == (6, 4)
    yield s
    s.stop()


# ---------------------------------------------------------------- ops that do not check their inputs


@pytest.mark.parametrize(
    ("op", "args"),
    [
        # Segfaulted the server (exit 139, nothing logged) with indices of 1 << 40.
        (
            "aten::max_pool2d_with_indices_backward.default",
            [torch.ones(1, 1, 1, 1), torch.ones(1, 1, 2, 2), [2, 2], [2, 2], [0, 0], [1, 1], False,
             torch.full((1, 1, 1, 1), 1 << 40)],
        ),
        # Silently read past its weights with out-of-range indices.
        ("aten::embedding_dense_backward.default", [torch.ones(2, 4), torch.tensor([0, 1 << 40]), 3, -1, False]),
        ("aten::_embedding_bag.default", [torch.ones(3, 4), torch.tensor([0, 1]), torch.tensor([0, 1 << 40])]),
    ],
    ids=["max_pool2d_backward", "embedding_dense_backward", "_embedding_bag"],
)  # fmt: skip
def test_ops_that_trust_their_indices_are_not_allowed(client: Client, op: str, args: list) -> None:
    graph, _ = one_op(op, args, outputs=3 if op == "aten::_embedding_bag.default" else 1)
    with pytest.raises(OpNotAllowed, match=op):
        client.register(graph)
    assert client.health() == "SERVING"


@pytest.mark.parametrize(
    ("op", "args", "bad"),
    [
        ("aten::index.Tensor", [torch.randn(8), [torch.tensor([1, 2])]], [torch.randn(8), [torch.tensor([1, 1 << 40])]]),
        ("aten::index.Tensor", [torch.randn(8), [torch.tensor([1, 2])]], [torch.randn(8), [torch.tensor([-9])]]),
        ("aten::gather.default", [torch.randn(4, 4), 1, torch.zeros(4, 2, dtype=torch.int64)],
         [torch.randn(4, 4), 1, torch.full((4, 2), -1)]),
        ("aten::index_select.default", [torch.randn(4, 4), 0, torch.tensor([0])], [torch.randn(4, 4), 0, torch.tensor([4])]),
        ("aten::embedding.default", [torch.randn(5, 3), torch.tensor([0, 4])], [torch.randn(5, 3), torch.tensor([0, 5])]),
        ("aten::scatter.value", [torch.zeros(4), 0, torch.tensor([1]), 2.0], [torch.zeros(4), 0, torch.tensor([1 << 40]), 2.0]),
        ("aten::scatter_add.default", [torch.zeros(4), 0, torch.tensor([1]), torch.ones(1)],
         [torch.zeros(4), 0, torch.tensor([-1]), torch.ones(1)]),
        ("aten::index_put.default", [torch.zeros(4), [torch.tensor([1])], torch.tensor(3.0)],
         [torch.zeros(4), [torch.tensor([4])], torch.tensor(3.0)]),
    ],
    ids=["index-huge", "index-negative", "gather", "index_select", "embedding", "scatter", "scatter_add", "index_put"],
)  # fmt: skip
def test_index_out_of_range_is_invalid_argument_on_both_paths(client: Client, op: str, args: list, bad: list) -> None:
    graph, stack = one_op(op, args)
    key = client.register(graph)
    assert torch.equal(client.execute(key, stack, wait=True)[0], client.fallback(key, stack)[0])
    _, bad_stack = one_op(op, bad)
    _both_fail(client, key, bad_stack, ExecutionFailed, "out of range")


def test_index_computed_inside_the_graph_is_checked_too(client: Client) -> None:
    key = client.register(lambda x, i: x[i + 1] * 2, [torch.randn(8), torch.tensor([1, 2])])
    x = torch.randn(8)
    torch.testing.assert_close(client.execute(key, [x, torch.tensor([0, 6])], wait=True)[0], x[torch.tensor([1, 7])] * 2)
    _both_fail(client, key, [x, torch.tensor([0, 7])], ExecutionFailed, "out of (range|bounds)")


def test_masked_scatter_with_too_small_a_source_is_invalid_argument(client: Client) -> None:
    graph, stack = one_op("aten::masked_scatter.default", [torch.zeros(4), torch.tensor([True, False, True, False]), torch.ones(2)])
    key = client.register(graph)
    torch.testing.assert_close(client.fallback(key, stack)[0], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    _, bad = one_op("aten::masked_scatter.default", [torch.zeros(4), torch.ones(4, dtype=torch.bool), torch.ones(2)])
    _both_fail(client, key, bad, ExecutionFailed, "source")


def test_integer_division_by_zero_never_reaches_a_kernel(client: Client) -> None:
    """Inductor's CPU kernel for rounding "trunc" divided by zero: SIGFPE, the whole server."""

    def f(x, y):
        return torch.div(x, y, rounding_mode="trunc") + 1

    key = client.register(f, [torch.tensor([5, 6, 7]), torch.tensor([1, 2, 3])])
    x, y = torch.tensor([5, 6, 7]), torch.tensor([2, 3, 4])
    res = client.execute_detailed(key, [x, y], wait=True)
    assert res.path == "fused" and torch.equal(res.stack[0], f(x, y)), (res.reason, res.detail)
    _both_fail(client, key, [x, torch.tensor([1, 0, 2])], ExecutionFailed, "division by zero")
    smallest = torch.full((3,), -(2**63))
    _both_fail(client, key, [smallest, torch.full((3,), -1)], ExecutionFailed, "overflows")  # SIGFPE in eager too
    # A divisor the graph computes itself: checked in front of the op, on the unfused path only.
    key = client.register(lambda x, y: torch.div(x, y - 1, rounding_mode="trunc"), [x, y])
    res = client.execute_detailed(key, [x, y], wait=True)
    assert res.path == "fallback" and res.reason == "unsupported", (res.reason, res.detail)
    _both_fail(client, key, [x, torch.tensor([1, 2, 3])], ExecutionFailed, "division by zero")


@pytest.mark.parametrize(
    ("op", "args", "outputs", "match", "at_register"),
    [
        # Segfaulted eager torch: batch norm without running statistics in eval mode.
        ("aten::_native_batch_norm_legit.no_stats", [torch.randn(2, 3, 4, 4), torch.ones(3), torch.zeros(3), False, 0.1, 1e-5],
         3, "training must be true", True),
        # Read past the end of running_var (3 channels, 2 values). Runs where the sizes agree: registered.
        ("aten::_native_batch_norm_legit_no_training.default",
         [torch.randn(2, 3, 4), None, None, torch.zeros(3), torch.ones(2), 0.1, 1e-5], 3, "running_var has 2 elements",
         False),
        # Segfaulted eager torch.
        ("aten::_fft_r2c.default", [torch.randn(4, 8), [1 << 40], 0, True], 1, "not distinct dims", True),
        ("aten::_fft_c2r.default", [torch.randn(4, 5, dtype=torch.complex64), [-(1 << 40)], 0, 8], 1, "not distinct dims",
         True),
        # Returned uninitialised memory.
        ("aten::grid_sampler_2d.default", [torch.randn(1, 1, 4, 4), torch.zeros(1, 2, 2, 2), 7, 0, False], 1,
         "interpolation_mode 7", True),
        # Eager refuses; Triton's kernel on CUDA answered (0 for 2 ** -1).
        ("aten::pow.Tensor_Scalar", [torch.tensor([2, -1, 0]), -1], 1, "negative integer power", True),
    ],
    ids=["batch_norm_no_stats", "batch_norm_short_var", "fft_r2c", "fft_c2r", "grid_sampler", "int_pow_negative"],
)  # fmt: skip
def test_arguments_that_crashed_or_leaked_are_refused(
    client: Client, op: str, args: list, outputs: int, match: str, at_register: bool
) -> None:
    """Arguments that fail whatever the inputs' sizes are refused at Register
    (planned on meta tensors, server/intake.py); the others on both paths."""
    graph, stack = one_op(op, args, outputs=outputs)
    if at_register:
        with pytest.raises(InvalidGraph, match=match):
            client.register(graph)
        assert client.health() == "SERVING"
        return
    key = client.register(graph)
    _both_fail(client, key, stack, ExecutionFailed, match)


def _from_int_input(graph: _pb.graph.Graph, arg: int, item: int) -> _pb.graph.Graph:
    """`graph` with item `item` of its node's list argument `arg` read from a new int
    input `n` (the last): a value of the caller's, not fixed at Register, so the graph
    registers and the value is refused when a call brings it."""
    graph.inputs.add(name="n", kind=_pb.graph.INPUT_KIND_INT)
    graph.nodes[0].args[arg].list_value.items[item].CopyFrom(_pb.graph.Argument(ref="n"))
    return graph


# ---------------------------------------------------------------- raw strides: the two paths once disagreed


def test_negative_strides_are_refused_on_both_paths(client: Client) -> None:
    """Fallback said INVALID_ARGUMENT, Execute returned OK (FUSED). A literal negative
    stride is refused at Register (it can only fail); one the call brings, on both paths."""
    graph, _ = one_op("aten::empty_strided.default", [[4], [-1]], {"dtype": torch.float32})
    with pytest.raises(InvalidGraph, match="negative strides"):
        client.register(graph)
    key = client.register(_from_int_input(graph, 1, 0))
    _both_fail(client, key, [-1], ExecutionFailed, "negative strides")


def test_strides_past_any_memory_are_refused_before_allocating(client: Client) -> None:
    """Fallback said RESOURCE_EXHAUSTED, the fused kernel OK."""
    graph, _ = one_op("aten::empty_strided.default", [[4, 4], [2**40, 1]], {"dtype": torch.float32})
    with pytest.raises(ResourceExhausted, match="more memory than cpu has"):
        client.register(graph)  # can only fail: refused at Register
    key = client.register(_from_int_input(graph, 1, 0))
    _both_fail(client, key, [2**40], ResourceExhausted, "refused before running")


def test_as_strided_cannot_read_past_its_input(client: Client) -> None:
    graph, stack = one_op("aten::as_strided.default", [torch.arange(8.0), [2, 2], [2, 1]])
    key = client.register(graph)
    torch.testing.assert_close(client.fallback(key, stack)[0], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    # The input arrives as a view into the whole request message: in bounds of
    # that, but not of its own 8 elements.
    graph, stack = one_op("aten::as_strided.default", [torch.arange(8.0), [100], [1]])
    _both_fail(client, client.register(graph), stack, ExecutionFailed, "storage holds 8")


def test_graph_without_outputs_is_refused(client: Client) -> None:
    from fuseport.wire import _pb

    with pytest.raises(InvalidGraph, match="no outputs"):
        client.register(_pb.graph.Graph())


# ---------------------------------------------------------------- exhaustion: RESOURCE_EXHAUSTED, decided up front


def test_huge_expand_is_refused_before_it_is_computed(quiet: ServerProcess) -> None:
    """Was INTERNAL: the encoder's contiguous() failed on 4 TiB."""
    with Client(quiet.target, timeout=120) as c:
        graph, stack = one_op("aten::expand.default", [torch.ones(1, 1), [2**20, 2**20]])
        with pytest.raises(ResourceExhausted, match="its results are 4398046511104 bytes"):
            c.register(graph)  # 4 TiB whatever the input: refused at Register
        # The size from the call: registered, and refused when the call brings 2**20.
        graph = _from_int_input(_from_int_input(graph, 1, 0), 1, 1)
        del graph.inputs[-1]  # one `n` for both dims
        stack = [*stack, 2**20]
        key = c.register(graph)
        before = quiet.rss()
        for run in (c.execute, c.fallback):
            # Over one message: the client sends it again as a stream, whose limit refuses it.
            over = "4398046511104 bytes, over the streamed result limit"
            with pytest.raises(ResourceExhausted, match=over) as e:
                run(key, stack)
            assert e.value.__cause__.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert quiet.rss() <= before * 1.1
        assert c.health() == "SERVING"


def test_result_over_every_paths_limit_is_refused_before_it_is_computed(quiet: ServerProcess) -> None:
    """A 2 GiB result used to be computed in full before the 1 GiB limit refused it. Now one
    over the message limit goes as a stream; one over the stream's limit (8 GiB) too is refused
    before anything is computed, naming that limit."""
    with Client(quiet.target, timeout=120) as c:
        key = c.register(lambda x: x.repeat(2**24, 1), [torch.ones(2, 256)])
        before = quiet.rss()
        over = "34359738368 bytes, over the streamed result limit of 8589934592"
        with pytest.raises(ResourceExhausted, match=over):
            c.fallback(key, [torch.ones(2, 256)])
        assert quiet.rss() <= before * 1.1


def test_allocation_failing_while_encoding_is_resource_exhausted(tmp_path: Path) -> None:
    """Was INTERNAL: an allocation that fails anywhere on the request path is RESOURCE_EXHAUSTED."""
    server = start_server(tmp_path, None, "--compile-mode", "off")
    try:
        with Client(server.target, timeout=120) as c:
            # 512 MiB of result from 4 bytes of input: allocated only when encoded.
            graph, stack = one_op("aten::expand.default", [torch.ones(1), [2**27]])
            key = c.register(graph)
            small = c.register(lambda x: x + 1, [torch.ones(4)])
            assert torch.equal(c.fallback(small, [torch.ones(4)])[0], torch.full((4,), 2.0))  # warm every path
            pid = server.proc.pid
            before = server.rss()
            # Room for 256 MiB more address space: the encoder's copy cannot fit.
            _, hard = resource.prlimit(pid, resource.RLIMIT_AS)
            resource.prlimit(pid, resource.RLIMIT_AS, (_vm_size(pid) + (256 << 20), hard))
            try:
                with pytest.raises(ResourceExhausted, match="out of memory") as e:
                    c.fallback(key, stack)
                assert e.value.__cause__.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert server.rss() <= before * 1.1
                assert torch.equal(c.fallback(small, [torch.ones(4)])[0], torch.full((4,), 2.0))
            finally:
                resource.prlimit(pid, resource.RLIMIT_AS, (hard, hard))
            assert c.health() == "SERVING"
    finally:
        server.stop()
