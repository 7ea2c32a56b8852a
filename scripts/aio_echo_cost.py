#!/usr/bin/env python3
"""What grpc.aio's server costs per small call, and what the per-call context calls
fuseport's handlers make add to it (issue 19): a 1 KiB unary echo on grpc.aio with
uvloop (fuseport's server loop) in its own process, bare and with each of

  d  context.add_done_callback     (Gate counts calls in flight)
  t  context.set_trailing_metadata (the serving process's name on every answer)
  p  time_remaining, peer, invocation_metadata (admission: deadline, identity)

p50 latency and the server's CPU per call, two rounds. Compare with the sync echo
(scripts/call_stages.py's "echo" row) run on the same machine.

    python scripts/aio_echo_cost.py
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

VARIANTS = ("", "d", "t", "p", "dtp")


async def _serve(port_file: str, variant: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])

    def done(_: object) -> None:
        pass

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if "d" in variant:
            context.add_done_callback(done)
        if "t" in variant:
            context.set_trailing_metadata((("fuseport-process", "0 12345"),))
        if "p" in variant:
            context.time_remaining()
            context.peer()
            context.invocation_metadata()
        return request

    handler = grpc.method_handlers_generic_handler("e.E", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    Path(port_file).write_text(str(port))
    await server.wait_for_termination()


def _cpu_us(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(f[11]) + int(f[12])) * 1e6 / os.sysconf("SC_CLK_TCK")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        import uvloop

        uvloop.install()
        asyncio.run(_serve(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""))
        return
    results: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):
            for variant in VARIANTS:
                port_file = Path(tmp) / f"port-{variant}"
                port_file.unlink(missing_ok=True)
                proc = subprocess.Popen([sys.executable, __file__, "serve", str(port_file), variant])
                try:
                    while not (port_file.exists() and port_file.read_text()):
                        time.sleep(0.05)  # the server writes its port once it listens
                    with grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}") as channel:
                        call = channel.unary_unary("/e.E/Echo")
                        payload = bytes(1100)
                        for _ in range(300):
                            call(payload, timeout=60)
                        cpu0, times = _cpu_us(proc.pid), []
                        for _ in range(3000):
                            t = time.perf_counter_ns()
                            call(payload, timeout=60)
                            times.append((time.perf_counter_ns() - t) / 1000)
                        cpu = (_cpu_us(proc.pid) - cpu0) / 3000
                    results.setdefault(variant or "bare", []).append((statistics.median(times), cpu))
                finally:
                    proc.kill()
                    proc.wait()
    for name, rounds in results.items():
        print(f"{name:6} " + "   ".join(f"p50 {p:6.0f} us, server CPU {c:5.0f} us/call" for p, c in rounds))


if __name__ == "__main__":
    main()
