"""Section 5, restart: the first fused call of a known ArgSpec after a restart, and that it compiled nothing.

A server on a fresh store compiles a fresh kernel (waiting for it) and is
stopped; a second server on the same store and artifact cache then gets one
Execute of the same ArgSpec (other sizes) without waiting. Its latency, as the
client sees it, is judged against the issue's 1 s; its path must be fused, and
the second server's Describe must show the ArgSpec loaded from the cache, its
compile count (ArgSpecs that compiled in that process's life) 0.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fuseport.bench.context import fuseport_server
from fuseport.bench.kernels import fresh_kernel
from fuseport.bench.stats import Row, Section
from fuseport.client import Client

__all__ = ["run"]

log = logging.getLogger(__name__)


# Warm restart is the artifact cache's, with the default settings (the standalone compiler).
_DEFAULTS: dict[str, str] = {}


def run(ctx: Any) -> Section:
    timeout = ctx.options.timeout
    device = str(ctx.server_device)
    fn, constant = fresh_kernel()
    with tempfile.TemporaryDirectory(prefix="fuseport-bench-restart-") as tmp:
        store = Path(tmp) / "store"
        with fuseport_server(device, env=_DEFAULTS, store_dir=store) as (target, _), Client(target, timeout=timeout) as c:
            key = c.register(fn, [torch.randn(64)])
            log.info("restart: compiling kernel %d on the first server", key)
            t0 = time.perf_counter()
            first = c.execute_detailed(key, [torch.randn(4096)], wait=True)
            compile_s = time.perf_counter() - t0
        started = time.perf_counter()
        with fuseport_server(device, env=_DEFAULTS, store_dir=store) as (target, _), Client(target, timeout=timeout) as c:
            start_s = time.perf_counter() - started
            x = torch.randn(3000)
            t0 = time.perf_counter_ns()
            r = c.execute_detailed(key, [x])
            first_ms = (time.perf_counter_ns() - t0) / 1e6
            t0 = time.perf_counter_ns()
            c.execute_detailed(key, [x])
            second_ms = (time.perf_counter_ns() - t0) / 1e6
            specs = c.describe(key).arg_specs
    compiled_after = sum(1 for a in specs if not a.from_cache)
    data = {
        "kernel": f"fresh kernel, c = {constant!r}, 4096 then 3000 float32",
        "first_server_path": first.path,
        "first_server_compile_s_client": compile_s,
        "second_server_start_s": start_s,
        "first_call_ms": first_ms,
        "second_call_ms": second_ms,
        "first_call_path": r.path,
        "first_call_reason": r.reason,
        "arg_specs_compiled_after_restart": compiled_after,
        "arg_specs_loaded_from_cache": sum(1 for a in specs if a.from_cache),
    }
    ok = r.path == "fused" and compiled_after == 0
    row = Row("restart", "first fused call after restart", first_ms, "ms", target="<= 1000",
              note=f"path {r.path}{'/' + r.reason if r.reason else ''}; compiles after restart: "
                   f"{compiled_after}; second call {second_ms:.1f} ms; compile before restart "
                   f"{compile_s:.1f} s").judge()  # fmt: skip
    if not ok:
        row.status = "MISS"
    return Section("restart", [row], data)
