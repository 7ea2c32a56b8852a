"""What one batched launch saves on the server itself: B small calls run one by one vs as one launch, no gRPC.

    python scripts/batch_inprocess.py --device cpu
    python scripts/batch_inprocess.py --device cuda --sizes 16,64

A Core in this process (the serving process's own code: prepare, run, the batcher's
launch), one small kernel (a 1 KiB float32 input), its fused kernel and the batched
graph's compiled first; then the median of 30 repetitions of B calls through
Core.run against one launch of the batch (stacking, the run, the split included).
The end-to-end effect is scripts/batch_bench.py's: this is the part batching removes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _small(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ x.mT) * 0.5 + x.tanh()


def main(argv: list[str] | None = None) -> int:
    from fuseport.server.batching import _Member
    from fuseport.server.core import Core
    from fuseport.server.settings import Settings
    from fuseport.wire.capture import capture

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="16,64", help="batch sizes (comma-separated)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(store_dir=Path(tmp), device=args.device, batch_window_us=500, max_batch=1024)
        core = Core(settings)
        try:
            key = core.register(capture(_small, [torch.randn(16, 16)]))[0]
            batcher = core.batcher
            assert batcher is not None
            for size in (int(s) for s in args.sizes.split(",")):
                xs = [torch.randn(16, 16) for _ in range(size)]
                calls = [core.prepare(key, [x]) for x in xs]
                core.run(calls[0], wait=True)
                while (bkey := batcher.batch_key(calls[0])) is None:
                    batcher._prover.submit(lambda: None).result()  # the proof, in the background
                verdict = batcher._verdicts[bkey]
                variant, padded = verdict.variant_for(size)
                if variant is None:
                    assert verdict.capture is not None
                    variant = verdict.variants[padded] = verdict.capture(padded)
                members = [_Member(c, None, None, 0.0) for c in calls]  # type: ignore[arg-type]
                stacked = batcher._stacked(verdict, variant, members, padded)
                assert stacked is not None
                core.executor.run(key, variant, core.placement.to_device(stacked), fused=True, wait=True)
                out = batcher._run_batch(variant, stacked, members)
                for c, r in zip(calls, out):
                    assert not isinstance(r, BaseException), r
                    torch.testing.assert_close(r.stack[0], _small(c.args[0]), rtol=1e-4, atol=1e-4)
                alone, batched = [], []
                for _ in range(30):
                    t = time.perf_counter()
                    for c in calls:
                        core.run(c)
                    alone.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    batcher._run_batch(variant, stacked, members)
                    batched.append(time.perf_counter() - t)
                a, b = statistics.median(alone) * 1e6, statistics.median(batched) * 1e6
                paths = f"paths: alone {core.run(calls[0]).path}, batched {out[0].path} (1 fused, 2 fallback)"
                print(
                    f"{args.device}, B={size}: one by one {a:.0f} us ({a / size:.1f} us/call), one launch "
                    f"{b:.0f} us ({b / size:.1f} us/call): {a / b:.2f}x; {paths}"
                )
        finally:
            core.close()
    return 0


if __name__ == "__main__":  # the compile worker is started with spawn: it imports this module
    sys.exit(main())
