"""A co-located client's shared-memory Execute against the unary echo of the same bytes.

    python scripts/shm_echo_ratio.py [MiB] [rounds] [--dtype float32] [--device cuda]
        [--before PYTHON | --beside K=V]

Starts a `fuseport serve` (CPU unless --device) and the raw gRPC echo server, then times, interleaved
round by round (drift falls on all alike): the unary echo of MiB bytes; `x + 0` on a
tensor of MiB (uint8 unless --dtype) through shared memory with the caller keeping each
result until the next call (`out = c.execute(...)` in a loop); and the same with the
result dropped before the next call; the same with the input made by `Client.empty` (in
shared memory already: not copied per call); on CUDA also from a CUDA tensor of the client's (by
CUDA IPC handle), with the results in host memory and with them on the client's GPU
(`results_on="cuda"`: device to device). `--before PYTHON`: a second server run by another
checkout's interpreter (e.g. /work/main/.venv/bin/python), timed the same way in the
same rounds, so that a change is measured before and after in one run; `--beside K=V`: a
second server of this checkout with that FUSEPORT_* setting (a setting off against on, e.g.
FUSEPORT_SHARED_MEMORY_PAGE_LOCK_BYTES=0 on CUDA), timed the same way. Prints each p50
and its ratio to the echo's (docs/perf.md, issue 21)."""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable
from typing import Any

import torch

from fuseport.bench.context import fuseport_server
from fuseport.bench.echo import echo_channel, echo_server, echo_stub
from fuseport.bench.stats import time_interleaved
from fuseport.client import Client


def _shm_calls(
    target: str, x: torch.Tensor, label: str, clients: list[Client], cuda: bool = False
) -> dict[str, Callable[[], None]]:
    c = Client(target, timeout=300, shared_above=0)
    d = Client(target, timeout=300, shared_above=0)  # a session of its own: slots not shared with `c`
    clients += [c, d]
    key = c.register(lambda x: x + 0, [torch.zeros(16, dtype=x.dtype)])
    held: list[Any] = [None]

    def kept() -> None:
        held[0] = c.execute_detailed(key, [x])  # the previous result lives until this returns

    def dropped() -> None:
        r = d.execute_detailed(key, [x])
        assert r.stack[0].numel() == x.numel() and r.transport == "shm", r.transport
        del r

    c.execute(key, [x], wait=True)
    calls = {f"shm kept{label}": kept, f"shm dropped{label}": dropped}
    placed = d.empty(x.shape, dtype=x.dtype)  # any server takes it: it is one more region
    placed.copy_(x)

    def in_place() -> None:
        r = d.execute_detailed(key, [placed])
        assert r.stack[0].numel() == x.numel() and r.transport == "shm", r.transport
        del r

    calls[f"shm dropped, input from Client.empty{label}"] = in_place
    if cuda:
        xc = x.cuda()

        def from_cuda(results_on: str | None) -> Callable[[], None]:
            def call() -> None:
                r = d.execute_detailed(key, [xc], results_on=results_on)
                assert r.transport == "cuda_ipc" and r.stack[0].device.type == (results_on or "cpu"), r.transport
                del r

            return call

        from_cuda("cuda")()  # the device output region made before timing
        calls[f"cuda in, host out{label}"] = from_cuda(None)
        calls[f"cuda in, cuda out{label}"] = from_cuda("cuda")
    return calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mib", type=int, nargs="?", default=16)
    ap.add_argument("rounds", type=int, nargs="?", default=30)
    ap.add_argument("--dtype", default="uint8")
    ap.add_argument("--device", default="cpu")
    second = ap.add_mutually_exclusive_group()
    second.add_argument("--before", help="the interpreter of another checkout, for a second server to compare")
    second.add_argument("--beside", metavar="K=V", help="a second server of this checkout with this setting")
    args = ap.parse_args()
    size = args.mib << 20
    dtype = getattr(torch, args.dtype)
    x = torch.full((size // dtype.itemsize,), 7, dtype=dtype)
    clients: list[Client] = []
    with contextlib.ExitStack() as stack:
        target, _pid = stack.enter_context(fuseport_server(args.device))
        echo_target, _epid = stack.enter_context(echo_server())
        channel = echo_channel(echo_target)
        echo = echo_stub(channel)
        payload = b"\x07" * size
        calls: dict[str, Callable[[], Any]] = {"echo": lambda: echo(payload, timeout=300)}
        cuda = args.device.startswith("cuda")
        calls.update(_shm_calls(target, x, "", clients, cuda))
        if args.before:
            before, _bpid = stack.enter_context(fuseport_server(args.device, python=args.before))
            calls.update(_shm_calls(before, x, " (before)", clients))  # an older client may lack results_on
        elif args.beside:
            name, _, value = args.beside.partition("=")
            beside, _bpid = stack.enter_context(fuseport_server(args.device, env={name: value}))
            calls.update(_shm_calls(beside, x, f" ({args.beside})", clients, cuda))
        lat = {name: [us / 1e3 for us in v] for name, v in time_interleaved(calls, args.rounds, 3).items()}
        echo_ms = statistics.median(lat["echo"])
        print(f"{args.mib} MiB of {args.dtype} on {args.device}, {args.rounds} rounds", flush=True)
        for name, values in lat.items():
            p50 = statistics.median(values)
            print(f"{name:50s} p50 {p50:8.2f} ms  {p50 / echo_ms:5.2f}x the unary echo", flush=True)
        for c in clients:
            c.close()
        channel.close()


if __name__ == "__main__":
    main()
