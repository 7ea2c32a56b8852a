"""The executor's cache, in process on the real Core (CPU): bounds and eviction."""

from __future__ import annotations

from pathlib import Path

import torch

from fuseport.server.core import Core
from fuseport.server.settings import Settings
from fuseport.wire.capture import capture


def _laid_out(order: tuple[int, ...]) -> torch.Tensor:
    """A (4, 5, 6) tensor whose memory holds its dims in `order` (outermost
    first): each order is an ArgSpec of its own, under one variant."""
    shape = (4, 5, 6)
    memory = torch.randn([shape[d] for d in order])
    return memory.permute([order.index(d) for d in range(3)])


def test_lru_bounds_per_key_and_overall_evict_without_losing_entries(tmp_path: Path) -> None:
    core = Core(Settings(device="cpu", store_dir=tmp_path, max_arg_specs=2, max_kernels=3))
    try:
        a, _, _ = core.register(capture(lambda x: x * 3 + 1, [torch.randn(4, 5, 6)]))
        b, _, _ = core.register(capture(lambda x: x.abs() - 2, [torch.randn(4, 5, 6)]))
        # A1, B1, A2 ready, then A3, which pushes A past max_arg_specs and
        # everything past max_kernels at once.
        for key, order in ((a, (0, 1, 2)), (b, (0, 1, 2)), (a, (0, 2, 1))):
            assert core.execute(key, [_laid_out(order)], wait=True).path == 1  # PATH_FUSED
        assert len(core.executor.entries(a)) == 2
        x = _laid_out((2, 1, 0))
        res = core.execute(a, [x], wait=True)
        assert res.path == 1
        torch.testing.assert_close(res.stack[0], x * 3 + 1)
        a_specs = core.executor.entries(a)
        assert len(a_specs) <= 2, [str(e.arg_spec) for e in a_specs]
        assert len(a_specs) + len(core.executor.entries(b)) <= 3
        assert all(e.state.name == "READY" for e in a_specs)
    finally:
        core.close()
