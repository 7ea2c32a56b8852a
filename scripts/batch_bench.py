"""Dynamic batching measured: N client processes calling one small kernel, the same server with batching off and on.

    python scripts/batch_bench.py --device cpu --clients 16,32,64 --window-us 500
    python scripts/batch_bench.py --device cuda --clients 16,32,64 --window-us 200 --json out.json

For each setting (off: --batch-window-us 0; on: the window given) a fresh server
is started, one small kernel registered (a 1 KiB float32 input), and the same
client processes (bench/concurrency.py's, each with its own connection) run one
round per client count. Before the rounds of "on", the batched graph's fused
kernel is made ready (warm-up rounds until Describe shows its ArgSpec READY), so
that both settings run fused. Printed: throughput and p50/p99 per client count for
both, and the ratios (on / off) of the same run; a kernel that is not batchable
(dropout) is measured too, its p50 with batching on against off (it must cost
nothing). Numbers on a shared machine are noisy: compare ratios of one run.
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


def _setting(args: argparse.Namespace, window_us: int, levels: list[int]) -> dict[str, Any]:
    env = {"FUSEPORT_BATCH_WINDOW_US": str(window_us), "FUSEPORT_MAX_BATCH": str(args.max_batch)}
    with fuseport_server(args.device, env=env) as (target, _pid), Client(target, timeout=600) as client:
        x = torch.randn(SHAPE)
        keys = {"small": client.register(_small, [x]), "dropout": client.register(_dropout, [x])}
        for key in keys.values():
            client.execute(key, [x], wait=True)
        specs = [{"name": name, "key": key, "target": target, "shape": SHAPE} for name, key in keys.items()]
        clients = _Clients(max(levels), {"kernels": specs, "timeout": 600})
        try:
            if window_us:
                deadline = time.monotonic() + args.warm_up_seconds
                while True:
                    clients.round(max(levels), "small", 10**9, 2.0)  # batches: the batched graph compiles
                    ready, said = _ready(client, keys["small"])
                    if ready:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"the batched kernel was not ready in {args.warm_up_seconds} s: {said}"
                        )
                log.info("batching: %s", said)
            rounds = {}
            for n in levels:
                log.info("window %d us: %d clients", window_us, n)
                rounds[n] = clients.round(n, "small", 10**9, args.duration)
            unbatchable = clients.round(max(levels), "dropout", 10**9, args.duration)
        finally:
            clients.close()
        # Launches of the batched graphs (each counts once, whatever its batch size).
        info = client.describe(keys["small"])
        batched = {k for v in info.batching for k in v.batched_variants}
        launches = sum(a.fused_runs + a.fallback_runs for a in info.arg_specs if a.variant in batched)
    return {
        "window_us": window_us,
        "rounds": rounds,
        "unbatchable": unbatchable,
        "batched_launches": launches,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", default="16,32,64", help="client process counts (comma-separated)")
    p.add_argument("--window-us", type=int, default=500, help="--batch-window-us of the 'on' server")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per round")
    p.add_argument("--warm-up-seconds", type=float, default=600.0)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    levels = sorted({int(n) for n in args.clients.split(",")})
    off = _setting(args, 0, levels)
    on = _setting(args, args.window_us, levels)
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"\nbatching on (window {args.window_us} us, max batch {args.max_batch}) vs off, {device}, 1 KiB input"
    )
    print(
        f"{'clients':>7} {'off/s':>9} {'on/s':>9} {'ratio':>6} {'p50 off':>9} {'p50 on':>9} {'p99 off':>9} {'p99 on':>9}  (us)"
    )
    rows = []
    for n in levels:
        a, b = off["rounds"][n], on["rounds"][n]
        ratio = b["throughput"] / a["throughput"]
        rows.append({"clients": n, "off": a, "on": b, "throughput_ratio": ratio})
        print(
            f"{n:>7} {a['throughput']:>9.0f} {b['throughput']:>9.0f} {ratio:>6.2f} {a['p50_us']:>9.0f} "
            f"{b['p50_us']:>9.0f} {a['p99_us']:>9.0f} {b['p99_us']:>9.0f}"
        )
    ua, ub = off["unbatchable"], on["unbatchable"]
    p50_ratio = ub["p50_us"] / ua["p50_us"]
    print(
        f"not batchable (dropout), {max(levels)} clients: p50 {ua['p50_us']:.0f} us off, {ub['p50_us']:.0f} us on "
        f"(ratio {p50_ratio:.3f}); throughput {ua['throughput']:.0f}/s off, {ub['throughput']:.0f}/s on"
    )
    for name, result in (("off", off), ("on", on)):
        paths: dict[str, int] = {}
        for n in levels:
            for k, v in result["rounds"][n].get("paths", {}).items():
                paths[k] = paths.get(k, 0) + v
        print(f"paths ({name}): {paths}")
    launches = on["batched_launches"]
    print(
        f"batched launches (on, warm-up rounds included): {launches}; calls batched or alone: see fuseport_batch_size"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "window_us": args.window_us, "max_batch": args.max_batch, "rows": rows,
                       "unbatchable": {"off": ua, "on": ub, "p50_ratio": p50_ratio}}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
