"""Dynamic batching: the proof from the graph, batched results equal separate calls, and the server's batcher.

The proof's own checks are shown to fail where they must (a graph that mixes
slices, a write into an input); random graphs from the op harness are proven
and their batched results compared, slice by slice, with each call run alone;
and a real server with a long window batches concurrent callers, giving each
its own result, its own error and its own deadline.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuseport.client import Client, DeadlineExceeded, FuseportError
from fuseport.server.batching import NotBatchable, Verdict, check_batch_leading, prove
from fuseport.server.core import Core
from fuseport.server.registry import Registry, Variant
from fuseport.server.settings import Settings
from fuseport.wire.capture import capture
from fuseport.wire.errors import ExecutionFailed

from . import op_samples
from ._graphs import one_op
from .conftest import ServerProcess, start_server
from .test_ops import _program, _shapes, _step

CPU = torch.device("cpu")
TOL = {"rtol": 1e-4, "atol": 1e-4, "equal_nan": True}  # the op harness's (tests/test_ops.py)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return Registry(tmp_path_factory.mktemp("batching-store"), CPU)


def _variant(registry: Registry, fn: Any, args: list[Any]) -> Variant:
    return registry.build_variant(capture(fn, args))


def _shuffled(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Other slices for a batch whose values stay valid for what the call's were (indices in range)."""
    flat = t.reshape(-1)
    order = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))
    return flat[order].reshape(t.shape).clone()


def _check_batched(variant: Variant, verdict: Verdict, args: list[Any], calls: int = 3) -> None:
    """`calls` calls with other values, run as one batch through the batched graph
    that serves (padded where it must be), equal each call run alone."""
    assert verdict.batchable, verdict.reason
    batched, size = verdict.variant_for(calls)
    if batched is None:
        assert verdict.capture is not None
        batched = verdict.variants[size] = verdict.capture(size)
    rows = []
    for j in range(calls):
        row = list(args)
        for i in verdict.tensors:
            row[i] = args[i] if j == 0 else _shuffled(args[i], j)
        rows.append(row)
    padded = rows + [rows[-1]] * (size - calls)
    stacked = [torch.stack([r[i] for r in padded]) for i in verdict.tensors]
    outputs = batched.fallback.forward(*stacked)
    for j, row in enumerate(rows):
        alone = variant.fallback.forward(*row)
        assert len(alone) == len(outputs)
        for k, (a, b) in enumerate(zip(alone, outputs)):
            assert b.shape[0] == size, (k, b.shape)
            torch.testing.assert_close(b[j], a, **TOL, msg=lambda m, j=j, k=k: f"call {j}, output {k}: {m}")


# ---------------------------------------------------------------- the proof


def test_matmul_graph_is_proven_batchable_and_one_batched_graph_serves_every_batch_size(
    registry: Registry,
) -> None:
    args = [torch.randn(4, 8), torch.randn(8, 3)]
    variant = _variant(registry, lambda x, y: torch.relu(x @ y) * 2 + 1, args)
    verdict = prove(variant, args, registry.build_variant)
    assert verdict.batchable and verdict.dynamic, verdict.reason
    _check_batched(variant, verdict, args, calls=5)


def test_a_graph_that_reads_sizes_is_proven_at_the_calls_sizes_and_padded(registry: Registry) -> None:
    # aten::sym_size has no batching rule: proven at concrete sizes, where it is a constant.
    # LayerNorm's batching rule pins the batch size: batches are padded to powers of two.
    args = [torch.randn(4, 8)]
    fn = lambda x: torch.nn.functional.gelu(torch.nn.functional.layer_norm(x, x.shape[-1:]))  # noqa: E731
    variant = _variant(registry, fn, args)
    verdict = prove(variant, args, registry.build_variant)
    assert verdict.batchable, verdict.reason
    assert not verdict.dynamic and verdict.variant_for(3) == (None, 4)
    _check_batched(variant, verdict, args, calls=3)


def test_a_graph_whose_shapes_depend_on_data_is_refused(registry: Registry) -> None:
    args = [torch.randn(6)]
    variant = _variant(registry, lambda x: x[x > 0] * 2, args)
    verdict = prove(variant, args, registry.build_variant)
    assert not verdict.batchable and "depends on the data" in verdict.reason, verdict.reason


def test_a_graph_that_draws_random_numbers_is_refused(registry: Registry) -> None:
    args = [torch.randn(6)]
    variant = _variant(registry, lambda x: torch.nn.functional.dropout(x, 0.5, True), args)
    verdict = prove(variant, args, registry.build_variant)
    assert not verdict.batchable and "random" in verdict.reason, verdict.reason


def test_a_kernel_opted_out_is_refused_whatever_its_graph(registry: Registry) -> None:
    args = [torch.randn(6)]
    variant = _variant(registry, lambda x: x * 2, args)
    verdict = prove(variant, args, registry.build_variant, opted_out="registered with batching=False")
    assert not verdict.batchable and verdict.reason == "registered with batching=False"


def test_the_batch_leading_check_catches_a_reduction_over_the_batch() -> None:
    # vmap never makes one; the check does not take that on trust.
    from torch.fx.experimental.proxy_tensor import make_fx

    mixing = make_fx(lambda xb: (xb.sum(0, keepdim=True).expand_as(xb) * 1,), tracing_mode="fake")(
        torch.empty(2, 4)
    )
    check_batch_leading(mixing, [(4,)], 2)  # the shape alone cannot tell...
    reducing = make_fx(lambda xb: (xb.sum(0),), tracing_mode="fake")(torch.empty(2, 4))
    with pytest.raises(NotBatchable, match="slices would mix"):
        check_batch_leading(reducing, [(4,)], 2)


def test_the_slice_check_catches_a_batched_graph_that_mixes_slices(registry: Registry) -> None:
    # ...which is why the captured graph is also run: slice 0 must not change with slice 1's inputs.
    from fuseport.server.batching import _check_slices

    x = torch.randn(5)
    variant = _variant(registry, lambda t: t * 2, [x])
    good = _variant(registry, lambda xb: xb * 2, [torch.randn(2, 5)])
    bad = _variant(registry, lambda xb: xb.flip(0) * 2, [torch.randn(2, 5)])
    permuted = [_shuffled(x, 1)]
    _check_slices(variant, [x], (0,), good, [x], permuted, 2)
    with pytest.raises(NotBatchable, match="slices mix"):
        _check_slices(variant, [x], (0,), bad, [x], permuted, 2)


def test_a_write_into_an_input_is_refused() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    from fuseport.server.batching import _refuse_shared_writes

    def writes(x: torch.Tensor) -> torch.Tensor:
        x.view(-1).add_(1)
        return x * 2

    with pytest.raises(NotBatchable, match="writes in place"):
        _refuse_shared_writes(make_fx(writes)(torch.zeros(2, 2)))
    _refuse_shared_writes(
        make_fx(lambda x: torch.zeros(2, 2).add_(x) * 2)(torch.zeros(2, 2))
    )  # its own memory


# ---------------------------------------------------------------- differential: random graphs of the op harness


_DIFFERENTIAL = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
_PROGRAMS = given(steps=st.lists(_step, min_size=1, max_size=5), shape=_shapes)


def _random_graph_batched(registry: Registry, steps: list, shape: tuple) -> None:
    """A program of the op harness proven, batched, and each call compared with itself alone,
    on the registry's device."""
    f = _program(steps)
    gen = torch.Generator().manual_seed(len(steps) * 1000 + shape[0])
    args = [torch.randn(shape, generator=gen).to(registry.device) for _ in range(2)]
    variant = _variant(registry, f, args)
    verdict = prove(variant, args, registry.build_variant)
    _check_batched(variant, verdict, args, calls=3)


@_DIFFERENTIAL
@_PROGRAMS
def test_random_graphs_batched_equal_each_call_alone(registry: Registry, steps: list, shape: tuple) -> None:
    _random_graph_batched(registry, steps, shape)


# One-op graphs as a hostile client sends them (every dim -1, no conditions), with the
# op harness's first valid call: ops that index, gather, scan, sort, convolve, pool.
_ONE_OP = [
    "aten::gather.default", "aten::index_select.default", "aten::embedding.default", "aten::cumsum.default",
    "aten::topk.default", "aten::convolution.default", "aten::max_pool2d_with_indices.default",
    "aten::_softmax.default", "aten::scatter_add.default", "aten::constant_pad_nd.default",
]  # fmt: skip


@pytest.mark.parametrize("op", _ONE_OP)
def test_one_op_graphs_are_batched_exactly_or_refused_with_a_reason(registry: Registry, op: str) -> None:
    call = next(c for c in op_samples.calls(op) if not c.hostile)
    graph, stack = one_op(call.op, call.args, call.kwargs, call.outputs)
    variant = registry.build_variant(graph)
    verdict = prove(variant, stack, registry.build_variant)
    if not verdict.batchable:
        assert verdict.reason  # never batched, and Describe says why
        return
    _check_batched(variant, verdict, stack, calls=3)


# ---------------------------------------------------------------- a failure inside a batch (core, no gRPC)


def test_a_batch_that_fails_runs_its_calls_alone_and_only_the_bad_one_fails(tmp_path: Path) -> None:
    settings_ = Settings(
        store_dir=tmp_path, device="cpu", compile_mode="off", batch_window_us=1_000_000, max_batch=3
    )
    core = Core(settings_)
    try:
        table = torch.randn(10, 4)
        key = core.register(
            capture(lambda t, i: torch.index_select(t, 0, i) * 2, [table, torch.tensor([1, 2])])
        )[0]
        good = [torch.tensor([0, 9]), torch.tensor([3, 4]), torch.tensor([5, 6])]
        calls = [core.prepare(key, [table, i]) for i in good]
        assert core.batcher is not None
        bkey = core.batcher.batch_key(calls[0])
        deadline = time.monotonic() + 120
        while bkey is None and time.monotonic() < deadline:  # the proof runs in the background
            core.batcher._prover.submit(lambda: None).result()
            bkey = core.batcher.batch_key(calls[0])
        assert bkey is not None, core.describe(key).batching
        # Past its checks, the middle call's index goes out of range (what a value only the
        # run meets would do): the launch fails, and the batch's calls run one by one.
        calls[1].args[1] = torch.tensor([3, 40])

        async def run_all() -> list[Any]:
            return await asyncio.gather(
                *(core.batcher.submit(bkey, c, None, None) for c in calls), return_exceptions=True
            )

        results = asyncio.run(run_all())
        assert isinstance(results[1], ExecutionFailed), results[1]
        for j in (0, 2):
            assert not isinstance(results[j], BaseException), results[j]
            torch.testing.assert_close(results[j].stack[0], table[good[j]] * 2)
    finally:
        core.close()


def test_a_client_that_sends_ever_new_sizes_gets_a_bounded_number_of_proofs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fuseport.server import batching

    monkeypatch.setattr(batching, "_MAX_SIZES_PER_VARIANT", 2)
    core = Core(Settings(store_dir=tmp_path, device="cpu", compile_mode="off", batch_window_us=1000))
    try:
        key = core.register(capture(lambda x: x * 2 + 1, [torch.randn(4)]))[0]
        assert core.batcher is not None
        for n in (4, 5, 6, 7):
            call = core.prepare(key, [torch.randn(n)])
            core.batcher.batch_key(call)
            core.batcher._prover.submit(lambda: None).result()  # that proof, if one started, is done
        sizes = sorted(v.sizes for _, v in core.batcher.verdicts(b"", key, [call.variant.key]))
        assert sizes == ["[4]", "[5]"]  # sizes 6 and 7 run unbatched, unproven
        assert core.batcher.batch_key(core.prepare(key, [torch.randn(5)])) is not None
    finally:
        core.close()


def _settled_key(core: Core, key: int, stack: list[Any], owner: Any = None) -> Any:
    """The call's batch key once the proof its first call starts has ended (None: run alone)."""
    from fuseport.server.resident import NO_OWNER

    call = core.prepare(key, stack, owner=owner or NO_OWNER)
    assert core.batcher is not None
    core.batcher.batch_key(call)
    core.batcher._prover.submit(lambda: None).result()  # the proof, if one started, is done
    return core.batcher.batch_key(call)


def test_a_call_whose_input_is_not_contiguous_runs_alone(tmp_path: Path) -> None:
    # Stacking makes every slice contiguous: as_strided on a transposed input would read
    # other values in a batch than alone (found by an adversarial probe of the server).
    core = Core(Settings(store_dir=tmp_path, device="cpu", compile_mode="off", batch_window_us=1000))
    try:
        key = core.register(capture(lambda x: x.as_strided((5,), (1,)) * 1, [torch.randn(4, 5)]))[0]
        assert _settled_key(core, key, [torch.randn(4, 5)]) is not None
        assert _settled_key(core, key, [torch.randn(5, 4).t()]) is None
    finally:
        core.close()


def test_opt_outs_and_verdicts_are_each_namespaces_and_kernels_own(tmp_path: Path) -> None:
    from fuseport.server.resident import owner_of

    core = Core(Settings(store_dir=tmp_path, device="cpu", compile_mode="off", batch_window_us=1000))
    try:
        f = lambda x, a: x * a  # noqa: E731
        graph = capture(f, [torch.randn(4), 0.5])
        a, b = owner_of(None, b"token-a", b"A"), owner_of(None, b"token-b", b"B")
        key = core.register(graph, batching=False, tenant=b"A")[0]
        assert core.register(graph, tenant=b"B")[0] == key  # the same graph: the same key, two kernels
        secret = [torch.randn(11), 0.8675309]
        bkey = _settled_key(core, key, secret, b)
        assert bkey is not None
        # A's opt-out holds although B's calls proved the same graph, and the two never share a launch.
        assert _settled_key(core, key, secret, a) is None
        assert [(v.sizes, v.batchable) for v in core.describe(key, tenant=b"B").batching] == [
            ("[11], 0.8675309", True)
        ]
        assert [v.batchable for v in core.describe(key, tenant=b"A").batching] == [False]
        # A namespace that registered the graph and never called it sees no one's sizes or values.
        assert core.register(graph, tenant=b"C")[0] == key
        assert not core.describe(key, tenant=b"C").batching
        # In one namespace: kernel K1 opted out, whose float64 variant is kernel K2's whole graph.
        k1 = core.register(capture(lambda x: x * 2 + 1, [torch.randn(4)]), batching=False)[0]
        wide = capture(lambda x: x * 2 + 1, [torch.randn(4, dtype=torch.float64)])
        core.register(wide, variant_of=k1)
        k2 = core.register(wide)[0]
        x64 = [torch.randn(4, dtype=torch.float64)]
        assert _settled_key(core, k2, x64) is not None
        assert _settled_key(core, k1, x64) is None
    finally:
        core.close()


# ---------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def batch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # A long window and small batches: 4 concurrent callers make a full batch at once,
    # whatever the machine's load, and a lone caller waits the window out.
    s = start_server(
        tmp_path_factory.mktemp("batching"), None,
        "--batch-window-us", "1000000", "--max-batch", "4", "--metrics-port", "0", "--compile-mode", "off",
    )  # fmt: skip
    yield s
    s.stop()


def _batch_counts(server: ServerProcess) -> tuple[float, float]:
    """(launches, calls) of batchable kernels so far: fuseport_batch_size's count and sum."""
    text = urllib.request.urlopen(server.metrics_url, timeout=30).read().decode()
    count = float(re.search(r"^fuseport_batch_size_count (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    total = float(re.search(r"^fuseport_batch_size_sum (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    return count, total


def _verdict(client: Client, key: int, stack: list[Any]) -> Any:
    """Calls once, then waits (on Describe) for the server's verdict for these sizes."""
    sizes = ", ".join(
        f"[{','.join(map(str, v.shape))}]" if isinstance(v, torch.Tensor) else repr(v) for v in stack
    )
    client.execute(key, stack)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        info = client.describe(key)
        if any(v.sizes == sizes for v in info.batching):
            return info
        time.sleep(0.05)  # the proof runs in the background; calls run alone meanwhile
        client.execute(key, stack)
    raise AssertionError("no batching verdict within 180 s")


def _concurrently(target: str, jobs: list[tuple[int, list[Any], float]]) -> list[Any]:
    """Each job (key, stack, timeout) from a client of its own, all released at once."""
    barrier = threading.Barrier(len(jobs))
    out: list[Any] = [None] * len(jobs)

    def one(i: int) -> None:
        key, stack, timeout = jobs[i]
        with Client(target, timeout=timeout) as c:
            c.health()
            barrier.wait()
            try:
                out[i] = c.execute_detailed(key, stack, timeout=timeout)
            except FuseportError as e:
                out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ y) * 2 + 1


def test_concurrent_callers_are_batched_and_each_gets_its_own_result(batch_server: ServerProcess) -> None:
    with Client(batch_server.target, timeout=120) as client:
        key = client.register(_mm, [torch.randn(4, 8), torch.randn(8, 3)])
        y = torch.randn(8, 3)
        info = _verdict(client, key, [torch.randn(4, 8), y])
        assert [(v.sizes, v.batchable) for v in info.batching] == [("[4,8], [8,3]", True)], info.batching
        assert "batching at [[4,8], [8,3]]: batchable (one batched graph for every batch size" in str(info)
        before = _batch_counts(batch_server)
        xs = [torch.randn(4, 8) for _ in range(4)]
        results = _concurrently(batch_server.target, [(key, [torch.ones(1), x, y], 60) for x in xs])
        for x, r in zip(xs, results):
            assert not isinstance(r, BaseException), r
            assert torch.equal(r.stack[0], torch.ones(1))  # the value below the inputs stays its own
            torch.testing.assert_close(r.stack[1], _mm(x, y), **TOL)
        launches, calls = (a - b for a, b in zip(_batch_counts(batch_server), before))
        assert calls == 4 and launches < 4, (launches, calls)  # at least two of them ran as one launch


def test_mixed_sizes_and_kernels_each_batch_apart(batch_server: ServerProcess) -> None:
    with Client(batch_server.target, timeout=120) as client:
        k1 = client.register(_mm, [torch.randn(4, 8), torch.randn(8, 3)])
        k2 = client.register(lambda x: torch.tanh(x) - x, [torch.randn(5, 6)])
        y = torch.randn(8, 3)
        groups = [(k1, lambda: [torch.randn(4, 8), y]), (k1, lambda: [torch.randn(2, 8), y]),
                  (k2, lambda: [torch.randn(5, 6)]), (k2, lambda: [torch.randn(3, 7)])]  # fmt: skip
        for key, make in groups:
            _verdict(client, key, make())
        jobs = [(key, make(), 60.0) for key, make in groups for _ in range(2)]
        results = _concurrently(batch_server.target, jobs)
        for (key, stack, _), r in zip(jobs, results):
            assert not isinstance(r, BaseException), r
            want = _mm(*stack) if key == k1 else torch.tanh(stack[0]) - stack[0]
            torch.testing.assert_close(r.stack[0], want, **TOL)
        info = client.describe(k2)
        assert sorted(v.sizes for v in info.batching) == ["[3,7]", "[5,6]"]


def test_a_bad_call_fails_alone_and_a_callers_deadline_is_its_own(batch_server: ServerProcess) -> None:
    with Client(batch_server.target, timeout=120) as client:
        table = torch.randn(10, 4)
        key = client.register(lambda t, i: torch.index_select(t, 0, i) * 2, [table, torch.tensor([1, 2])])
        _verdict(client, key, [table, torch.tensor([0, 1])])
        jobs = [
            (key, [table, torch.tensor([0, 9])], 60.0),
            (key, [table, torch.tensor([3, 40])], 60.0),  # out of range: its own error
            (key, [table, torch.tensor([2, 2])], 0.3),  # gives up before the window ends
        ]
        results = _concurrently(batch_server.target, jobs)
        torch.testing.assert_close(results[0].stack[0], table[[0, 9]] * 2)
        assert isinstance(results[1], FuseportError) and "out of" in str(results[1]).lower(), results[1]
        assert isinstance(results[2], DeadlineExceeded), results[2]
        assert client.health() == "SERVING"


def test_callers_of_one_kernel_with_inputs_in_other_layouts_each_get_their_own_result(
    batch_server: ServerProcess,
) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x.as_strided((5,), (1,)) * 1

    with Client(batch_server.target, timeout=120) as client:
        key = client.register(f, [torch.randn(4, 5)])
        _verdict(client, key, [torch.randn(4, 5)])
        xs = [torch.randn(4, 5), torch.randn(5, 4).t(), torch.randn(4, 5), torch.randn(5, 4).t()]
        for x, r in zip(xs, _concurrently(batch_server.target, [(key, [x], 60.0) for x in xs])):
            assert not isinstance(r, BaseException), r
            assert torch.equal(r.stack[0], f(x)), (x.stride(), r.stack[0], f(x))


def test_a_kernel_that_is_not_batchable_never_batches(batch_server: ServerProcess) -> None:
    with Client(batch_server.target, timeout=120) as client:
        key = client.register(lambda x: torch.nn.functional.dropout(x, 0.5, True), [torch.randn(6)])
        info = _verdict(client, key, [torch.randn(6)])
        assert not info.batching[0].batchable and "random" in info.batching[0].reason, info.batching
        before = _batch_counts(batch_server)
        xs = [torch.randn(6) for _ in range(4)]
        results = _concurrently(batch_server.target, [(key, [x], 60.0) for x in xs])
        for x, r in zip(xs, results):
            out = r.stack[0]
            assert bool(((out == 0) | torch.isclose(out, x * 2)).all()), (x, out)  # its own input's dropout
        assert _batch_counts(batch_server) == before  # no launch counted: none was batched


def test_opting_out_per_kernel_and_per_call(batch_server: ServerProcess) -> None:
    with Client(batch_server.target, timeout=120) as client:
        fn = lambda x: x * 3 - 1  # noqa: E731
        key = client.register(fn, [torch.randn(7)], batching=False)
        info = _verdict(client, key, [torch.randn(7)])
        assert info.batching_off == "the kernel was registered with batching=False"
        # What `fuseport describe` prints says so too.
        assert "batching:  off: the kernel was registered with batching=False" in str(info)
        assert not info.batching[0].batchable
        other = client.register(lambda x: x * 5 - 1, [torch.randn(7)])
        assert _verdict(client, other, [torch.randn(7)]).batching[0].batchable
        before = _batch_counts(batch_server)
        jobs = [(key, [torch.randn(7)], 60.0) for _ in range(2)]
        for j, r in zip(jobs, _concurrently(batch_server.target, jobs)):
            torch.testing.assert_close(r.stack[0], fn(j[1][0]))
        with Client(batch_server.target, timeout=60, batching=False) as solo:
            x = torch.randn(7)
            torch.testing.assert_close(solo.execute(other, [x])[0], x * 5 - 1)
        assert _batch_counts(batch_server) == before
        # Registered again with batching=True: its calls may be batched from then on.
        client.register(fn, [torch.randn(7)], batching=True)
        assert client.describe(key).batching_off == ""


# ---------------------------------------------------------------- on the device (gpu: scripts/gpu_check.sh)


@pytest.fixture(scope="module")
def cuda_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (run them with scripts/gpu_check.sh)")
    return Registry(tmp_path_factory.mktemp("batching-store-cuda"), torch.device("cuda"))


@pytest.mark.gpu
@_DIFFERENTIAL
@_PROGRAMS
def test_random_graphs_batched_on_cuda_equal_each_call_alone(
    cuda_registry: Registry, steps: list, shape: tuple
) -> None:
    # The same differential as on the CPU, with the proof traced and both sides run on
    # the device: CUDA's kernels, not the CPU's, decide what "equal" means here.
    _random_graph_batched(cuda_registry, steps, shape)


@pytest.fixture(scope="module")
def cuda_batch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (run them with scripts/gpu_check.sh)")
    # As batch_server, on the device and with the default compile mode: a batched
    # launch is the compile worker's kernel once compiled, the fallback graph before.
    # One serving process, so every caller's call meets the same batcher.
    s = start_server(
        tmp_path_factory.mktemp("batching-cuda"), None, "--device", "cuda", "--processes", "1",
        "--batch-window-us", "1000000", "--max-batch", "4", "--metrics-port", "0",
    )  # fmt: skip
    yield s
    s.stop()


@pytest.mark.gpu
def test_concurrent_callers_on_cuda_are_batched_and_each_gets_its_own_result(
    cuda_batch_server: ServerProcess,
) -> None:
    with Client(cuda_batch_server.target, timeout=300) as client:
        key = client.register(_mm, [torch.randn(4, 8), torch.randn(8, 3)])
        k2 = client.register(lambda x: torch.tanh(x) - x, [torch.randn(5, 6)])
        y = torch.randn(8, 3)
        _verdict(client, key, [torch.randn(4, 8), y])
        _verdict(client, k2, [torch.randn(5, 6)])
        for rounds in range(3):  # the first rounds may meet the batched graph's compile
            before = _batch_counts(cuda_batch_server)
            jobs = [(key, [torch.ones(1), torch.randn(4, 8), y], 120.0) for _ in range(4)]
            jobs += [(k2, [torch.randn(5, 6)], 120.0) for _ in range(4)]
            results = _concurrently(cuda_batch_server.target, jobs)
            for (k, stack, _), r in zip(jobs, results):
                assert not isinstance(r, BaseException), r
                if k == key:
                    assert torch.equal(r.stack[0], torch.ones(1))
                    torch.testing.assert_close(r.stack[1], _mm(stack[1], stack[2]), **TOL)
                else:
                    torch.testing.assert_close(r.stack[0], torch.tanh(stack[0]) - stack[0], **TOL)
            launches, calls = (a - b for a, b in zip(_batch_counts(cuda_batch_server), before))
            assert calls == 8 and launches < 8, (rounds, launches, calls)
        assert client.health() == "SERVING"
