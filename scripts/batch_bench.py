"""Dynamic batching measured: N client processes calling one small kernel, batched and not, on one server.

    python scripts/batch_bench.py --device cpu --clients 16,32,64 --window-us 500
    python scripts/batch_bench.py --device cuda --clients 16,32,64 --window-us 200 --json out.json

One server with --batch-window-us, one small kernel registered (a 1 KiB float32
input) and a kernel that is not batchable (dropout). Each client process (bench/
concurrency.py's) holds two connections per kernel: one of a default Client
("on") and one of `Client(batching=False)`, whose calls say ExecuteOptions.no_batching
and so run one by one as on a server without a window ("off"): both sides meet the
same serving processes, in rounds that alternate off/on (--repeats times, the order
turned each time), so that the machine's drift falls on both. Before the rounds the
batched graph's fused kernel is made ready (warm-up rounds until Describe shows its
ArgSpec READY), so that both sides run fused. Each round is logged as it ends;
printed: throughput and p50/p99 per client count for both (their means over the
rounds), the ratios (on / off), and the kernel that is not batchable, whose p50 on
against off is the batching check's own cost. Numbers on a shared machine are noisy:
compare ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

import torch

from fuseport.bench.concurrency import _Clients
from fuseport.bench.context import fuseport_server
from fuseport.client import Client
from fuseport.wire import _pb

log = logging.getLogger("batch_bench")

SHAPE = [16, 16]  # float32: 1 KiB


def _small(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ x.mT) * 0.5 + x.tanh()


def _dropout(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.dropout(x, 0.5, True) + 1


def _ready(client: Client, key: int) -> tuple[bool, str]:
    """Whether every batched graph of the kernel has a READY ArgSpec; what Describe says."""
    info = client.describe(key)
    batched = {k for v in info.batching for k in v.batched_variants}
    ready = {a.variant for a in info.arg_specs if a.state == _pb.service.COMPILE_STATE_READY}
    said = "; ".join(f"{v.sizes}: {'batchable' if v.batchable else v.reason}" for v in info.batching)
    return bool(batched) and batched <= ready, said


def _mean(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of several rounds: calls over the rounds' wall time, the mean of their percentiles."""
    calls = sum(r["calls"] for r in rounds)
    paths: dict[str, int] = {}
    for r in rounds:
        for k, v in r.get("paths", {}).items():
            paths[k] = paths.get(k, 0) + v
    return {
        "rounds": len(rounds),
        "calls": calls,
        "throughput": calls / sum(r["wall_s"] for r in rounds),
        "p50_us": sum(r["p50_us"] for r in rounds) / len(rounds),
        "p99_us": sum(r["p99_us"] for r in rounds) / len(rounds),
        "paths": paths,
    }


def _measure(args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    env = {"FUSEPORT_BATCH_WINDOW_US": str(args.window_us), "FUSEPORT_MAX_BATCH": str(args.max_batch)}
    with fuseport_server(args.device, env=env) as (target, _pid), Client(target, timeout=600) as client:
        x = torch.randn(SHAPE)
        keys = {"small": client.register(_small, [x]), "dropout": client.register(_dropout, [x])}
        for key in keys.values():
            client.execute(key, [x], wait=True)
        specs = [
            {"name": f"{name} {side}", "key": key, "target": target, "shape": SHAPE, "client": {"batching": side == "on"}}
            for name, key in keys.items()
            for side in ("off", "on")
        ]
        clients = _Clients(max(levels), {"kernels": specs, "timeout": 600})
        rounds: dict[str, dict[int, list[dict[str, Any]]]] = {"off": {n: [] for n in levels}, "on": {n: [] for n in levels}}
        unbatchable: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        try:
            deadline = time.monotonic() + args.warm_up_seconds
            while True:
                clients.round(max(levels), "small on", 10**9, 2.0)  # batches: the batched graph compiles
                ready, said = _ready(client, keys["small"])
                if ready:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the batched kernel was not ready in {args.warm_up_seconds} s: {said}")
            log.info("batching: %s", said)
            for rep in range(args.repeats):
                sides = ("off", "on") if rep % 2 == 0 else ("on", "off")
                for n in levels:
                    for side in sides:
                        r = clients.round(n, f"small {side}", 10**9, args.duration)
                        rounds[side][n].append(r)
                        log.info("%3d clients, batching %-3s: %7.0f calls/s  p50 %6.0f us  p99 %6.0f us",
                                 n, side, r["throughput"], r["p50_us"], r["p99_us"])  # fmt: skip
                for side in sides:
                    r = clients.round(max(levels), f"dropout {side}", 10**9, args.duration)
                    unbatchable[side].append(r)
                    log.info("not batchable, batching %-3s: p50 %6.0f us", side, r["p50_us"])
        finally:
            clients.close()
        # Launches of the batched graphs (each counts once, whatever its batch size).
        info = client.describe(keys["small"])
        batched = {k for v in info.batching for k in v.batched_variants}
        launches = sum(a.fused_runs + a.fallback_runs for a in info.arg_specs if a.variant in batched)
    return {
        "rounds": {side: {n: _mean(rs) for n, rs in by.items()} for side, by in rounds.items()},
        "unbatchable": {side: _mean(rs) for side, rs in unbatchable.items()},
        "batched_launches": launches,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", default="16,32,64", help="client process counts (comma-separated)")
    p.add_argument("--window-us", type=int, default=500, help="the server's --batch-window-us")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per round")
    p.add_argument("--repeats", type=int, default=2, help="rounds per side and client count (the order alternates)")
    p.add_argument("--warm-up-seconds", type=float, default=600.0)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    levels = sorted({int(n) for n in args.clients.split(",")})
    result = _measure(args, levels)
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"\nbatching on (window {args.window_us} us, max batch {args.max_batch}) vs off (the same server, "
        f"ExecuteOptions.no_batching), {device}, 1 KiB input, {args.repeats} rounds of {args.duration} s each"
    )
    print(
        f"{'clients':>7} {'off/s':>9} {'on/s':>9} {'ratio':>6} {'p50 off':>9} {'p50 on':>9} {'p99 off':>9} {'p99 on':>9}  (us)"
    )
    rows = []
    for n in levels:
        a, b = result["rounds"]["off"][n], result["rounds"]["on"][n]
        ratio = b["throughput"] / a["throughput"]
        rows.append({"clients": n, "off": a, "on": b, "throughput_ratio": ratio})
        print(
            f"{n:>7} {a['throughput']:>9.0f} {b['throughput']:>9.0f} {ratio:>6.2f} {a['p50_us']:>9.0f} "
            f"{b['p50_us']:>9.0f} {a['p99_us']:>9.0f} {b['p99_us']:>9.0f}"
        )
    ua, ub = result["unbatchable"]["off"], result["unbatchable"]["on"]
    p50_ratio = ub["p50_us"] / ua["p50_us"]
    print(
        f"not batchable (dropout), {max(levels)} clients: p50 {ua['p50_us']:.0f} us off, {ub['p50_us']:.0f} us on "
        f"(ratio {p50_ratio:.3f}); throughput {ua['throughput']:.0f}/s off, {ub['throughput']:.0f}/s on"
    )
    for side in ("off", "on"):
        paths: dict[str, int] = {}
        for n in levels:
            for k, v in result["rounds"][side][n]["paths"].items():
                paths[k] = paths.get(k, 0) + v
        print(f"paths ({side}): {paths}")
    print(
        f"batched launches (warm-up rounds included): {result['batched_launches']}; "
        "calls batched or alone: see fuseport_batch_size"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "window_us": args.window_us, "max_batch": args.max_batch, "rows": rows,
                       "unbatchable": {"off": ua, "on": ub, "p50_ratio": p50_ratio}}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
