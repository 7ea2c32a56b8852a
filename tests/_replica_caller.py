"""A client process of the failover test (tests/test_replicas.py): imports only what a client needs, so it starts fast."""

from __future__ import annotations

import time
import traceback
from typing import Any

import torch

from fuseport.client import Client
from fuseport.wire import _pb


def affine(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def caller(targets: list[str], graph: bytes, stop: Any, results: Any, index: int) -> None:
    """Registers the kernel, then Execute and Fallback in turn, each result checked
    against eager, until told to stop (or a bound); reports (index, ok, failures)."""
    ok, failures = 0, []
    try:
        with Client(targets, timeout=60) as c:
            key = c.register(_pb.graph.Graph.FromString(graph))
            gen = torch.Generator().manual_seed(index)
            deadline = time.monotonic() + 600
            while not stop.is_set() and time.monotonic() < deadline:
                x = torch.randn(64, generator=gen)
                try:
                    run = c.execute if ok % 2 else c.fallback
                    out = run(key, ["below", x])
                    assert out[0] == "below" and torch.equal(out[1], affine(x)), f"wrong result: {out}"
                    ok += 1
                except Exception as e:  # noqa: BLE001 - every failure is reported to the test
                    failures.append(f"{type(e).__name__}: {e}")
    except Exception:  # noqa: BLE001
        failures.append(traceback.format_exc())
    results.put((index, ok, failures))
