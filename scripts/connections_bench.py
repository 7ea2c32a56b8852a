"""One Client shared by many threads against `--processes 2`: calls/s with 1 connection against N.

    python scripts/connections_bench.py --device cpu --connections 1,2,4 --rounds 6 --seconds 5

One server (`fuseport serve --processes P`) and one small kernel (a 1 KiB float32
input, `x * 2.0 + 1.0`), made fused on every process first. Then rounds: in each,
every connection count given is measured in turn (the order alternates from round
to round, so drift on a shared machine falls on both alike) with a fresh
Client(connections=N) shared by `--threads` threads calling Execute for
`--seconds`. Printed per run: calls/s and how many serving processes answered
(the kernel hashes each connection to a process: two connections reach one
process half the time); then per count the median calls/s and its ratio to
connections=1, over all runs and over the runs that reached every process.
Numbers on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
from typing import Any

import torch

from fuseport.bench.context import fuseport_server
from fuseport.client import Client

log = logging.getLogger("connections_bench")


def _kernel(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 + 1.0


def _run(target: str, key: int, connections: int, threads: int, seconds: float) -> dict[str, Any]:
    x = torch.randn(256)  # 1 KiB
    with Client(target, timeout=60, connections=connections) as client:
        for _ in range(2 * connections):  # every connection opened before the clock starts
            client.execute(key, [x])
        counts = [0] * threads
        processes: set[str] = set()
        start = threading.Barrier(threads + 1)
        stop = threading.Event()

        def caller(i: int) -> None:
            start.wait()
            n = 0
            while not stop.is_set():
                processes.add(client.execute_detailed(key, [x]).process)
                n += 1
            counts[i] = n

        pool = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        start.wait()
        began = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for t in pool:
            t.join()
        elapsed = time.perf_counter() - began
    return {"connections": connections, "calls_per_s": sum(counts) / elapsed, "processes": len(processes)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--connections", default="1,2")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", help="write every run here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    counts = [int(c) for c in args.connections.split(",")]
    runs: list[dict[str, Any]] = []
    with fuseport_server(args.device, processes=args.processes) as (target, _pid):
        with Client(target, timeout=600, connections=4 * args.processes) as warm:
            key = warm.register(_kernel, [torch.randn(256)])
            # Fused on every process: each loads (or compiles) its kernel before the clock.
            fused: set[str] = set()
            deadline = time.monotonic() + 600
            while len(fused) < args.processes and time.monotonic() < deadline:
                r = warm.execute_detailed(key, [torch.randn(256)], wait=True)
                if r.path == "fused":
                    fused.add(r.process)
        for i in range(args.rounds):
            for n in counts if i % 2 == 0 else counts[::-1]:
                run = _run(target, key, n, args.threads, args.seconds)
                runs.append(run)
                print(
                    f"round {i}  connections={n}  {run['calls_per_s']:8.0f} calls/s  processes {run['processes']}"
                )
    base = statistics.median(r["calls_per_s"] for r in runs if r["connections"] == 1) if 1 in counts else None
    print(f"\n{args.threads} threads, one Client, --processes {args.processes}, device {args.device}")
    for n in counts:
        mine = [r for r in runs if r["connections"] == n]
        full = [r["calls_per_s"] for r in mine if r["processes"] == min(n, args.processes)]
        med = statistics.median(r["calls_per_s"] for r in mine)
        line = f"connections={n}: median {med:.0f} calls/s"
        if base:
            line += f" ({med / base:.2f}x connections=1)"
        if full and len(full) != len(mine):
            fmed = statistics.median(full)
            line += (
                f"; runs reaching {min(n, args.processes)} processes ({len(full)}/{len(mine)}): {fmed:.0f}"
            )
            line += f" ({fmed / base:.2f}x)" if base else ""
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
