#!/usr/bin/env python3
"""Why is the bench's echo floor slower than a plain gRPC echo? (issue 19)

Measures p50/p99 of 1 KiB unary echo calls (identity serializers: bytes in,
bytes out) for a matrix of variants, one factor at a time away from two
anchors:

  plain  sync grpc.server (ThreadPoolExecutor(10)), no options, glibc malloc
         as it comes; client channel with no options, no torch, no per-call
         timeout, the cyclic GC on: what a plain user writes.
  bench  what `fuseport bench` did before issue 19: grpc.aio server with
         fuseport's server options and keep_host_memory(); client channel with
         fuseport Client's options, torch imported (and CUDA initialised where
         there is CUDA), keep_host_memory() in the client (bench/run.py does),
         timeout=600 on every call, GC off while timing (stats.no_gc).

Every server runs in a process of its own, and every variant's client in a
fresh process (so what it imports differs). Extra rows: the bench's own echo
module as it is in this checkout (`python -m fuseport.bench.echo`,
`echo_channel`), an idle gap between calls (the transport section rotates
echo with Execute and Fallback, so the echo server sits idle between its
calls), and, unless --no-fuseport, echo calls interleaved with Execute and
Fallback to a real `fuseport serve` beside it, as the transport section makes them.

    python scripts/echo_floor_probe.py                 # about 2 minutes (--rounds 2: twice that)
    OUT=/some/dir python scripts/echo_floor_probe.py   # also writes $OUT/echo_floor_probe.json

The table comes last. "x plain" is p50 over the plain anchor's p50 of the same round.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ECHO_SERVICE = "fuseport.bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
MAX = 1 << 30

# fuseport's one-process server (server/app.py, Server.__init__), verbatim.
FUSEPORT_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX),
    ("grpc.max_send_message_length", MAX),
    ("grpc.so_reuseport", 0),
]


# ---------------------------------------------------------------- server side


def _serve(kind: str, opts: str, hostmem: bool) -> None:
    if hostmem:
        from fuseport.wire.hostmem import keep_host_memory

        keep_host_memory()  # before gRPC starts its threads, as bench/echo.py does
    import grpc

    options = FUSEPORT_SERVER_OPTIONS if opts == "fuseport" else []
    if kind == "sync":
        from concurrent import futures

        def echo(request: bytes, context: Any) -> bytes:
            return request

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=10), options=options)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        print(port, flush=True)
        sys.stdin.read()  # until the parent closes our stdin
        server.stop(0)
        return

    import asyncio

    async def aecho(request: bytes, context: Any) -> bytes:
        return request

    async def main() -> None:
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(aecho)}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop(0)

    asyncio.run(main())


class Server:
    """A server process; `key` is ("probe", kind, opts, hostmem) or ("module",) for bench/echo.py."""

    def __init__(self, key: tuple[Any, ...]) -> None:
        self.key = key
        self._tmp = None
        if key[0] == "module":
            self._tmp = tempfile.TemporaryDirectory(prefix="echo-probe-")
            port_file = Path(self._tmp.name) / "port"
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fuseport.bench.echo", "--port-file", str(port_file)],
                stdin=subprocess.DEVNULL,
            )
            from fuseport.wire._local import read_port_file

            port = read_port_file(self.proc, port_file, "the echo server", 60, lambda: "")
        else:
            _, kind, opts, hostmem = key
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--serve", kind, opts, str(int(hostmem))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            port = int(self.proc.stdout.readline())  # type: ignore[union-attr]
        self.target = f"127.0.0.1:{port}"

    def close(self) -> None:
        if self.key[0] == "module":
            self.proc.terminate()
        else:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()


# ---------------------------------------------------------------- client side


def _client(cfg: dict[str, Any]) -> None:
    if cfg["hostmem"]:
        from fuseport.wire.hostmem import keep_host_memory

        keep_host_memory()  # bench/run.py does this first thing
    cuda = None
    if cfg["torch"]:
        import warnings

        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        import torch

        if torch.cuda.is_available():
            torch.cuda.init()
            torch.zeros(1, device="cuda")  # a real context, as the bench's client has
            cuda = torch.cuda.get_device_name(0)
    import grpc

    if cfg["channel"] == "module":
        from fuseport.bench.echo import echo_channel

        channel = echo_channel(cfg["target"])
    elif cfg["channel"] == "fuseport":
        # The list comes from the parent: fuseport.client.client imports torch.
        channel = grpc.insecure_channel(cfg["target"], options=[tuple(o) for o in cfg["channel_options"]])
    else:
        channel = grpc.insecure_channel(cfg["target"])
    stub = channel.unary_unary(ECHO_METHOD)
    size = cfg["size"]
    payload = b"\x07" * size
    timeout = cfg["timeout"]
    gap = cfg["gap_s"]
    stub(b"x", wait_for_ready=True, timeout=60)

    others: list[Any] = []
    if cfg.get("fuseport"):
        import torch

        from fuseport.bench.kernels import identity
        from fuseport.client import Client

        client = Client(cfg["fuseport"], timeout=600)
        tensor = torch.full((size,), 7, dtype=torch.uint8)
        x = torch.zeros(size, dtype=torch.uint8)
        key = client.register(identity, [x])
        client.execute_detailed(key, [x], wait=True, timeout=600)
        others = [
            lambda: client.execute_detailed(key, [tensor], timeout=600),
            lambda: client.fallback_detailed(key, [tensor], timeout=600),
        ]

    if timeout is None:

        def call() -> bytes:
            return stub(payload)  # type: ignore[no-any-return]
    else:

        def call() -> bytes:
            return stub(payload, timeout=timeout)  # type: ignore[no-any-return]

    def between() -> None:
        for o in others:
            o()
        if gap:
            time.sleep(gap)

    for _ in range(cfg["warmup"]):
        call()
        between()
    if cfg["gc_off"]:
        gc.collect()
        gc.disable()
    lat = []
    for _ in range(cfg["n"]):
        t0 = time.perf_counter_ns()
        out = call()
        t1 = time.perf_counter_ns()
        if len(out) != size:
            raise RuntimeError(f"echo returned {len(out)} bytes, sent {size}")
        lat.append((t1 - t0) / 1000)
        between()
    gc.enable()
    channel.close()
    print(json.dumps({"lat": lat, "cuda": cuda}), flush=True)


# ---------------------------------------------------------------- the matrix

PLAIN_S = ("probe", "sync", "plain", False)
BENCH_S = ("probe", "aio", "fuseport", True)
PLAIN_C = {"channel": "plain", "torch": False, "timeout": None, "hostmem": False, "gc_off": False, "gap_s": 0.0}
BENCH_C = {"channel": "fuseport", "torch": True, "timeout": 600.0, "hostmem": True, "gc_off": True, "gap_s": 0.0}

# factor name -> (index in the server key, or client key), plain value, bench value
FACTORS = [
    ("server aio", ("s", 1), "sync", "aio"),
    ("server opts", ("s", 2), "plain", "fuseport"),
    ("server hostmem", ("s", 3), False, True),
    ("channel opts", ("c", "channel"), "plain", "fuseport"),
    ("client torch", ("c", "torch"), False, True),
    ("call timeout", ("c", "timeout"), None, 600.0),
    ("client hostmem", ("c", "hostmem"), False, True),
    ("gc off", ("c", "gc_off"), False, True),
]


def _variants(fuseport: bool) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    def changed(server: tuple[Any, ...], client: dict[str, Any], where: str, idx: Any, value: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """One factor of a baseline set to `value`: a server setting ("s") or a client one."""
        s, c = list(server), dict(client)
        if where == "s":
            s[idx] = value
        else:
            c[idx] = value
        return tuple(s), c

    out: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [("plain", PLAIN_S, dict(PLAIN_C))]
    for name, (where, idx), _, bench_v in FACTORS:
        out.append((f"plain + {name}", *changed(PLAIN_S, PLAIN_C, where, idx, bench_v)))
    out.append(("bench (all of them)", BENCH_S, dict(BENCH_C)))
    for name, (where, idx), plain_v, _ in FACTORS:
        out.append((f"bench - {name}", *changed(BENCH_S, BENCH_C, where, idx, plain_v)))
    out.append(("bench/echo.py as checked out", ("module",), {**BENCH_C, "channel": "module"}))
    out.append(("plain, 2 ms idle between calls", PLAIN_S, {**PLAIN_C, "gap_s": 0.002}))
    out.append(("bench, 2 ms idle between calls", BENCH_S, {**BENCH_C, "gap_s": 0.002}))
    if fuseport:
        out.append(("plain, Execute+Fallback between", PLAIN_S, {**PLAIN_C, "torch": True, "fuseport": True}))
        out.append(("module, Execute+Fallback between", ("module",), {**BENCH_C, "channel": "module", "fuseport": True}))
    return out


def _run_client(cfg: dict[str, Any]) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, __file__, "--client", json.dumps(cfg)], capture_output=True, text=True, timeout=300
    )
    if r.returncode != 0:
        raise RuntimeError(f"client failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@contextlib.contextmanager
def _fuseport(device: str) -> Any:
    from fuseport.bench.context import fuseport_server

    with fuseport_server(device) as (target, _pid):
        yield target


def _describe(s: tuple[Any, ...], c: dict[str, Any]) -> tuple[str, str]:
    if s[0] == "module":
        sd = "bench/echo.py"
    else:
        sd = f"{s[1]} {'fpopts' if s[2] == 'fuseport' else 'noopts'} {'hm' if s[3] else 'nohm'}"
    cd = " ".join(
        [
            {"plain": "ch:plain", "fuseport": "ch:fp", "module": "ch:echo_channel"}[c["channel"]],
            "torch" if c["torch"] else "notorch",
            "to" if c["timeout"] is not None else "noto",
            "hm" if c["hostmem"] else "nohm",
            "gcoff" if c["gc_off"] else "gcon",
            *([f"gap{c['gap_s'] * 1000:g}ms"] if c["gap_s"] else []),
            *(["+fuseport"] if c.get("fuseport") else []),
        ]
    )
    return sd, cd


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve", nargs=3, metavar=("KIND", "OPTS", "HOSTMEM"), help=argparse.SUPPRESS)
    p.add_argument("--client", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=2000, help="timed calls per variant and round (default 2000)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=1,
                   help="passes over the matrix, every other one in reverse order (default 1: about 2 minutes "
                        "on a 16-core GPU machine; 2 for a check of drift)")
    p.add_argument("--no-fuseport", action="store_true", help="skip the rows with a fuseport server beside")
    p.add_argument("--device", default=None, help="fuseport server device (default: cuda if available, else cpu)")
    p.add_argument("--only", default=None, help="comma-separated substrings: run only variants whose name has one")
    args = p.parse_args()
    if args.serve:
        _serve(args.serve[0], args.serve[1], args.serve[2] == "1")
        return 0
    if args.client:
        _client(json.loads(args.client))
        return 0

    t_start = time.perf_counter()
    variants = _variants(not args.no_fuseport)
    if args.only:
        keep = [w.strip() for w in args.only.split(",")]
        variants = [v for v in variants if v[0] == "plain" or any(k in v[0] for k in keep)]
    import grpc

    # fuseport Client's channel options, computed here: the module imports torch,
    # which the no-torch clients must not.
    r = subprocess.run(
        [sys.executable, "-c", "import json; from fuseport.client.client import DEFAULT_MAX_MESSAGE_BYTES as M, "
         "_channel_options as o; print(json.dumps(o(M, ())))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    channel_options = json.loads(r.stdout.strip().splitlines()[-1])
    device = args.device
    if device is None:
        r = subprocess.run(
            [sys.executable, "-c", "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"],
            capture_output=True, text=True,
        )  # fmt: skip
        device = (r.stdout.strip() or "cpu").splitlines()[-1]
    env = {"python": platform.python_version(), "grpcio": grpc.__version__, "cpus": os.cpu_count(),
           "machine": platform.node(), "fuseport_device": device}  # fmt: skip
    print(f"echo floor probe: {env}", file=sys.stderr, flush=True)

    servers: dict[tuple[Any, ...], Server] = {}
    results: dict[str, dict[str, Any]] = {name: {"rounds": []} for name, _, _ in variants}
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [s.close() for s in servers.values()])
        fp_target = None
        if any(c.get("fuseport") for _, _, c in variants):
            print(f"starting fuseport serve --device {device}", file=sys.stderr, flush=True)
            fp_target = stack.enter_context(_fuseport(device))
        for rnd in range(args.rounds):
            order = variants if rnd % 2 == 0 else list(reversed(variants))
            for name, skey, ccfg in order:
                if skey not in servers:
                    servers[skey] = Server(skey)
                cfg = {**ccfg, "target": servers[skey].target, "size": args.size, "n": args.n, "warmup": args.warmup,
                       "channel_options": channel_options}  # fmt: skip
                if ccfg.get("fuseport"):
                    cfg["fuseport"] = fp_target
                t0 = time.perf_counter()
                out = _run_client(cfg)
                lat = out["lat"]
                if out.get("cuda"):
                    env["cuda"] = out["cuda"]
                results[name]["rounds"].append(
                    {"p50_us": _pct(lat, 50), "p99_us": _pct(lat, 99), "mean_us": statistics.fmean(lat), "lat": lat}
                )
                print(
                    f"round {rnd + 1} {name:<36} p50 {_pct(lat, 50):7.0f} us  p99 {_pct(lat, 99):7.0f} us"
                    f"  ({time.perf_counter() - t0:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )

    plain_p50 = [r["p50_us"] for r in results["plain"]["rounds"]]
    rows = []
    for name, skey, ccfg in variants:
        rs = results[name]["rounds"]
        pooled = [x for r in rs for x in r["lat"]]
        ratios = [r["p50_us"] / pp for r, pp in zip(rs, plain_p50)]
        sd, cd = _describe(skey, ccfg)
        rows.append({
            "variant": name, "server": sd, "client": cd,
            "p50_us_rounds": [r["p50_us"] for r in rs], "p99_us_rounds": [r["p99_us"] for r in rs],
            "p50_us": _pct(pooled, 50), "p99_us": _pct(pooled, 99),
            "x_plain_rounds": ratios, "x_plain": statistics.median(ratios),
        })  # fmt: skip
    wall = time.perf_counter() - t_start
    doc = {"env": env, "size": args.size, "n": args.n, "warmup": args.warmup, "rounds": args.rounds,
           "wall_s": wall, "fuseport_channel_options": channel_options, "rows": rows}  # fmt: skip
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "echo_floor_probe.json").write_text(json.dumps(doc, indent=1))

    print(f"\n{args.size} B unary echo, {args.n} calls x {args.rounds} rounds; {env}; wall {wall:.0f} s")
    print(f"{'variant':<34} {'server':<20} {'client':<38} {'p50/round us':>14} {'p50':>6} {'p99':>6} {'x plain':>8}")
    for r in rows:
        per = "/".join(f"{v:.0f}" for v in r["p50_us_rounds"])
        print(
            f"{r['variant']:<34} {r['server']:<20} {r['client']:<38} {per:>14} {r['p50_us']:>6.0f} "
            f"{r['p99_us']:>6.0f} {r['x_plain']:>7.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
