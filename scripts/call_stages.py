#!/usr/bin/env python3
"""Where a small Execute's time goes, end to end (issue 19): one client, a real
`fuseport serve` (default settings) and the bench's echo server beside it,
calls interleaved so that each row sees the same machine:

  echo          the raw gRPC echo of the request's bytes (the floor)
  raw Execute   the same Execute request bytes sent through a bare stub: the
                server's whole cost, without the client library's Python
  Client        Client.execute_detailed: what a user calls
  resident      Client.execute on a RemoteTensor (keep=True, output dropped: the
                next call frees it)

then the client's own stages in process (encode, decode) and the server's
Timings (decode, queue, run, encode). With --py-spy, the server is sampled
while the raw Execute loop runs and its busiest functions are printed.

    python scripts/call_stages.py [--device cpu|cuda] [--n 2000] [--py-spy]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fuseport.bench.context import fuseport_server
from fuseport.bench.echo import echo_channel, echo_server, echo_stub
from fuseport.bench.procs import roles, thread_cpu_us, tree
from fuseport.client import Client
from fuseport.wire import codec


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--py-spy", action="store_true")
    ap.add_argument("--server-env", action="append", default=[], metavar="K=V", help="added to the server's environment")
    ap.add_argument("--server-flags", default="", help="FUSEPORT_* settings as K=V,K=V (e.g. EVENT_LOOP=asyncio)")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        env = dict(kv.split("=", 1) for kv in args.server_env)
        env.update({f"FUSEPORT_{kv.split('=', 1)[0]}": kv.split("=", 1)[1] for kv in args.server_flags.split(",") if kv})
        target, pid = stack.enter_context(fuseport_server(args.device, env=env))
        echo_target, echo_pid = stack.enter_context(echo_server())
        echo = echo_stub(stack.enter_context(echo_channel(echo_target)))
        client = stack.enter_context(Client(target))
        x = torch.randn(args.size // 4)
        key = client.register(lambda x: x * 2 + 1, [x])
        client.execute(key, [x], wait=True, timeout=600)
        handle = client.execute(key, [x], keep=True)[0]
        # A resident input is another ArgSpec: its compile done before anything is
        # timed (a compile's worker processes would share the machine with the rows).
        client.execute(key, [handle], keep=True, wait=True, timeout=600)
        request = client._execute_request(key, [x], False)  # noqa: SLF001 - the exact bytes Client sends
        raw = client.channel.unary_unary("/fuseport.v1.KernelService/Execute")
        md = client._metadata or None  # noqa: SLF001
        payload = bytes(len(request))

        calls = {
            "echo": lambda: echo(payload, timeout=600),
            "raw Execute": lambda: raw(request, timeout=600, metadata=md),
            "Client.execute": lambda: client.execute_detailed(key, [x]),
            # Its output dropped at once: the next call carries its free (ExecuteOptions.free_handles).
            "resident chained": lambda: client.execute(key, [handle], keep=True),
            # The same with an explicit free(): a FreeHandles call of its own per step.
            "resident + free()": lambda: client.execute(key, [handle], keep=True)[0].free(),
        }
        times: dict[str, list[float]] = {k: [] for k in calls}
        cpu: dict[str, tuple[float, float]] = {}
        server: list[tuple[int, int, int, int]] = []
        for _ in range(200):
            for fn in calls.values():
                fn()
        spy = None
        if args.py_spy:
            out = Path(tempfile.mkdtemp()) / "server.txt"
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(pid), "--subprocesses", "--format", "raw", "--rate", "500",
                 "--output", str(out), *(["--native"] if os.environ.get("PYSPY_NATIVE") else ["--nonblocking"])],
                stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".err"), "wb"),
            )  # fmt: skip
            time.sleep(1.0)  # py-spy attaches
        gc.disable()
        # One row after the other (not interleaved), so that each server's CPU time
        # over the row is that row's: CPU time per call is what a busy shared
        # machine does not blur, unlike wall time.
        threads: dict[str, dict[str, float]] = {}
        for name, fn in calls.items():
            # `fuseport serve` may be a supervisor over serving processes (--processes):
            # the server's CPU is that of the whole tree.
            serving = [echo_pid] if name == "echo" else tree(pid)
            t0 = thread_cpu_us(serving)
            c0 = time.thread_time_ns()
            for _ in range(args.n):
                t = time.perf_counter_ns()
                r = fn()
                times[name].append((time.perf_counter_ns() - t) / 1000)
                if name == "Client.execute":
                    s = r.timings
                    server.append((s.decode_us, s.queue_us, s.run_us, s.encode_us))
            client_us = (time.thread_time_ns() - c0) / 1000 / args.n
            t1 = thread_cpu_us(serving)
            by_role = roles(serving)
            threads[name] = {}
            # Threads alive at both ends only: a process that came or went meanwhile
            # (a compile's worker pool) is not the serving process's cost.
            for tid, (comm, us) in t1.items():
                if tid in t0:
                    label = f"{comm} ({'main' if tid in serving else 'thread'}, {by_role.get(tid, '?')})"
                    threads[name][label] = threads[name].get(label, 0.0) + (us - t0[tid][1]) / args.n
            cpu[name] = (sum(threads[name].values()), client_us)
        gc.enable()
        # The tree at rest: CPU a serving tree burns with no call in flight (a spinning
        # thread or process shows here as CPU per second, not per call).
        t0 = thread_cpu_us(tree(pid))
        time.sleep(2.0)
        t1 = thread_cpu_us(tree(pid))
        by_role = roles(tree(pid))
        idle: dict[str, float] = {}
        for tid, (comm, us) in t1.items():
            if tid in t0:
                label = f"{comm} ({'main' if tid in tree(pid) else 'thread'}, {by_role.get(tid, '?')})"
                idle[label] = idle.get(label, 0.0) + (us - t0[tid][1]) / 2.0
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        floor = p50(times["echo"])
        print(f"{args.size} B, {args.n} calls each, device {args.device}")
        for name, xs in times.items():
            sv, cl = cpu[name]
            print(f"{name:>20}: p50 {p50(xs):7.0f} us  p99 {sorted(xs)[int(len(xs) * 0.99)]:7.0f} us  "
                  f"{p50(xs) / floor:5.2f}x echo   CPU per call: server {sv:6.0f} us, client {cl:6.0f} us")  # fmt: skip
        print("server CPU per call by thread name (us):")
        for name, by in threads.items():
            top = sorted(by.items(), key=lambda kv: -kv[1])[:8]
            print(f"{name:>20}: " + ", ".join(f"{k} {v:.0f}" for k, v in top if v >= 1))
        print("server CPU at rest, no call in flight (us per second): "
              + (", ".join(f"{k} {v:.0f}" for k, v in sorted(idle.items(), key=lambda kv: -kv[1])[:8] if v >= 1)
                 or "none"))  # fmt: skip
        d, q, r, e = (p50([s[i] for s in server]) for i in range(4))
        print(f"server Timings p50: decode {d:.0f} queue {q:.0f} run {r:.0f} encode {e:.0f} us")
        resp = raw(request, timeout=600, metadata=md)

        def clock(fn, n=5000):
            t = time.perf_counter_ns()
            for _ in range(n):
                fn()
            return (time.perf_counter_ns() - t) / n / 1000

        print(f"client in process: request encode {clock(lambda: client._execute_request(key, [x], False)):.1f} us, "
              f"response decode {clock(lambda: codec.decode_execute_response(resp)):.1f} us")  # fmt: skip
        if spy is not None:
            if out.exists():
                _summarise(out)
            else:
                print("py-spy wrote nothing:", out.with_suffix(".err").read_text()[-2000:])


def _summarise(path: Path) -> None:
    """py-spy's raw format: one line per stack, `frame;frame;... count` (the first
    frames name the process and the thread)."""
    own: dict[str, int] = {}
    leaf: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for f in set(frames):
            own[f] = own.get(f, 0) + n
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
    print(f"py-spy: {total} samples of the server (all threads, idle excluded); inclusive share:")
    for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:60]:
        print(f"  {100 * n / max(total, 1):5.1f}%  {f[:150]}")
    print("self (leaf frames):")
    for f, n in sorted(leaf.items(), key=lambda kv: -kv[1])[:40]:
        print(f"  {100 * n / max(total, 1):5.1f}%  {f[:150]}")


if __name__ == "__main__":
    sys.exit(main())
