"""Section 4, compile: first-call compile time, and what requests see while a compile runs.

A fresh kernel (a random constant makes its graph, key and generated source
new, so neither the server nor Inductor's caches have it) is registered, and
its Fallback latency measured on its own first. Then one thread makes an
Execute that waits for the compile (`wait=True`: its latency is the first-call
compile time as a client sees it) while another fires Execute calls without
waiting, back to back, until the compile is done. Those must come back at once
on the fallback (path "fallback", reason "compiling"), and their p99 is judged
against the Fallback's own p99.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from fuseport.bench.kernels import fresh_kernel
from fuseport.bench.stats import Row, Section, no_gc, percentile, summary

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(ctx: Any) -> Section:
    opts = ctx.options
    client, timeout = ctx.client, opts.timeout
    fn, constant = fresh_kernel()
    x = torch.randn(4096)  # 16 KiB: small, so the compile and not the transport is what shows
    key = client.register(fn, [torch.randn(64)])
    n = opts.iterations or (30 if opts.quick else 300)

    log.info("compile: Fallback alone x %d", n)
    for _ in range(5):
        client.fallback_detailed(key, [x], timeout=timeout)
    alone: list[float] = []
    with no_gc():
        for _ in range(n):
            t0 = time.perf_counter_ns()
            client.fallback_detailed(key, [x], timeout=timeout)
            alone.append((time.perf_counter_ns() - t0) / 1000)

    log.info("compile: first Execute of a new kernel, with requests during the compile")
    done = threading.Event()
    during: list[tuple[float, str, str]] = []  # (latency us, path, reason)
    errors: list[BaseException] = []

    def fire() -> None:
        try:
            while not done.is_set():
                t0 = time.perf_counter_ns()
                r = client.execute_detailed(key, [x], timeout=timeout)
                during.append(((time.perf_counter_ns() - t0) / 1000, r.path, r.reason))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    firing = threading.Thread(target=fire, name="bench-during-compile", daemon=True)
    t0 = time.perf_counter()
    firing.start()
    try:
        first = client.execute_detailed(key, [x], wait=True, timeout=timeout)
    finally:
        first_s = time.perf_counter() - t0
        done.set()
        firing.join(timeout=timeout)
    if errors:
        raise errors[0]

    info = client.describe(key)
    compile_s = max((a.compile_seconds for a in info.arg_specs), default=float("nan"))
    compiling = [lat for lat, path, reason in during if path == "fallback" and reason == "compiling"]
    other = [(path, reason) for _, path, reason in during if not (path == "fallback" and reason == "compiling")]
    # Calls that returned fused raced the compile's end; anything else is wrong.
    wrong = [pr for pr in other if pr[0] != "fused"]
    s_alone, s_during = summary(alone), summary(compiling)
    data: dict[str, Any] = {
        "kernel": f"sin(x * c) + cos(x - c) * c, c = {constant!r}, 4096 float32",
        "key": key,
        "compile_s_server": compile_s,
        "first_call_s_client": first_s,
        "first_call_path": first.path,
        "fallback_alone": s_alone,
        "during_compile": s_during,
        "during_compile_fused": sum(1 for pr in other if pr[0] == "fused"),
        "during_compile_wrong": [f"{p}/{r}" for p, r in wrong],
        "requests_during": len(during),
    }
    rows = [
        Row("compile", "first-call compile time", compile_s, "s", "",
            note=f"server-side; a waiting client saw {first_s:.2f} s"),
    ]
    if compiling:
        waited = max(compiling) / 1e6 > 0.5 * compile_s
        rows.append(
            Row("compile", "requests during compile served by fallback", float(len(compiling)), "calls",
                "requests sent", float(len(compiling) + len(wrong)), target=">= 1.0x",
                note=("SOME WAITED for the compile; " if waited else "none waited; ")
                + f"max {max(compiling) / 1e3:.1f} ms vs compile {compile_s:.1f} s"
                + (f"; wrong paths {data['during_compile_wrong'][:3]}" if wrong else "")).judge()
        )
        if waited:
            rows[-1].status = "MISS"
        rows.append(
            Row("compile", "p99 of requests during compile", s_during["p99_us"] / 1e3, "ms",
                "Fallback p99 alone", s_alone["p99_us"] / 1e3, target="<= 2x",
                note=f"p50 {s_during['p50_us'] / 1e3:.2f} ms vs {s_alone['p50_us'] / 1e3:.2f} ms; "
                     f"{len(compiling)} requests").judge()
        )
    else:
        rows.append(
            Row("compile", "requests during compile served by fallback", 0.0, "calls", "", target=">= 1",
                note="no request came back during the compile", status="MISS")
        )
    data["during_compile"]["p50_us_all"] = percentile([d[0] for d in during], 50) if during else None
    return Section("compile", rows, data)
