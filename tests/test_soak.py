"""A mixed soak (slow: `--slow`): four client processes for three minutes of Execute,
Fallback, Register, Unregister, Describe, List and bad requests, payloads from 1 KiB to
4 MiB. Every call ends OK or with the typed error its request deserves, and the server's
resident memory at the end is at most 1.2x what it was after warm-up.

FUSEPORT_SOAK_SECONDS changes the length (the 1.2x claim is for the default).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest
import torch

from fuseport.client import Client
from fuseport.wire.errors import KernelNotFound, SignatureMismatch

from .conftest import start_server

SECONDS = float(os.environ.get("FUSEPORT_SOAK_SECONDS", "180"))
WARM_UP = min(30.0, SECONDS / 6)
CLIENTS = 4
ROWS = (32, 512, 8192, 131072)  # inputs of 1 KiB to 4 MiB


def _kernels():
    return [
        lambda x, y: torch.nn.functional.gelu(x * y + 1).sum(-1),
        lambda x: (x.softmax(-1) * x).cumsum(0),
        lambda x, y: torch.where(x > y, x - y, y * 2),
    ]


def _client(target: str, seed: int, seconds: float) -> dict[str, int]:
    """One client process's loop; returns how its calls ended, by outcome."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    counts: dict[str, int] = {}
    fns = _kernels()
    with Client(target, timeout=120) as c:
        keys = [c.register(f, [torch.randn(4, 8)] * (2 if i != 1 else 1)) for i, f in enumerate(fns)]
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            i = rng.randrange(len(fns))
            rows = rng.choice(ROWS)
            args = [torch.randn(rows, 8)] * (2 if i != 1 else 1)
            what = rng.choice(("execute", "execute", "fallback", "describe", "list", "bad", "churn"))
            try:
                if what == "execute":
                    out = c.execute(keys[i], args)
                    assert torch.allclose(out[0], fns[i](*args), atol=1e-4, rtol=1e-4)
                elif what == "fallback":
                    out = c.fallback(keys[i], args)
                    assert torch.allclose(out[0], fns[i](*args), atol=1e-4, rtol=1e-4)
                elif what == "describe":
                    assert c.describe(keys[i]).key == keys[i]
                elif what == "list":
                    assert len(c.list()) >= 1
                elif what == "bad":
                    c.execute(rng.getrandbits(62), args)  # nobody registered it
                else:  # a kernel of its own, registered and removed again
                    scale = rng.random()
                    key = c.register(lambda x, s=scale: x * s + 1, [torch.randn(3)])
                    assert c.unregister(key)
                outcome = what
            except KernelNotFound:
                outcome = f"{what}: not found"
            except SignatureMismatch:
                outcome = f"{what}: mismatch"
            counts[outcome] = counts.get(outcome, 0) + 1
    return counts



@pytest.mark.slow
def test_mixed_soak_from_several_processes_keeps_memory_flat(tmp_path: Path) -> None:
    server = start_server(tmp_path, None)
    try:
        # Warm-up, part one: every kernel compiled for every input size the clients send
        # (compiling grows the process by design; the claim is about serving).
        with Client(server.target, timeout=300) as c:
            for i, f in enumerate(_kernels()):
                key = c.register(f, [torch.randn(4, 8)] * (2 if i != 1 else 1))
                for rows in ROWS:
                    assert c.execute_detailed(key, [torch.randn(rows, 8)] * (2 if i != 1 else 1), wait=True).path == "fused"
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(CLIENTS) as pool:
            jobs = [pool.apply_async(_client, (server.target, seed, SECONDS)) for seed in range(CLIENTS)]
            # Part two: the load itself for a while (buffers and pools reach their size).
            time.sleep(WARM_UP)  # a point to measure at while the load runs, not a wait for readiness
            warm = server.rss()
            results = [job.get(timeout=SECONDS + 600) for job in jobs]
        end = server.rss()
        totals: dict[str, int] = {}
        for r in results:
            for k, v in r.items():
                totals[k] = totals.get(k, 0) + v
        unexpected = {k: v for k, v in totals.items() if ":" in k and k != "bad: not found"}
        assert not unexpected, totals
        assert totals.get("execute", 0) > 0 and totals.get("churn", 0) > 0, totals
        assert end <= 1.2 * warm, f"RSS {warm >> 20} MiB after warm-up, {end >> 20} MiB at the end; {totals}"
        print(f"soak {SECONDS:.0f} s: RSS {warm >> 20} -> {end >> 20} MiB; calls {totals}")
        assert "Traceback" not in server.log()
    finally:
        server.stop()
