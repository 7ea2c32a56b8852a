"""A co-located client's shared-memory Execute against the unary echo of the same bytes.

    python scripts/shm_echo_ratio.py [MiB] [rounds]

Starts a CPU `fuseport serve` and the raw gRPC echo server, then times, interleaved
round by round (drift falls on all alike): the unary echo of MiB bytes; `x + 0` on a
uint8 tensor of MiB through shared memory with the caller keeping each result until the
next call (`out = c.execute(...)` in a loop); and the same with the result dropped before
the next call. Prints each p50 and its ratio to the echo's (docs/perf.md, issue 21)."""

from __future__ import annotations

import gc
import statistics
import sys
import time
from typing import Any

import torch

from fuseport.bench.context import fuseport_server
from fuseport.bench.echo import echo_channel, echo_server, echo_stub
from fuseport.client import Client


def main(mib: int = 16, rounds: int = 30) -> None:
    size = mib << 20
    with fuseport_server("cpu") as (target, _pid), echo_server() as (echo_target, _epid):
        channel = echo_channel(echo_target)
        echo = echo_stub(channel)
        payload = b"\x07" * size
        c = Client(target, timeout=300, shared_above=0)
        d = Client(target, timeout=300, shared_above=0)  # a session of its own: slots not shared with `c`
        key = c.register(lambda x: x + 0, [torch.zeros(16, dtype=torch.uint8)])
        x = torch.full((size,), 7, dtype=torch.uint8)
        held: list[Any] = [None]

        def kept() -> None:
            held[0] = c.execute_detailed(key, [x])  # the previous result lives until this returns

        def dropped() -> None:
            r = d.execute_detailed(key, [x])
            assert r.stack[0].numel() == size and r.transport == "shm", r.transport
            del r

        calls = {"echo": lambda: echo(payload, timeout=300), "shm kept": kept, "shm dropped": dropped}
        for _ in range(3):
            for f in calls.values():
                f()
        lat: dict[str, list[float]] = {k: [] for k in calls}
        names = list(calls)
        gc.disable()
        for i in range(rounds):
            for j in range(len(names)):
                name = names[(i + j) % len(names)]
                t0 = time.perf_counter()
                calls[name]()
                lat[name].append((time.perf_counter() - t0) * 1e3)
        gc.enable()
        echo_ms = statistics.median(lat["echo"])
        for name, values in lat.items():
            p50 = statistics.median(values)
            print(f"{name:12s} p50 {p50:8.2f} ms  {p50 / echo_ms:5.2f}x the unary echo", flush=True)
        c.close()
        d.close()
        channel.close()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
