"""The CUDA path: fused Triton kernels, pinned staging, per-thread streams, device OOM.

Marked `gpu`: CI (no GPU) deselects them with -m "not gpu"; scripts/gpu_check.sh
runs them on the GPU machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fuseport.client import Client, ExecutionFailed, ResourceExhausted

from .conftest import ServerProcess

pytestmark = pytest.mark.gpu


@pytest.fixture()
def gpu(cuda_server: ServerProcess) -> Iterator[Client]:
    with Client(cuda_server.target, timeout=300) as c:
        yield c


def chain(x, y):
    return torch.sigmoid(x * y + 1.5).tanh() - x


def test_pointwise_chain_runs_fused_on_cuda_with_triton_source(gpu: Client) -> None:
    key = gpu.register(chain, [torch.randn(8, 8), torch.randn(8, 8)])
    x, y = torch.randn(1000, 33), torch.randn(1000, 33)
    res = gpu.execute_detailed(key, [x, y], wait=True)
    assert res.path == "fused", (res.reason, res.detail)
    torch.testing.assert_close(res.stack[0], chain(x, y), rtol=1e-5, atol=1e-5)
    info = gpu.describe(key, include_source=True)
    assert info.device.startswith("cuda")
    assert any("triton" in a.source for a in info.arg_specs)


def test_bfloat16_on_cuda_matches_float32_reference(gpu: Client) -> None:
    x, y = torch.randn(4096), torch.randn(4096)
    key = gpu.register(chain, [x.bfloat16(), y.bfloat16()])
    out = gpu.execute(key, [x.bfloat16(), y.bfloat16()], wait=True)[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), chain(x.bfloat16().float(), y.bfloat16().float()), rtol=2e-2, atol=2e-2)


def test_large_tensors_round_trip_through_pinned_staging(gpu: Client) -> None:
    def f(x):
        return x * 2 + 1

    key = gpu.register(f, [torch.randn(16)])
    x = torch.randn(24 * 1024 * 1024 + 3)  # ~96 MiB, several staging chunks and a ragged end
    for res in (gpu.execute_detailed(key, [x], wait=True), gpu.fallback_detailed(key, [x])):
        assert torch.equal(res.stack[0], f(x))


def test_concurrent_requests_on_their_own_streams_stay_correct(gpu: Client, cuda_server: ServerProcess) -> None:
    def f(x, y):
        return (x @ y).relu() + x.sum()

    key = gpu.register(f, [torch.randn(64, 64), torch.randn(64, 64)])
    gpu.execute(key, [torch.randn(64, 64), torch.randn(64, 64)], wait=True)
    inputs = [(torch.randn(256, 256), torch.randn(256, 256)) for _ in range(32)]

    def call(xy):
        with Client(cuda_server.target, timeout=300) as c:
            return c.execute_detailed(key, list(xy))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, inputs))
    for (x, y), res in zip(inputs, results):
        torch.testing.assert_close(res.stack[0], f(x, y), rtol=1e-3, atol=1e-3)


def _mixed(x, i, b, h):
    """Small inputs of four dtypes; results that are inputs' copies too."""
    return x * 2 + 1, i + 3, b.logical_not(), h.float().sum(-1), x.clone()


def _mixed_inputs(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, generator=g),
        torch.randint(-(1 << 40), 1 << 40, (n,), generator=g),
        torch.rand(n, generator=g) > 0.5,
        torch.randn(3, n, generator=g).half(),
    ]


@pytest.fixture()
def staged(cuda_staging_server: ServerProcess) -> Iterator[Client]:
    with Client(cuda_staging_server.target, timeout=300) as c:
        yield c


def test_small_inputs_and_results_staged_together_are_each_calls_own(
    staged: Client, cuda_staging_server: ServerProcess
) -> None:
    """A call's small tensors go to the device packed in its thread's pinned buffer and come
    back the same way (Placement._stage_in/_stage_out): concurrent callers on the same
    serving threads, both paths, mixed dtypes and sizes (at n = 60,000 the int64 input is
    over the 256 KiB a staged tensor may have and goes on its own beside the staged ones),
    each call's results exactly its own inputs' results."""
    key = staged.register(_mixed, _mixed_inputs(8, 0))
    sizes = (2, 7, 100, 3000, 60_000)
    for n in sizes:  # fused variants ready for every size first
        res = staged.execute_detailed(key, _mixed_inputs(n, 1), wait=True)
        assert res.path == "fused", (n, res.reason, res.detail)

    def call(seed: int) -> None:
        n = sizes[seed % len(sizes)]
        inputs = _mixed_inputs(n, seed)
        expected = _mixed(*inputs)
        with Client(cuda_staging_server.target, timeout=300) as c:
            for res in (c.execute_detailed(key, inputs), c.fallback_detailed(key, inputs)):
                assert res.path in ("fused", "fallback")
                assert len(res.stack) == len(expected)
                for j, (got, want) in enumerate(zip(res.stack, expected)):
                    assert got.dtype == want.dtype and got.shape == want.shape, (seed, n, j)
                    if j == 3:  # a sum: the kernel's order of adding is its own
                        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)
                    else:
                        assert torch.equal(got, want), (seed, n, j)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(200)))
    # Kept on the device, from staged inputs: the handles hold their own values.
    inputs = _mixed_inputs(100, 7)
    handles = staged.execute(key, inputs, wait=True, keep=True)
    staged.execute(key, _mixed_inputs(100, 8), wait=True)  # staging buffers written again
    assert torch.equal(handles[0].fetch(), _mixed(*inputs)[0]) and torch.equal(handles[4].fetch(), inputs[0])
    staged.free(handles)


def _offset_view(x, y):
    return torch.as_strided(y, (3,), (1,), 1) + x[:3] * 0


@pytest.mark.parametrize("server", ["cuda_server", "cuda_staging_server"])
def test_a_staged_input_is_its_own_storage_for_as_strided(server: str, request: pytest.FixtureRequest) -> None:
    """as_strided's offset counts from its input's storage. Staged inputs were once views of one
    device block (the second at 64 bytes into it): the fallback read the first input's bytes, and
    the bound on what a view may reach (the input's storage) let a read past the input through.
    Both paths, staging off (the default) and on: the input's own values, and a view one element
    past it refused."""
    x, y = torch.full((5,), -1.0), torch.arange(5.0)

    def past(x, y):
        return torch.as_strided(y, (5,), (1,), 1) + x[:5] * 0

    with Client(request.getfixturevalue(server).target, timeout=300) as gpu:
        key = gpu.register(_offset_view, [x, y])
        for res in (gpu.execute_detailed(key, [x, y], wait=True), gpu.fallback_detailed(key, [x, y])):
            assert torch.equal(res.stack[0], torch.tensor([1.0, 2.0, 3.0])), (res.path, res.stack[0])
        key = gpu.register(past, [torch.zeros(6), torch.zeros(6)])
        for run in (gpu.execute, gpu.fallback):
            with pytest.raises(ExecutionFailed, match="storage holds"):
                run(key, [x, y])


def test_placement_stages_small_tensors_in_one_copy_and_falls_back_past_its_size() -> None:
    """Placement alone: what `to_device` packs (each input then a device tensor with a
    storage of exactly its own bytes, as a decoded input has) and what it leaves to plain
    copies (non-contiguous, empty, conjugate-bit, large, nested lists, everything past
    staging_bytes) all arrive equal; `to_host`'s results are right after `synchronize`,
    also those of a call that failed between the two."""
    from fuseport.server.devices import Placement

    dev = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(3)
    values = [
        torch.randn(5, generator=g),
        torch.arange(12).reshape(3, 4).mT,  # not contiguous
        torch.empty(0),
        torch.randn(4, dtype=torch.complex64, generator=g).conj(),  # a lazy conjugate
        torch.randn(70_000, generator=g),  # 280,000 bytes: over the small size
        [torch.ones(3), torch.zeros(2, dtype=torch.int16)],  # a tensor list
        torch.tensor(2.5, dtype=torch.float64),  # 0-dim
        7,
        torch.rand(9, generator=g) > 0.5,
    ]
    for staging_bytes in (1 << 20, 100, 0):
        p = Placement(dev, staging_bytes=staging_bytes)
        with p.request_scope():
            moved = p.to_device(values)
            staging = p._local.staging  # noqa: SLF001 - whether it staged at all
            # 100 bytes: the small ones take 3 x 64 bytes at the top and 2 x 64 in the list.
            assert staging.sent == (staging_bytes == 1 << 20)
            for want, got in zip(values, moved):
                if isinstance(want, torch.Tensor):
                    assert got.device == dev and (got.data_ptr() % 16 == 0 or got.numel() == 0)
                    assert got.untyped_storage().nbytes() == got.numel() * got.element_size()
                    assert torch.equal(got.cpu(), want.resolve_conj())
                elif isinstance(want, list):
                    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
                else:
                    assert got == want
            outputs = [m * 2 for m in moved if isinstance(m, torch.Tensor)]
            dropped = p.to_host(outputs)  # a call that failed before synchronize
            host = p.to_host([o + 1 for o in outputs])
            assert bool(staging.pending) == (staging_bytes > 0)
            p.synchronize()
            assert not staging.pending and not staging.sent
            tensors = [v.resolve_conj() for v in values if isinstance(v, torch.Tensor)]
            for got, want in zip(host, [t * 2 + 1 for t in tensors]):
                assert got.device.type == "cpu" and torch.equal(got, want)
            for got, want in zip(dropped, [t * 2 for t in tensors]):
                assert torch.equal(got, want)


def test_a_kept_tensor_whose_call_did_not_wait_is_waited_for_by_another_streams_user() -> None:
    """A call that keeps its results answers without waiting for its stream (Core.run):
    a user of such a tensor on another thread's stream (a worker, a fetch) must wait on
    the device for the work that made it (Placement.adopt). The maker's stream sleeps
    first, so its kernel has not run when the others read: read without `adopt` the
    tensor still holds the -1s it was filled with (so the test can tell), read after it
    holds the kernel's values."""
    from fuseport.server.devices import Placement

    dev = torch.device("cuda", 0)
    p = Placement(dev, staging_bytes=0)
    x = torch.randn(4096)

    def make() -> torch.Tensor:
        with p.request_scope():
            xd = x.to(dev)  # before the sleep: a copy from pageable memory waits for the stream
            out = torch.full((4096,), -1.0, device=dev)
            torch.cuda._sleep(200_000_000)  # about 0.1 s of this stream, GPU-side
            torch.mul(xd, 2.0, out=out)
            made = p.made()
            assert made is not None
            made.mark(out)
            made.unwaited()
            return out

    def read(adopt: bool) -> torch.Tensor:
        with p.request_scope():
            if adopt:
                p.adopt([out])
            host = out.cpu()  # a copy on this thread's own stream, waited for
            p.synchronize()
            return host

    with ThreadPoolExecutor(1) as maker, ThreadPoolExecutor(1) as reader:
        out = maker.submit(make).result()
        early = reader.submit(read, False).result()
        late = reader.submit(read, True).result()
        again = maker.submit(read, False).result()  # the maker's own stream: in order anyway
    assert not torch.equal(early, x * 2), "the reader did not overtake the sleeping stream: the test tells nothing"
    assert torch.equal(late, x * 2)
    assert torch.equal(again, x * 2)


def test_device_out_of_memory_is_resource_exhausted_and_memory_is_released(gpu: Client) -> None:
    def blow_up(x):
        return (x.reshape(1, -1).expand(2**21, -1) * 2).sum()  # 8 TiB in the middle

    key = gpu.register(blow_up, [torch.ones(2**20)])
    for run in (gpu.fallback, gpu.execute):
        with pytest.raises(ResourceExhausted, match="out of memory.*refused before running"):
            run(key, [torch.ones(2**20)])

    # Three intermediates of 40% of the card each: every one fits, together
    # they do not. Only running finds that out; the fallback keeps all three.
    total = torch.cuda.get_device_properties(0).total_memory
    cols = 2**16
    rows = int(total * 0.4) // (4 * cols)

    def peak(x):
        return (x.expand(rows, -1) * 2 + x.expand(rows, -1) * 3 * (x.expand(rows, -1) * 4)).sum()

    key = gpu.register(peak, [torch.ones(cols)])
    with pytest.raises(ResourceExhausted, match="out of memory"):
        gpu.fallback(key, [torch.ones(cols)])
    assert gpu.health() == "SERVING"

    def small(x):
        return x + 1

    key2 = gpu.register(small, [torch.ones(4)])
    assert torch.equal(gpu.execute(key2, [torch.ones(4)], wait=True)[0], torch.full((4,), 2.0))


def test_index_out_of_range_on_cuda_is_invalid_argument_not_a_device_assert(gpu: Client) -> None:
    """A device-side assert poisons the CUDA context for every client of the
    process. Indices are checked before any kernel reads them: on the host for
    graph inputs (the fused path stays fused), op by op on the unfused path for
    indices the graph computes itself."""
    from fuseport.client import ExecutionFailed

    def gather(x, i):
        return x[i] * 2

    key = gpu.register(gather, [torch.randn(8), torch.tensor([1, 2])])
    x = torch.randn(8)
    res = gpu.execute_detailed(key, [x, torch.tensor([0, 7])], wait=True)
    assert res.path == "fused", (res.reason, res.detail)
    torch.testing.assert_close(res.stack[0], x[torch.tensor([0, 7])] * 2)
    for run in (gpu.execute, gpu.fallback):
        with pytest.raises(ExecutionFailed, match="out of range"):
            run(key, [x, torch.tensor([1, 1 << 40])])

    def shifted(x, i):
        return x[i + 1] * 2

    key = gpu.register(shifted, [torch.randn(8), torch.tensor([1, 2])])
    res = gpu.execute_detailed(key, [x, torch.tensor([0, 6])], wait=True)
    assert res.path == "fallback" and res.reason == "unsupported", (res.reason, res.detail)
    torch.testing.assert_close(res.stack[0], x[torch.tensor([1, 7])] * 2)
    for run in (gpu.execute, gpu.fallback):
        with pytest.raises(ExecutionFailed, match="out of range"):
            run(key, [x, torch.tensor([0, 7])])
    assert gpu.health() == "SERVING"
    # The context is intact: a fused kernel still runs.
    key = gpu.register(chain, [torch.randn(8), torch.randn(8)])
    a, b = torch.randn(64), torch.randn(64)
    torch.testing.assert_close(gpu.execute(key, [a, b], wait=True)[0], chain(a, b), rtol=1e-5, atol=1e-5)


def test_float_inputs_on_cuda_use_the_value_of_each_call(gpu: Client) -> None:
    """torch.compile baked the first value of a float used by clamp (pytorch#194976)."""

    def f(x, a):
        return torch.clamp(x * a + 1, max=a)

    key = gpu.register(f, [torch.randn(4), 0.5])
    x = torch.randn(4096)
    for a in (-2.0, 0.25, 3.0):
        res = gpu.execute_detailed(key, [x, a], wait=True)
        assert res.path == "fused", (res.reason, res.detail)
        torch.testing.assert_close(res.stack[0], f(x, a), rtol=1e-6, atol=1e-6)


def test_variants_for_other_ranks_and_sizes_on_cuda(gpu: Client) -> None:
    def f(x):
        return x * 2 if x.shape[0] > 3 else x - 1

    key = gpu.register(f, [torch.randn(4)])
    for x in (torch.ones(2), torch.ones(6), torch.ones(3, 5), torch.ones(1)):
        res = gpu.execute_detailed(key, [x], wait=True)
        assert res.path == "fused", (res.reason, res.detail)
        torch.testing.assert_close(res.stack[0], f(x))


def test_model_infer_runs_the_fused_kernel_on_cuda(gpu: Client) -> None:
    """KServe v2 ModelInfer on a CUDA server: bf16 raw contents in, the result equal to eager, and
    once the fused kernel is ready (Execute with wait compiles it) ModelInfer runs it: the
    kernel's fused-run count moves."""
    from fuseport.kserve import grpc_service_pb2 as pb
    from fuseport.kserve import grpc_service_pb2_grpc as pb_grpc

    examples = [torch.randn(8, 8, dtype=torch.bfloat16), torch.randn(8, 8, dtype=torch.bfloat16)]
    key = gpu.register(chain, examples, alias="chain-bf16")
    x, y = torch.randn(64, 33, dtype=torch.bfloat16), torch.randn(64, 33, dtype=torch.bfloat16)
    assert gpu.execute_detailed(key, [x, y], wait=True).path == "fused"
    before = gpu.describe(key).fused_runs
    req = pb.ModelInferRequest(model_name="chain-bf16")
    for name, t in (("x", x), ("y", y)):
        req.inputs.add(name=name, datatype="BF16", shape=list(t.shape))
        req.raw_input_contents.append(t.contiguous().view(torch.uint8).numpy().tobytes())
    # Through the client's own connection: on a GPU the server runs several processes by
    # default, each with its own loaded kernels and run counts, and a new channel may reach
    # another one than the Execute and the describe() calls did.
    resp = pb_grpc.GRPCInferenceServiceStub(gpu.channel).ModelInfer(req, timeout=300)
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [("output0", "BF16", [64, 33])]
    out = torch.frombuffer(bytearray(resp.raw_output_contents[0]), dtype=torch.bfloat16).reshape(64, 33)
    torch.testing.assert_close(out, chain(x, y), rtol=2e-2, atol=2e-2)
    assert gpu.describe(key).fused_runs == before + 1
def test_handles_live_on_cuda_and_fused_execute_takes_them_in_place(gpu: Client) -> None:
    """Outputs kept on the device come back as CUDA handles; a fused Execute on
    them (and on a host tensor beside them) runs without a host round trip."""
    x, y = torch.randn(1 << 20), torch.randn(1 << 20)
    key = gpu.register(chain, [torch.randn(16), torch.randn(16)])
    (h,) = gpu.execute(key, [x, y], wait=True, keep=True)
    assert h.device.startswith("cuda") and h.shape == x.shape and h.nbytes == x.numel() * 4
    (g,) = gpu.execute(key, [h, h], wait=True, keep=True)  # both inputs resident
    res = gpu.execute_detailed(key, [g, y], wait=True)  # resident beside a host tensor
    assert res.path == "fused", (res.reason, res.detail)
    expected = chain(chain(chain(x, y), chain(x, y)), y)
    torch.testing.assert_close(res.stack[0], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g.fetch(), chain(chain(x, y), chain(x, y)), rtol=1e-5, atol=1e-5)
    assert gpu.renew_lease().bytes == 2 * x.numel() * 4
    assert gpu.free([h, g]) == 2 and gpu.renew_lease().bytes == 0
