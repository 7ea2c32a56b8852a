#!/usr/bin/env python3
"""The client library's own CPU per small call (issue 19): one real `fuseport serve`
(CPU, default settings), and client processes that call it in turns, each timing
its rows by CPU time per call (the calling thread's, and the whole process's:
gRPC's own threads included) over `--n` calls after 200 of warm-up:

  stub          the Execute request's bytes, pre-encoded, through a bare stub
                with the client's metadata: the floor the library adds to
  stub+trailer  the same with with_call and trailing_metadata() (the serving
                process that answered, as the client learns it)
  execute       Client.execute(key, [x]) on a 1 KiB float32 tensor
  detailed      Client.execute_detailed (the same call, the ExecuteResult kept)
  chain         Client.execute(key, [r], keep=True) on the last call's RemoteTensor,
                the one before dropped (its free rides on the next call)
  async         AsyncClient.execute, awaited one at a time on one loop

Rows are interleaved (each round runs every row once), so each sees the machine
in the same state; the median of the rounds is printed, and the median of each
round's difference to its own stub row (the library's cost, which the machine's
drift between rounds moves least). With `--baseline DIR`
(a tree of this repository, e.g. `git archive main | tar -x -C DIR`), client
processes of that tree and of this one alternate against the same server, and
the rows of both are printed side by side: the server is this tree's for both.

    python scripts/client_cpu.py [--n 2000] [--rounds 5] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
# Import names of the installed packages -> their folders in a tree (pyproject's mapping).
_PACKAGES = {
    "fuseport.bench": "bench",
    "fuseport.cli": "cli",
    "fuseport.client": "client",
    "fuseport.kserve": "proto/fuseport/kserve",
    "fuseport.server": "server",
    "fuseport.v1": "proto/fuseport/v1",
    "fuseport.wire": "wire",
}


def _use_tree(root: Path) -> None:
    """Imports fuseport's packages from `root` instead of the installed (editable) tree."""
    import importlib.machinery
    import importlib.util

    class Finder:
        @classmethod
        def find_spec(cls, fullname: str, path: object = None, target: object = None) -> object:
            folder = _PACKAGES.get(fullname)
            if folder is not None:
                init = root / folder / "__init__.py"
                return importlib.util.spec_from_file_location(
                    fullname, init, submodule_search_locations=[str(root / folder)]
                )
            parent, _, _ = fullname.rpartition(".")
            if parent in _PACKAGES:
                return importlib.machinery.PathFinder.find_spec(fullname, [str(root / _PACKAGES[parent])])
            return None

    sys.meta_path.insert(0, Finder)  # type: ignore[arg-type]


def _child(target: str, n: int, rounds: int) -> None:
    import asyncio
    import gc
    import time

    import torch

    from fuseport.client import AsyncClient, Client
    from fuseport.wire import codec

    def timed(fn: object, count: int) -> tuple[float, float]:
        for _ in range(200):
            fn()  # type: ignore[operator]
        t, p = time.thread_time_ns(), time.process_time_ns()
        for _ in range(count):
            fn()  # type: ignore[operator]
        return (time.thread_time_ns() - t) / count / 1000, (time.process_time_ns() - p) / count / 1000

    out: dict[str, list[tuple[float, float]]] = {}
    gc.disable()  # a collection inside one row's loop would land on that row alone
    with Client(target, timeout=300) as c:
        x = torch.ones(256)
        key = c.register(lambda x: x * 2.0 + 1.0, [x])
        c.execute(key, [x], wait=True)
        conn = c._pool.first
        method = conn.methods["Execute"]
        md = c._metadata
        req = codec.encode_execute_request(key, [x])
        chain = [c.execute(key, [x], keep=True)[0]]

        def link() -> None:
            chain[0] = c.execute(key, chain, keep=True)[0]

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # a grpc.aio channel belongs to the loop it was made on
        ac = AsyncClient(target, timeout=300)

        async def async_rows(count: int) -> None:
            for _ in range(count):
                await ac.execute(key, [x])

        def async_timed(count: int) -> tuple[float, float]:
            loop.run_until_complete(async_rows(200))
            t, p = time.thread_time_ns(), time.process_time_ns()
            loop.run_until_complete(async_rows(count))
            return (time.thread_time_ns() - t) / count / 1000, (time.process_time_ns() - p) / count / 1000

        rows = {
            "stub": lambda: method(req, timeout=600, metadata=md),
            "stub+trailer": lambda: method.with_call(req, timeout=600, metadata=md)[1].trailing_metadata(),
            "execute": lambda: c.execute(key, [x]),
            "detailed": lambda: c.execute_detailed(key, [x]),
            "chain": link,
        }
        for _ in range(rounds):
            for name, fn in rows.items():
                out.setdefault(name, []).append(timed(fn, n))
                gc.collect()
            out.setdefault("async", []).append(async_timed(n))
            gc.collect()
        loop.run_until_complete(ac.close())
        loop.close()
        chain.clear()
    print(json.dumps(out))


def _run_child(root: Path | None, target: str, n: int, rounds: int) -> dict[str, list[list[float]]]:
    cmd = [sys.executable, __file__, "--child", target, "--n", str(n), "--rounds", str(rounds)]
    if root is not None:
        cmd += ["--root", str(root)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"client of {root or HERE} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of rows per client process")
    ap.add_argument("--turns", type=int, default=2, help="client processes per tree, alternating")
    ap.add_argument("--baseline", type=Path, help="another tree of this repository, for its client")
    ap.add_argument("--child", metavar="TARGET", help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.root is not None:
        _use_tree(args.root)
    if args.child:
        _child(args.child, args.n, args.rounds)
        return
    from fuseport.bench.context import fuseport_server

    trees: list[tuple[str, Path | None]] = [("this", None)]
    if args.baseline is not None:
        trees.insert(0, ("baseline", args.baseline.resolve()))
    got: dict[str, dict[str, list[list[float]]]] = {name: {} for name, _ in trees}
    with fuseport_server("cpu") as (target, _pid):
        for turn in range(args.turns):
            for name, root in trees if turn % 2 == 0 else trees[::-1]:
                for row, values in _run_child(root, target, args.n, args.rounds).items():
                    got[name].setdefault(row, []).extend(values)
    print(
        f"client CPU per call, us (median of {args.turns * args.rounds} rounds of {args.n} calls;"
        f" thread / process; in brackets: over the stub row of the same round), {os.cpu_count()} cores"
    )
    header = "".join(f"{name:>34s}" for name, _ in trees)
    print(f"{'':14s}{header}")
    for row in got[trees[-1][0]]:
        cells = []
        for name, _ in trees:
            values, stub = got[name][row], got[name]["stub"]
            thread = statistics.median(v[0] for v in values)
            process = statistics.median(v[1] for v in values)
            over = statistics.median(v[0] - s[0] for v, s in zip(values, stub, strict=True))
            cells.append(f"{thread:9.1f} / {process:6.1f} [{over:+7.1f}]    ")
        print(f"{row:14s}{''.join(cells)}")


if __name__ == "__main__":
    main()
