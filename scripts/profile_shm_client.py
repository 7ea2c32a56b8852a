"""Where a co-located client's 16 MiB Execute spends its time, by py-spy samples of
the client process (idle included: waiting on the server shows as the gRPC wait).

    py-spy record --idle -r 500 -f raw -o out.raw -- python scripts/profile_shm_client.py cuda 16 host
    python scripts/profile_shm_client.py --summarize out.raw

`host`: the client's tensor in host memory; `cuda`: on the client's GPU (CUDA IPC)."""

from __future__ import annotations

import sys
import time
from collections import Counter

import torch

from fuseport.bench.context import fuseport_server
from fuseport.client import Client


def run(device: str, mib: int, where: str) -> None:
    with fuseport_server(device) as (target, _pid):
        c = Client(target, timeout=300, shared_above=0)
        key = c.register(lambda x: x + 0, [torch.zeros(16, dtype=torch.uint8)])
        x = torch.full((mib << 20,), 7, dtype=torch.uint8)
        for name, t in [(where, x.cuda() if where == "cuda" else x)]:
            c.execute(key, [t], wait=True)
            t0 = time.perf_counter()
            for _ in range(40):
                r = c.execute_detailed(key, [t])
            ms = (time.perf_counter() - t0) / 40 * 1e3
            print(f"{name}: {ms:.2f} ms per call, transport {r.transport}, server {r.timings}", flush=True)
        c.close()


def summarize(path: str) -> None:
    own: Counter[str] = Counter()
    total = 0
    for line in open(path):
        stack, n = line.rsplit(" ", 1)
        if "execute_detailed" not in stack:
            continue
        total += int(n)
        own[stack.split(";")[-1]] += int(n)
    print(f"{total} samples inside execute_detailed; by innermost frame:")
    for frame, n in own.most_common(15):
        print(f"{n / total:6.1%} {frame[:140]}")


if __name__ == "__main__":
    if sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
    else:
        run(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "host")
