"""Section 3, concurrency: 1, 4, 16 client processes making 1 KiB calls, against fuseport and the echo.

Each client is a process of its own (a GIL of its own), started once and kept
for every round: `python -m fuseport.bench.concurrency`, driven over stdin and
stdout with one JSON object per line. For a round, the clients taking part
are told a wall-clock start time; each runs until its call count or the
round's duration is reached, whichever comes first, and sends back its
latencies. Throughput is all calls over the round's wall time (start to the
last client's end); p99 is over all calls; scaling is throughput(N) /
throughput(1), and Execute's scaling is judged against the echo's.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from typing import Any

from fuseport.bench.stats import Row, Section, percentile
from fuseport.wire import _pb

__all__ = ["main", "run"]

log = logging.getLogger(__name__)

PAYLOAD = 1024


# --------------------------------------------------------------------------- the client process


def _kernel_call(spec: dict[str, Any], cfg: dict[str, Any], closers: list[Any]) -> Any:
    """A call of kernel spec["key"] on a float32 input of spec["shape"], made by
    a client with a connection of its own (Client keyword arguments: cfg["client"],
    then spec["client"]); with spec["process"], new connections until one reaches
    that serving process (its ListResponse.resident.server id), so that the driver
    can spread clients evenly over a server's processes."""
    import torch

    from fuseport.client import Client

    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, not a shared one
    for _ in range(200):
        kwargs = {**cfg.get("client", {}), **spec.get("client", {})}
        client = Client(spec["target"], timeout=cfg["timeout"], options=options, **kwargs)
        if spec.get("process") in (None, client.resident().server):
            break
        client.close()
    else:
        raise RuntimeError(f"200 connections to {spec['target']} never reached process {spec['process']}")
    closers.append(client.close)
    x = torch.randn(spec["shape"], generator=torch.Generator().manual_seed(0))
    key = spec["key"]
    client.execute(key, [x], wait=True)  # compiled (unless compiling is off) on the process it reached

    def call() -> str:
        r = client.execute_detailed(key, [x])
        return f"{r.path}/{r.reason}" if r.reason else r.path

    return call


def main() -> int:
    """A client process: connects, warms up, prints {"ready": ...}, then runs rounds.

    Its methods: "echo" (when cfg["echo"] names an echo server), "execute" (the 1 KiB
    identity kernel, when cfg["fuseport"] names a server), and one per entry of
    cfg["kernels"] (see _kernel_call: the two-GPU section)."""
    import warnings

    import grpc

    # torch warns at import when numpy is absent; 16 copies of it help no one.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    cfg = json.loads(sys.stdin.readline())
    calls: dict[str, Any] = {}
    closers = []
    if cfg.get("echo"):
        from fuseport.bench.echo import echo_channel, echo_stub

        channel = echo_channel(cfg["echo"])
        closers.append(channel.close)
        stub = echo_stub(channel)
        payload = b"\x07" * cfg["payload"]
        calls["echo"] = lambda: stub(payload, timeout=cfg["timeout"])
    for spec in cfg.get("kernels", ()):
        calls[spec["name"]] = _kernel_call(spec, cfg, closers)
    if cfg.get("fuseport"):
        import torch

        from fuseport.client import Client

        client = Client(cfg["fuseport"], timeout=cfg["timeout"], **cfg.get("client", {}))
        closers.append(client.close)
        tensor = torch.full((cfg["payload"],), 7, dtype=torch.uint8)
        key = cfg["key"]
        def execute() -> str:
            r = client.execute_detailed(key, [tensor])
            return f"{r.path}/{r.reason}" if r.reason else r.path

        calls["execute"] = execute
        # The serving process this connection reached compiles its own kernel
        # (with --processes each one does): the rounds start once it is fused.
        client.execute(key, [tensor], wait=True)
    for call in calls.values():
        for _ in range(20):
            call()
    import gc

    # Collections stay out of the rounds: one now, everything so far frozen
    # out of later ones, and one after each round, before its results go back.
    gc.collect()
    gc.freeze()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        call = calls[cmd["method"]]
        lat: list[float] = []
        paths: dict[str, int] = {}
        count, stop = cmd["count"], cmd["start_at"] + cmd["duration"]
        gc.disable()
        while time.time() < cmd["start_at"]:
            time.sleep(0.0005)
        t_begin = time.time()
        try:
            while len(lat) < count:
                t0 = time.perf_counter_ns()
                res = call()
                lat.append((time.perf_counter_ns() - t0) / 1000)
                if isinstance(res, str):
                    paths[res] = paths.get(res, 0) + 1
                if time.time() >= stop:
                    break
        except grpc.RpcError as e:
            print(json.dumps({"error": f"{e.code()}: {e.details()}"}), flush=True)
            continue
        t_end = time.time()
        gc.enable()
        gc.collect()
        print(json.dumps({"lat_us": lat, "t_begin": t_begin, "t_end": t_end, "paths": paths}), flush=True)
    for close in closers:
        close()
    return 0


# --------------------------------------------------------------------------- the driver


class _Clients:
    def __init__(self, n: int, cfg: dict[str, Any] | list[dict[str, Any]]) -> None:
        """`n` client processes, told `cfg` (a list: one each) and ready to run rounds."""
        cfgs = cfg if isinstance(cfg, list) else [cfg] * n
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "fuseport.bench.concurrency"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
            for _ in range(n)
        ]
        for p, c in zip(self.procs, cfgs, strict=True):
            assert p.stdin is not None
            p.stdin.write(json.dumps(c) + "\n")
            p.stdin.flush()
        for p in self.procs:
            self._read(p)  # {"ready": true}

    @staticmethod
    def _read(p: subprocess.Popen[str]) -> dict[str, Any]:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"a client process exited with {p.wait()}")
        msg: dict[str, Any] = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"a client process failed: {msg['error']}")
        return msg

    def round(self, n: int, method: str, count: int, duration: float) -> dict[str, Any]:
        # Far enough ahead that every client has read its command before it starts.
        start_at = time.time() + 0.5 + 0.05 * n
        cmd = json.dumps({"method": method, "count": count, "duration": duration, "start_at": start_at})
        for p in self.procs[:n]:
            assert p.stdin is not None
            p.stdin.write(cmd + "\n")
            p.stdin.flush()
        replies = [self._read(p) for p in self.procs[:n]]
        lat = [v for r in replies for v in r["lat_us"]]
        wall = max(r["t_end"] for r in replies) - start_at
        paths: dict[str, int] = {}
        for r in replies:
            for k, v in r["paths"].items():
                paths[k] = paths.get(k, 0) + v
        return {
            "clients": n,
            "calls": len(lat),
            "wall_s": wall,
            "throughput": len(lat) / wall,
            "p50_us": percentile(lat, 50),
            "p99_us": percentile(lat, 99),
            "late_start_ms": 1e3 * (max(r["t_begin"] for r in replies) - start_at),
            **({"paths": paths} if paths else {}),
        }

    def close(self) -> None:
        for p in self.procs:
            try:
                assert p.stdin is not None
                p.stdin.write(json.dumps({"quit": True}) + "\n")
                p.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def run(ctx: Any) -> Section:
    opts = ctx.options
    levels = sorted(set(opts.clients))
    key = ctx.identity_key()
    duration = 0.5 if opts.quick else 3.0
    count = opts.iterations or (200 if opts.quick else 20000)
    cfg = {"echo": ctx.echo_target, "fuseport": ctx.target, "key": key, "payload": PAYLOAD, "timeout": opts.timeout,
           "client": ctx.client_kwargs}
    log.info("concurrency: starting %d client processes", max(levels))
    clients = _Clients(max(levels), cfg)
    results: dict[str, list[dict[str, Any]]] = {"echo": [], "execute": []}
    try:
        for n in levels:
            # Echo and Execute back to back at each level, so both see the same machine state.
            for method in ("echo", "execute"):
                log.info("concurrency: %s with %d client(s)", method, n)
                results[method].append(clients.round(n, method, count, duration))
    finally:
        clients.close()
    # What the server says of the kernel after the rounds: an ArgSpec that
    # failed under concurrent calls shows here with its error.
    info = ctx.client.describe(key)
    arg_specs = [
        {"arg_spec": a.arg_spec, "state": _pb.service.CompileState.Name(a.state), "error": a.error, "fused_runs": a.fused_runs,
         "fallback_runs": a.fallback_runs}
        for a in info.arg_specs
    ]
    for rounds in results.values():
        base = rounds[0]["throughput"]
        for r in rounds:
            r["scaling"] = r["throughput"] / base if base else float("nan")
    rows = []
    for i, n in enumerate(levels):
        e, x = results["echo"][i], results["execute"][i]
        rows.append(
            Row("concurrency", f"Execute 1 KiB, {n} clients: calls/s", x["throughput"], "calls/s",
                "echo calls/s", e["throughput"],
                note=f"p99 {x['p99_us']:.0f} us vs echo {e['p99_us']:.0f} us")
        )
    if len(levels) > 1:
        top = levels[-1]
        e, x = results["echo"][-1], results["execute"][-1]
        target = ">= 0.8x" if top == 16 and levels[0] == 1 else ""
        rows.append(
            Row("concurrency", f"Execute scaling 1 -> {top} clients", x["scaling"], "x", "echo scaling",
                e["scaling"], target=target).judge()
        )
    data = {"payload": PAYLOAD, "duration_s": duration, "count_per_client": count, "levels": levels,
            "key": key, "arg_specs_after": arg_specs, **results}
    return Section("concurrency", rows, data)


if __name__ == "__main__":
    sys.exit(main())
