#!/usr/bin/env python3
"""Triton's perf_analyzer (a client nobody here wrote) against fuseport's KServe v2
endpoint, beside a plain gRPC echo measured on the same machine in the same run
(issue 19). Starts `fuseport serve` (default settings), registers `x * 2 + 1`
on 1 KiB float32 as model "scale", runs perf_analyzer at concurrency 1, 4 and
16, then the bench's echo (a sync gRPC server, identity serializers) with as many
client processes, each making one call at a time as perf_analyzer's synchronous
requests do; prints both side by side.

    python scripts/perf_analyzer_run.py [--device cuda] [--seconds 5]

The binary: $PERF_ANALYZER, else `perf_analyzer` on PATH. `pip install perf-analyzer`
brings one built for glibc >= 2.38 (the GPU machine). Where glibc is older (Debian 12:
2.36), the binary in the tritonclient 2.44.0 wheel runs (data/bin/perf_analyzer), given
libb64 (`apt-get install libb64-0d`) and libcudart.so.12 on LD_LIBRARY_PATH (from the
nvidia-cuda-runtime-cu12 wheel; it is loaded, not used, for a gRPC endpoint).
Writes $OUT/perf-analyzer-c*.csv when OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from fuseport.bench.concurrency import _Clients
from fuseport.bench.context import fuseport_server
from fuseport.bench.echo import echo_server
from fuseport.client import Client

LEVELS = (1, 4, 16)
# perf_analyzer's summary line, e.g. "Concurrency: 4, throughput: 1118.83 infer/sec, latency 3099 usec"
_SUMMARY = re.compile(r"Concurrency: (\d+), throughput: ([0-9.]+) infer/sec, latency (\d+) usec")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    binary = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")
    if binary is None:
        sys.exit("perf_analyzer is not installed (pip install perf-analyzer; see this script's doc)")
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    out_dir.mkdir(parents=True, exist_ok=True)
    analyzer: dict[int, tuple[float, float]] = {}
    with contextlib.ExitStack() as stack:
        target, _ = stack.enter_context(fuseport_server(args.device))
        with Client(target) as client:
            x = torch.randn(256)
            key = client.register(lambda x: x * 2 + 1, [x], alias="scale")
            client.execute(key, [x], wait=True, timeout=300)
        for c in LEVELS:
            csv = out_dir / f"perf-analyzer-c{c}.csv"
            cmd = [
                binary, "-m", "scale", "-u", target, "-i", "grpc", "--shape", "x:256",
                "--concurrency-range", f"{c}:{c}", "--measurement-interval", str(int(args.seconds * 1000)),
                "--percentile", "50", "-f", str(csv),
            ]  # fmt: skip
            print("$", " ".join(cmd), flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            print(done.stdout[-3000:], done.stderr[-2000:], flush=True)
            m = _SUMMARY.search(done.stdout)
            if done.returncode or m is None:
                sys.exit(f"perf_analyzer at concurrency {c} failed (exit {done.returncode})")
            analyzer[c] = (float(m.group(2)), float(m.group(3)))
        # The floor, after: the same number of callers, one call at a time each.
        echo_target, _ = stack.enter_context(echo_server())
        clients = _Clients(max(LEVELS), {"echo": echo_target, "payload": 1024, "timeout": 60})
        try:
            echo = {c: clients.round(c, "echo", 10**9, args.seconds) for c in LEVELS}
        finally:
            clients.close()
    print(f"\nperf_analyzer (ModelInfer, 1 KiB float32, device {args.device}) vs the echo of 1 KiB, same machine")
    print(f"{'callers':>7} {'fuseport/s':>11} {'echo/s':>9} {'ratio':>6} {'p50 fuseport':>13} {'p50 echo':>9}  (us)")
    for c in LEVELS:
        tput, p50 = analyzer[c]
        e = echo[c]
        print(f"{c:>7} {tput:>11.0f} {e['throughput']:>9.0f} {tput / e['throughput']:>6.2f} {p50:>13.0f} {e['p50_us']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
