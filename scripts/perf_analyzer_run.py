#!/usr/bin/env python3
"""Triton's perf_analyzer (a client nobody here wrote) against fuseport's KServe v2
endpoint, beside a plain gRPC echo measured by the same machine in the same run
(issue 19). Starts `fuseport serve` (default settings), registers `x * 2 + 1`
on 1 KiB float32 as model "scale", runs perf_analyzer at concurrency 1, 4 and
16, then the bench's echo with that many client processes.

    python scripts/perf_analyzer_run.py [--device cuda] [--seconds 5]

Needs the `perf_analyzer` binary (pip install perf-analyzer; glibc >= 2.38).
Writes $OUT/perf-analyzer-*.csv when OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from fuseport.bench.context import fuseport_server
from fuseport.client import Client


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    binary = shutil.which("perf_analyzer")
    if binary is None:
        sys.exit("perf_analyzer is not installed (pip install perf-analyzer)")
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    with contextlib.ExitStack() as stack:
        target, _ = stack.enter_context(fuseport_server(args.device))
        with Client(target) as client:
            x = torch.randn(256)
            client.register(lambda x: x * 2 + 1, [x], alias="scale")
            client.execute(client.register(lambda x: x * 2 + 1, [x]), [x], wait=True, timeout=300)
        for c in (1, 4, 16):
            csv = out_dir / f"perf-analyzer-c{c}.csv"
            cmd = [
                binary, "-m", "scale", "-u", target, "-i", "grpc", "--shape", "x:256",
                "--concurrency-range", f"{c}:{c}", "--measurement-interval", str(int(args.seconds * 1000)),
                "--percentile", "50", "-f", str(csv),
            ]  # fmt: skip
            print("$", " ".join(cmd), flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            print(done.stdout[-3000:], done.stderr[-2000:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
