#!/usr/bin/env python3
"""What a 1 KiB call's device part costs on CUDA, in process, by how the GPU and the
CPU spent the time between calls (issue 19: the server's run_us of a small call is
several times what a tight in-process loop measures). Each variant: host tensor in,
one pointwise op, host tensor out, as Core.run does it.

    python scripts/cuda_small_call.py [--n 3000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()
    dev = torch.device("cuda")
    stream = torch.cuda.Stream(dev)
    torch.cuda.set_stream(stream)
    x = torch.randn(256)
    pinned_in = torch.empty(256, pin_memory=True)
    pinned_out = torch.empty(256, pin_memory=True)

    def plain():
        y = x.to(dev)
        z = y * 2 + 1
        out = z.cpu()
        stream.synchronize()
        return out

    def pinned():
        pinned_in.copy_(x)
        y = pinned_in.to(dev, non_blocking=True)
        z = y * 2 + 1
        pinned_out.copy_(z, non_blocking=True)
        stream.synchronize()
        return pinned_out.clone()

    def pinned_per_call():
        # A pinned block from torch's caching host allocator each way, per call (as the server's
        # large-tensor path does): tried for small tensors, it cost as much as the wait it saved.
        staged = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        staged.copy_(x)
        z = staged.to(dev, non_blocking=True) * 2 + 1
        out = torch.empty(z.shape, dtype=z.dtype, pin_memory=True)
        out.copy_(z, non_blocking=True)
        stream.synchronize()
        return out

    def spin(us: float) -> None:
        end = time.perf_counter_ns() + us * 1000
        while time.perf_counter_ns() < end:
            pass

    warm = torch.empty(1, device=dev)

    def spin_gpu_warm(us: float, every_us: float = 200) -> None:
        # Spinning, and a one-element kernel every `every_us` on another stream: if the price
        # after an idle gap is the GPU's (its clocks or power state), a GPU kept a little busy
        # through the gap does not pay it. What a server's busy poll could do between calls.
        end = time.perf_counter_ns() + us * 1000
        nxt = 0
        with torch.cuda.stream(side):
            while (now := time.perf_counter_ns()) < end:
                if now >= nxt:
                    warm.add_(1)
                    nxt = now + every_us * 1000

    side = torch.cuda.Stream(dev)
    gaps = {
        "back to back": lambda: None,
        "sleep 500 us": lambda: time.sleep(0.0005),
        "spin 500 us": lambda: spin(500),
        "sleep 2 ms": lambda: time.sleep(0.002),
        # Spinning through the same idle time: if the slow call after 2 ms is the CPU's deep
        # idle state (a halted core, a descheduled vCPU), this one is fast; if the GPU's, slow too.
        "spin 2 ms": lambda: spin(2000),
        "spin 2 ms, GPU warm": lambda: spin_gpu_warm(2000),
    }
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; p50/p90 us of one call, {args.n} calls")
    variants = (("plain (.to, .cpu)", plain), ("pinned, non_blocking", pinned), ("pinned per call", pinned_per_call))
    for fname, fn in variants:
        for gname, gap in gaps.items():
            for _ in range(200):
                fn()
                gap()
            ts = []
            for _ in range(args.n):
                gap()
                t = time.perf_counter_ns()
                fn()
                ts.append((time.perf_counter_ns() - t) / 1000)
            ts.sort()
            print(f"{fname:>22} | {gname:<19}: p50 {statistics.median(ts):7.1f}  p90 {ts[int(len(ts) * 0.9)]:7.1f}")


if __name__ == "__main__":
    main()
