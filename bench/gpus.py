"""Section gpus: throughput of independent compute-bound requests on one device against several.

The issue's target: on a machine with two GPUs, `--device all` (a serving process
per GPU) serves independent compute-bound requests at >= 1.8x the throughput of
one GPU. The kernel makes a large matrix from a small input (a 64x64 tile
repeated to 4096x4096 on a GPU) and multiplies it by itself several times: about
0.55 TFLOP per call, 16 KiB in and out, so the device, not the transport or the
server's Python, is what limits the rate.

Two servers, in one run: the one `fuseport bench` started for `--device` (at least
two devices: `all` on a machine with two GPUs; `cpu,cpu` runs the same code on
the CPU, a smoke check that measures nothing about GPUs), and one process on the
first of those devices alone. The same client processes as the concurrency
section (bench/concurrency.py), each with a connection of its own, spread evenly
over the first server's processes, take turns on both servers: one round on one
device, one on all, twice (so both see the same machine state), each a fixed
duration. Throughput is calls over the round's wall time; the ratio is the mean
of the rounds on all devices over the mean of the rounds on one.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from typing import Any

import torch

from fuseport.bench.concurrency import _Clients
from fuseport.bench.context import fuseport_server
from fuseport.bench.stats import Row, Section
from fuseport.client import Client

__all__ = ["compute_kernel", "run", "shape_for"]

log = logging.getLogger(__name__)

TARGET = ">= 1.8x"


def shape_for(on_gpu: bool, quick: bool) -> tuple[int, int, int]:
    """(tile, repeats, layers): the input is tile x tile, the matrices (tile * repeats)^2."""
    if quick:
        return 16, 8, 2  # 128x128: checks that everything runs
    if on_gpu:
        return 64, 64, 4  # 4096x4096 float32, 4 matmuls: ~0.55 TFLOP per call
    return 32, 16, 4  # 512x512 on a CPU: ~1 GFLOP per call


def compute_kernel(tile: int, repeats: int, layers: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (tile x tile) -> `layers` matmuls of an n x n matrix (n = tile * repeats)
    with itself, scaled and squashed so that values stay near 1, summed over rows
    (n values back)."""
    scale = 1.0 / math.sqrt(tile * repeats)

    def kernel(x: torch.Tensor) -> torch.Tensor:
        a = x.repeat(repeats, repeats)
        for _ in range(layers):
            a = torch.tanh((a @ a) * scale)
        return a.sum(dim=0)

    return kernel


def _flops(per_second: float) -> str:
    return f"{per_second / 1e12:.1f} TFLOP/s" if per_second >= 1e12 else f"{per_second / 1e9:.1f} GFLOP/s"


def _processes(
    target: str, count: int, key: int, timeout: float, client_kwargs: dict[str, Any]
) -> dict[str, str]:
    """The serving processes behind `target` (their resident.server ids), and each one's
    device: new connections until `count` distinct processes have answered."""
    found: dict[str, str] = {}
    for _ in range(50 * count):
        with Client(
            target, timeout=timeout, options=[("grpc.use_local_subchannel_pool", 1)], **client_kwargs
        ) as c:
            process = c.resident().server
            if process not in found:
                found[process] = c.describe(key).device
        if len(found) == count:
            return found
    raise RuntimeError(
        f"{50 * count} connections to {target} reached {len(found)} of {count} serving processes"
    )


def run(ctx: Any, devices: list[str], processes: int, server_env: dict[str, str]) -> Section:
    """`devices`: what the server `ctx.target` serves (at least two), with `processes`
    serving processes; `server_env`: the environment `fuseport bench` gave it."""
    if len(devices) < 2:
        raise ValueError(f"the gpus section compares one device with several; the server serves {devices}")
    opts = ctx.options
    timeout = opts.timeout
    clients = max(opts.clients)
    duration = 1.0 if opts.quick else 8.0
    tile, repeats, layers = shape_for(ctx.on_gpu, opts.quick)
    n = tile * repeats
    fn = compute_kernel(tile, repeats, layers)
    x = torch.randn(tile, tile, generator=torch.Generator().manual_seed(0))
    key = ctx.client.register(fn, [x])
    expected = fn(x.to(ctx.local_device) if ctx.local_device is not None else x).cpu()
    many = _processes(ctx.target, processes, key, timeout, ctx.client_kwargs)
    ids = list(many)
    log.info("gpus: %d serving processes on %s: %s", processes, ctx.target, many)
    with (
        fuseport_server(devices[0], server_env, processes=1) as (one_target, _),
        Client(one_target, timeout=timeout) as one,
    ):
        assert one.register(fn, [x]) == key  # content-addressed: the same key on both
        checked: dict[str, float] = {}
        for name, client in (("one", one), ("all", ctx.client)):
            got = client.execute(key, [x], wait=True)[0]
            checked[name] = float((got - expected).abs().max())
            # Loose: cuBLAS may pick another algorithm in another process; a wrong result is off by O(1).
            torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
        shape = [tile, tile]
        cfgs = [
            {
                "timeout": timeout,
                "client": ctx.client_kwargs,
                "kernels": [
                    {"name": "one", "target": one_target, "key": key, "shape": shape},
                    {
                        "name": "all",
                        "target": ctx.target,
                        "key": key,
                        "shape": shape,
                        "process": ids[i % len(ids)],
                    },
                ],
            }
            for i in range(clients)
        ]
        log.info("gpus: starting %d client processes", clients)
        procs = _Clients(clients, cfgs)
        rounds: dict[str, list[dict[str, Any]]] = {"one": [], "all": []}
        try:
            for _ in range(1 if opts.quick else 2):
                for name in ("one", "all"):
                    log.info(
                        "gpus: %d clients on %s", clients, "one device" if name == "one" else "every device"
                    )
                    rounds[name].append(procs.round(clients, name, opts.iterations or 10**9, duration))
        finally:
            procs.close()
    one_tp = statistics.fmean(r["throughput"] for r in rounds["one"])
    all_tp = statistics.fmean(r["throughput"] for r in rounds["all"])
    flops = layers * 2 * n**3
    what = f"{layers} matmuls {n}x{n} float32 per call"
    rows = [
        Row("gpus", f"compute-bound calls/s, 1 device ({devices[0]})", one_tp, "calls/s",
            note=f"{what}; {clients} clients; {_flops(one_tp * flops)}"),
        Row("gpus", f"compute-bound calls/s, {len(devices)} devices ({processes} processes)", all_tp, "calls/s",
            "1 device calls/s", one_tp, target=TARGET,
            note=_flops(all_tp * flops)).judge(gpu_only=True, on_gpu=ctx.on_gpu),
    ]  # fmt: skip
    data = {
        "devices": devices,
        "processes": processes,
        "process_devices": many,
        "clients": clients,
        "clients_per_process": {p: sum(1 for i in range(clients) if ids[i % len(ids)] == p) for p in ids},
        "kernel": {"tile": tile, "repeats": repeats, "layers": layers, "n": n, "flop_per_call": flops},
        "duration_s": duration,
        "max_abs_diff": checked,
        "one": rounds["one"],
        "all": rounds["all"],
        "ratio": all_tp / one_tp if one_tp else float("nan"),
    }
    return Section("gpus", rows, data)
