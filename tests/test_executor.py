"""The executor's cache, in process on the real Core (CPU): bounds and eviction."""

from __future__ import annotations

from pathlib import Path

import torch

from fuseport.server.core import Core
from fuseport.server.settings import Settings
from fuseport.wire.capture import capture


def test_lru_bounds_per_key_and_overall_evict_without_losing_entries(tmp_path: Path) -> None:
    core = Core(Settings(device="cpu", store_dir=tmp_path, max_arg_specs=2, max_kernels=3))
    try:
        a, _ = core.register(capture(lambda x: x * 3 + 1, [torch.randn(4)]))
        b, _ = core.register(capture(lambda x: x.abs() - 2, [torch.randn(4)]))
        # ArgSpecs that differ by size class (1, n, 0): A1, B1, A2 ready, then A3,
        # which pushes A past max_arg_specs and everything past max_kernels at once.
        for key, x in ((a, torch.randn(1)), (b, torch.randn(4)), (a, torch.randn(5))):
            assert core.execute(key, [x], wait=True).path == 1  # PATH_FUSED
        assert len(core.executor.entries(a)) == 2
        res = core.execute(a, [torch.randn(0)], wait=True)
        assert res.path == 1 and res.stack[0].shape == (0,)
        a_specs = core.executor.entries(a)
        assert len(a_specs) <= 2, [str(e.arg_spec) for e in a_specs]
        assert len(a_specs) + len(core.executor.entries(b)) <= 3
        assert all(e.state.name == "READY" for e in a_specs)
    finally:
        core.close()
