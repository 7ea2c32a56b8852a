"""The CUDA path: fused Triton kernels, pinned staging, per-thread streams, device OOM.

Marked `gpu`: CI (no GPU) deselects them with -m "not gpu"; scripts/gpu_check.sh
runs them on the GPU machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fuseport.client import Client, ResourceExhausted

from .conftest import ServerProcess, start_server

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (run them with scripts/gpu_check.sh)")
    s = start_server(tmp_path_factory.mktemp("gpu"), None, "--device", "cuda")
    yield s
    s.stop()


@pytest.fixture()
def gpu(gpu_server: ServerProcess) -> Iterator[Client]:
    with Client(gpu_server.target, timeout=300) as c:
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


def test_concurrent_requests_on_their_own_streams_stay_correct(gpu: Client, gpu_server: ServerProcess) -> None:
    def f(x, y):
        return (x @ y).relu() + x.sum()

    key = gpu.register(f, [torch.randn(64, 64), torch.randn(64, 64)])
    gpu.execute(key, [torch.randn(64, 64), torch.randn(64, 64)], wait=True)
    inputs = [(torch.randn(256, 256), torch.randn(256, 256)) for _ in range(32)]

    def call(xy):
        with Client(gpu_server.target, timeout=300) as c:
            return c.execute_detailed(key, list(xy))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, inputs))
    for (x, y), res in zip(inputs, results):
        torch.testing.assert_close(res.stack[0], f(x, y), rtol=1e-3, atol=1e-3)


def test_device_out_of_memory_is_resource_exhausted_and_memory_is_released(gpu: Client) -> None:
    def blow_up(x):
        return x.reshape(1, -1).expand(2**21, -1) * 2  # 8 TiB

    key = gpu.register(blow_up, [torch.ones(2**20)])
    with pytest.raises(ResourceExhausted, match="out of memory"):
        gpu.fallback(key, [torch.ones(2**20)])
    with pytest.raises(ResourceExhausted, match="out of memory"):
        gpu.execute(key, [torch.ones(2**20)], wait=True)
    assert gpu.health() == "SERVING"

    def small(x):
        return x + 1

    key2 = gpu.register(small, [torch.ones(4)])
    assert torch.equal(gpu.execute(key2, [torch.ones(4)], wait=True)[0], torch.full((4,), 2.0))


def test_device_failure_stops_the_server_so_it_is_restarted(tmp_path) -> None:
    """A device-side assert poisons the CUDA context: the server must not keep
    saying SERVING. It answers INTERNAL, drains and exits with status 3."""
    from fuseport.client import InternalError

    server = start_server(tmp_path, None, "--device", "cuda")
    try:
        with Client(server.target, timeout=120) as c:
            def gather(x, i):
                return x[i]

            key = c.register(gather, [torch.randn(8), torch.tensor([1, 2])])
            with pytest.raises(InternalError, match="restarting"):
                c.fallback(key, [torch.randn(8), torch.tensor([1, 1 << 40])])
        assert server.proc.wait(timeout=120) == 3
        assert "must restart" in server.log()
    finally:
        server.stop()
