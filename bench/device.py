"""Section 2, the device: fused against unfused run time for a pointwise chain, a softmax and an MLP.

Two views of each kernel:

* through the server: Execute (fused) and Fallback of the same input, and the
  server's own `run_us` for each (on a GPU that includes the copies to and
  from the device, which the kernels cannot beat);
* in this process, on the same device, the graph the server runs: compiled as
  the server compiles it, interpreted unfused as the server's fallback runs
  it, and the original function in eager mode. Timed with CUDA events on a
  GPU, wall clock on a CPU; the median of N after warm-up.

The pointwise chain is also compared with the memory floor: the bytes a
perfect kernel must read and write once, over the device's measured copy
bandwidth (a device-to-device copy of a large buffer, counted read + write).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from fuseport.bench.context import Context
from fuseport.bench.kernels import DeviceCase, device_cases
from fuseport.bench.stats import Row, Section, fmt_bytes, gbps, percentile, time_host

__all__ = ["run"]

log = logging.getLogger(__name__)


# On a GPU each sample times this many calls back to back between two events:
# the queue stays full, so the device time is not padded by the host's launch
# latency (tens of microseconds against a 64M-element kernel's ~200).
CUDA_BATCH = 5


def time_device(fn: Any, device: torch.device, iterations: int, warmup: int) -> list[float]:
    """Microseconds per call: CUDA events on a GPU (device time of everything
    `fn` enqueues), wall clock on a CPU."""
    if device.type != "cuda":
        return time_host(fn, iterations, warmup)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    out = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CUDA_BATCH):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1000 / CUDA_BATCH)
    return out


def copy_bandwidth(device: torch.device, nbytes: int, iterations: int) -> dict[str, float]:
    """Device-to-device copy: bytes read + written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    us = percentile(time_device(lambda: dst.copy_(src), device, iterations, warmup=3), 50)
    return {"bytes": nbytes, "p50_us": us, "gbps": gbps(2 * nbytes, us / 1e6)}


def run(ctx: Context) -> Section:
    opts = ctx.options
    cases = device_cases(ctx.on_gpu, opts.quick)
    n_server = opts.iterations or (3 if opts.quick else 10)
    n_local = opts.iterations or (5 if opts.quick else (50 if ctx.on_gpu else 20))
    device = ctx.local_device
    data: dict[str, Any] = {
        "server_device": str(ctx.server_device),
        "local_device": str(device) if device is not None else None,
        "timer": "cuda events" if device is not None and device.type == "cuda" else "perf_counter",
        "server_iterations": n_server,
        "local_iterations": n_local,
        "cases": {},
    }
    if device is None:
        log.warning("device: the server's device %s is not available here; in-process rows skipped", ctx.server_device)
    else:
        big = max(c.min_bytes // 2 for c in cases)
        nbytes = max(big, (16 << 20) if opts.quick else (256 << 20))
        data["copy"] = copy_bandwidth(device, nbytes, n_local)
        log.info("device: copy bandwidth %.1f GB/s (%s)", data["copy"]["gbps"], fmt_bytes(nbytes))
    rows: list[Row] = []
    for case in cases:
        result = _case(ctx, case, n_server, n_local)
        data["cases"][case.name] = result
        rows.extend(_rows(ctx, case, result, data.get("copy")))
    return Section("device", rows, data)


def _case(ctx: Context, case: DeviceCase, n_server: int, n_local: int) -> dict[str, Any]:
    from fuseport.wire.capture import capture
    from fuseport.wire.graph import build_module

    client, timeout = ctx.client, ctx.options.timeout
    log.info("device: %s", case.description)
    graph = capture(case.fn, case.example)
    key = client.register(graph)
    x = case.make_input()
    first = client.execute_detailed(key, [x], wait=True, timeout=timeout)
    out: dict[str, Any] = {
        "description": case.description,
        "key": key,
        "elements": case.elements,
        "input_bytes": x.numel() * x.element_size(),
        "min_bytes": case.min_bytes,
        "first_call_s": first.timings.total_us / 1e6,
    }
    fused, fallback = [], []
    for i in range(n_server):
        pair = [
            ("fused", lambda: client.execute_detailed(key, [x], timeout=timeout)),
            ("fallback", lambda: client.fallback_detailed(key, [x], timeout=timeout)),
        ]
        for name, call in pair if i % 2 == 0 else pair[::-1]:
            (fused if name == "fused" else fallback).append(call())
    for name, results in (("execute", fused), ("fallback", fallback)):
        paths: dict[str, int] = {}
        for r in results:
            label = r.path if not r.reason else f"{r.path}/{r.reason}"
            paths[label] = paths.get(label, 0) + 1
        out[name] = {
            "paths": paths,
            **{
                f"{part}_p50": percentile([getattr(r.timings, part) for r in results], 50)
                for part in ("decode_us", "queue_us", "run_us", "encode_us", "total_us")
            },
        }
    device = ctx.local_device
    if device is None:
        return out

    xd = x.to(device)
    fallback_module = build_module(graph, device)
    compiled = torch.compile(build_module(graph, device), dynamic=True, fullgraph=True)
    fn = case.fn
    if isinstance(fn, torch.nn.Module):
        fn = copy.deepcopy(fn).to(device)
    with torch.no_grad():
        expected = fn(xd)
        got = compiled(xd)[0]
        served = fused[-1].stack[-1]
        out["max_abs_diff"] = {
            "compiled": float((got - expected).abs().max()),
            "server_fused": float((served.to(device) - expected).abs().max()),
        }
        del expected, got, served
        # Enough calls that the allocator has settled: glibc maps the first
        # outputs of a size fresh (page faults) and reuses memory only later.
        warmup = 3 if ctx.options.quick else 10
        for name, call in (
            ("fused", lambda: compiled(xd)),
            ("fallback", lambda: fallback_module(xd)),
            ("eager", lambda: fn(xd)),
        ):
            us = time_device(call, device, n_local, warmup)
            out[f"local_{name}_us"] = percentile(us, 50)
            out[f"local_{name}_p99_us"] = percentile(us, 99)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def _rows(ctx: Context, case: DeviceCase, r: dict[str, Any], copy_bw: dict[str, float] | None) -> list[Row]:
    name = case.name
    rows = []
    # The GPU targets are for the sizes: --quick's tiny ones cannot meet them.
    judged_on_gpu = ctx.on_gpu and not ctx.options.quick
    run_fused, run_fallback = r["execute"]["run_us_p50"], r["fallback"]["run_us_p50"]
    note = "includes host<->device copies" if ctx.on_gpu else "server wall time of the run"
    if "local_fused_us" in r:
        fused, eager, fallback = r["local_fused_us"], r["local_eager_us"], r["local_fallback_us"]
        extra = ""
        if copy_bw and case.memory_bound:
            floor_us = case.min_bytes / (copy_bw["gbps"] * 1e9) * 1e6
            r["memory_floor_us"] = floor_us
            extra = f"; {fused / floor_us:.2f}x the memory floor"
        rows.append(
            Row("device", f"{name}: fused kernel vs eager", fused / 1e3, "ms", "eager (same fn)", eager / 1e3,
                note=f"fallback graph {fallback / 1e3:.3f} ms{extra}")
        )
        if case.floor_target and copy_bw:
            rows.append(
                Row("device", f"{name}: fused vs memory floor", fused / 1e3, "ms", "memory floor",
                    r["memory_floor_us"] / 1e3, target="<= 1.15x (GPU)",
                    note=f"{fmt_bytes(case.min_bytes)} read+written at {copy_bw['gbps']:.1f} GB/s").judge(
                    gpu_only=True, on_gpu=judged_on_gpu)
            )
            rows.append(
                Row("device", f"{name}: fused vs fallback", fused / 1e3, "ms", "fallback (unfused graph)",
                    r["local_fallback_us"] / 1e3, target="<= 0.2x (5x faster, GPU)",
                    note=f"{r['local_fallback_us'] / fused:.1f}x faster").judge(gpu_only=True, on_gpu=judged_on_gpu)
            )
    rows.append(
        Row("device", f"{name}: server run_us, Execute", run_fused / 1e3, "ms", "Fallback run_us", run_fallback / 1e3,
            note=f"{note}; paths {r['execute']['paths']} / {r['fallback']['paths']}")
    )
    return rows
