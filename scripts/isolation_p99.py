#!/usr/bin/env python3
"""Issue 20's target: while one caller's call runs for ~30 s on a serving process, other
callers' small calls keep a p99 within 2x their idle p99, and health answers every poll
within 1 s. A real `fuseport serve` with the default settings (and tokens, so that the two
callers are two identities); the heavy call is a Fallback of `x.expand(n, 1024).sum()`.

    python scripts/isolation_p99.py [--device cpu|cuda] [--seconds 30] [--n 2000]

On CUDA the heavy kernel holds the device, not a core: what the other caller's
small calls then wait for is the GPU itself.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuseport.bench.context import fuseport_server
from fuseport.client import Client


def heavy(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.expand(n, x.shape[0]).sum()


def small(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 + 1.0


def p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the heavy call should run (about)")
    ap.add_argument("--n", type=int, default=2000, help="small calls per phase")
    ap.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE")
    a = ap.parse_args()
    admin, user, other = (secrets.token_urlsafe(16) for _ in range(3))
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        tokens.write_text(f"{admin} admin\n{user} user\n{other} user\n")
        with fuseport_server(a.device, env={"FUSEPORT_AUTH_TOKENS": str(tokens), **dict(e.split("=", 1) for e in a.server_env)}) as (target, _pid):
            with Client(target, timeout=600, token=admin) as c:
                hk = c.register(heavy, [torch.zeros(1024), 4])
                sk = c.register(small, [torch.ones(256)])
            x = torch.zeros(1024)
            with Client(target, timeout=600, token=user) as u, Client(target, timeout=60, token=other) as o:
                o.execute(sk, [torch.ones(256)], wait=True)
                # Size the heavy call: double n until a call takes long enough that the
                # call's fixed cost does not count (a GPU does 2**20 rows in well under a
                # millisecond), then scale to --seconds.
                n = 1 << 20
                while True:
                    t0 = time.perf_counter()
                    u.fallback(hk, [x, n])
                    took_n = time.perf_counter() - t0
                    if took_n > 0.25 or n >= 1 << 40:
                        break
                    n *= 2
                n = max(n, int(n * a.seconds / took_n))

                def phase() -> list[float]:
                    lat = []
                    for _ in range(a.n):
                        t = time.perf_counter()
                        o.execute(sk, [torch.ones(256)])
                        lat.append((time.perf_counter() - t) * 1e6)
                    return lat

                idle = phase()
                polls: list[float] = []
                done = threading.Event()
                took: list[float] = []

                def run_heavy() -> None:
                    t = time.perf_counter()
                    u.fallback(hk, [x, n])
                    took.append(time.perf_counter() - t)
                    done.set()

                def poll() -> None:
                    with grpc.insecure_channel(target) as ch:
                        stub = health_pb2_grpc.HealthStub(ch)
                        while not done.is_set():
                            t = time.perf_counter()
                            stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                            polls.append(time.perf_counter() - t)
                            done.wait(0.05)

                threads = [threading.Thread(target=run_heavy), threading.Thread(target=poll)]
                for t in threads:
                    t.start()
                time.sleep(0.5)  # the heavy call is running
                during = []
                while not done.is_set():
                    during.extend(phase()[: a.n])
                    if len(during) >= a.n and took:
                        break
                for t in threads:
                    t.join()
    print(f"heavy call (another token): {took[0]:.1f} s; health polls {len(polls)}, slowest {max(polls) * 1e3:.0f} ms")
    print(f"small calls idle:   p50 {statistics.median(idle):7.0f} us  p99 {p(idle, 0.99):7.0f} us  ({len(idle)})")
    print(f"small calls during: p50 {statistics.median(during):7.0f} us  p99 {p(during, 0.99):7.0f} us  ({len(during)})")
    ratio = p(during, 0.99) / p(idle, 0.99)
    print(f"p99 during / idle: {ratio:.2f}x (target <= 2x); health within 1 s: {max(polls) < 1.0}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
