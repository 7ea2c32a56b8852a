"""Section `stream`: streamed Execute (ExecuteStream) against unary Execute and both raw echo floors.

For each large payload (16 MiB and 256 MiB by default; --quick: 1 MiB and 4 MiB),
four calls from this process, in turn (the order rotates each iteration):

* echo: one `bytes` message of the size to the raw echo server and back;
* echo stream: the same bytes as chunks of the stream's chunk size, each echoed
  back on a bidirectional stream (the floor a streamed call is measured against);
* echo stream, whole: the same, store and forward: the chunks come back once all
  of them are in. A call's results can start only once all its inputs are in, so
  where the two directions overlap (more cores than the transport's threads), this
  is the floor of any call that needs its whole stack, and the echo stream's
  throughput is out of such a call's reach (info rows);
* Execute unary: `x + 0` on a uint8 tensor of the size in one message each way;
* Execute stream: the same call through ExecuteStream/FallbackStream chunks;
* Execute shm: the same call through shared memory (the server is on this host);
  on a GPU, also from a CUDA tensor of the client's (by CUDA IPC handle).

Then two sweeps that set the defaults: chunk sizes for a 64 MiB streamed call
(wire.stream.CHUNK_BYTES), and unary against streamed Execute from 4 MiB to
64 MiB (the client's DEFAULT_STREAM_ABOVE: where the stream starts to win).

Targets (issue 10): 256 MiB streamed Execute <= 0.5x the unary echo's time and
>= 0.8x the streaming echo's throughput; 16 MiB <= 1.0x the unary echo's time;
shared memory at 16 MiB and 256 MiB <= 0.2x the unary echo's time. A last
sweep sets the client's DEFAULT_SHARED_ABOVE (unary against shm, 16 KiB-1 MiB).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from fuseport.bench.context import Context
from fuseport.bench.echo import echo_channel, echo_stream_stub, echo_stream_whole_stub, echo_stub
from fuseport.bench.stats import Row, Section, fmt_bytes, gbps, summary, time_interleaved
from fuseport.client import Client
from fuseport.wire.stream import CHUNK_BYTES

__all__ = ["run"]

log = logging.getLogger(__name__)

SIZES = (16 << 20, 256 << 20)
QUICK_SIZES = (1 << 20, 4 << 20)
CHUNKS = (256 << 10, 1 << 20, 2 << 20, 4 << 20, 8 << 20, 16 << 20)
THRESHOLDS = (4 << 20, 8 << 20, 16 << 20, 32 << 20, 64 << 20)


def _iterations(size: int, ctx: Context) -> int:
    if ctx.options.iterations is not None:
        return ctx.options.iterations
    if ctx.options.quick:
        return 3
    return 20 if size <= 16 << 20 else 6


def run(ctx: Context) -> Section:
    key = ctx.identity_key()
    timeout = ctx.options.timeout
    channel = echo_channel(ctx.echo_target)
    echo = echo_stub(channel)
    echo_streams = {"echo stream": echo_stream_stub(channel), "echo stream whole": echo_stream_whole_stub(channel)}
    unary = Client(ctx.target, timeout=timeout, stream_above=None, **ctx.client_kwargs)
    streamed = Client(ctx.target, timeout=timeout, stream_above=0, **ctx.client_kwargs)
    shared = Client(ctx.target, timeout=timeout, **{**ctx.client_kwargs, "shared_memory": True, "shared_above": 0})
    rows: list[Row] = []
    data: dict[str, Any] = {"kernel": "x + 0 (uint8)", "chunk_bytes": CHUNK_BYTES, "points": []}
    try:
        for size in QUICK_SIZES if ctx.options.quick else SIZES:
            point = _point(ctx, key, size, echo, echo_streams, unary, streamed, shared)
            data["points"].append(point)
            rows.extend(_rows(point))
        if not ctx.options.quick:
            data["chunk_sweep"] = _chunk_sweep(ctx, key)
            data["threshold_sweep"] = _threshold_sweep(ctx, key, unary, streamed)
            data["shared_sweep"] = _shared_sweep(key, unary, shared)
            rows.extend(_sweep_rows(data))
    finally:
        unary.close()
        streamed.close()
        shared.close()
        channel.close()
    return Section("stream", rows, data)


def _echo_calls(
    size: int, chunk: int, echo: Any, echo_streams: dict[str, Any], timeout: float
) -> dict[str, Callable[[], Any]]:
    payload = b"\x07" * size
    pieces = [payload[i : i + chunk] for i in range(0, size, chunk)]

    def call_echo() -> None:
        if len(echo(payload, timeout=timeout)) != size:
            raise RuntimeError("the echo lost bytes")

    def streaming(stub: Any) -> Callable[[], None]:
        def call() -> None:
            got = sum(len(m) for m in stub(iter(pieces), timeout=timeout))
            if got != size:
                raise RuntimeError(f"the streaming echo returned {got} bytes of {size}")

        return call

    return {"echo": call_echo, **{name: streaming(stub) for name, stub in echo_streams.items()}}


def _point(
    ctx: Context,
    key: int,
    size: int,
    echo: Any,
    echo_streams: dict[str, Any],
    unary: Client,
    streamed: Client,
    shared: Client,
) -> dict[str, Any]:
    timeout = ctx.options.timeout
    n = _iterations(size, ctx)
    log.info("stream: %s x %d", fmt_bytes(size), n)
    tensor = torch.full((size,), 7, dtype=torch.uint8)
    transports: dict[str, str] = {}

    def execute(
        client: Client, name: str, t: torch.Tensor = tensor, results_on: str | None = None
    ) -> Callable[[], None]:
        def call() -> None:
            r = client.execute_detailed(key, [t], timeout=timeout, results_on=results_on)
            transports[name] = r.transport
            if r.stack[0].numel() != size:
                raise RuntimeError("Execute lost bytes")

        return call

    calls = _echo_calls(size, CHUNK_BYTES, echo, echo_streams, timeout)
    calls["execute unary"] = execute(unary, "execute unary")
    calls["execute stream"] = execute(streamed, "execute stream")
    calls["execute shm"] = execute(shared, "execute shm")
    # The input made by Client.empty: in shared memory already, named, not copied.
    placed = shared.empty(size, dtype=torch.uint8)
    placed.copy_(tensor)
    calls["execute shm in place"] = execute(shared, "execute shm in place", placed)
    if ctx.on_gpu and torch.cuda.is_available():
        # A client holding the tensor on the server's GPU: by CUDA IPC handle, the results
        # back to the host, or kept on the device (results_on: device to device).
        calls["execute cuda ipc"] = execute(shared, "execute cuda ipc", tensor.cuda())
        calls["execute cuda ipc, cuda out"] = execute(shared, "execute cuda ipc, cuda out", tensor.cuda(), "cuda")
    lat = time_interleaved(calls, n, warmup=1 if size > 64 << 20 else 2)
    point: dict[str, Any] = {"size": size, "iterations": n, "transports": transports, "methods": {}}
    for name, values in lat.items():
        s = summary(values)
        s["gbps_p50"] = gbps(size, s["p50_us"] / 1e6)
        point["methods"][name] = s
    return point


def _rows(point: dict[str, Any]) -> list[Row]:
    size, m = point["size"], point["methods"]
    label = fmt_bytes(size)
    ms = {k: v["p50_us"] / 1e3 for k, v in m.items()}
    note = (
        f"p50: stream {ms['execute stream']:.1f} ms, unary {ms['execute unary']:.1f} ms, "
        f"echo {ms['echo']:.1f} ms, echo stream {ms['echo stream']:.1f} ms, "
        f"whole {ms['echo stream whole']:.1f} ms"
    )
    time_target = {16 << 20: "<= 1.0x", 256 << 20: "<= 0.5x"}.get(size, "")
    rows = [
        Row("stream", f"Execute stream {label} time", ms["execute stream"], "ms", "unary echo ms", ms["echo"],
            target=time_target, note=note).judge(),
        Row("stream", f"Execute stream {label} GB/s", m["execute stream"]["gbps_p50"], "GB/s",
            "echo stream GB/s", m["echo stream"]["gbps_p50"],
            target=">= 0.8x" if size == 256 << 20 else "").judge(),
        Row("stream", f"Execute stream {label} time, store and forward", ms["execute stream"], "ms",
            "echo stream whole ms", ms["echo stream whole"]).judge(),
        Row("stream", f"echo stream whole {label} time", ms["echo stream whole"], "ms", "unary echo ms",
            ms["echo"], note="the floor of a call that needs its whole stack before its results").judge(),
        Row("stream", f"Execute unary {label} time", ms["execute unary"], "ms", "unary echo ms", ms["echo"]).judge(),
        Row("stream", f"Execute shm {label} time", ms["execute shm"], "ms", "unary echo ms", ms["echo"],
            target="<= 0.2x" if size in (16 << 20, 256 << 20) else "",
            note=f"transport {point['transports'].get('execute shm')}").judge(),
    ]  # fmt: skip
    if "execute shm in place" in ms:
        rows.append(
            Row("stream", f"Execute shm {label} time, input from Client.empty", ms["execute shm in place"], "ms",
                "unary echo ms", ms["echo"], note=f"transport {point['transports'].get('execute shm in place')}").judge()
        )  # fmt: skip
    if "execute cuda ipc" in ms:
        rows.append(
            Row("stream", f"Execute {label} from a CUDA tensor, time", ms["execute cuda ipc"], "ms", "unary echo ms",
                ms["echo"], note=f"transport {point['transports'].get('execute cuda ipc')}").judge()
        )  # fmt: skip
    if "execute cuda ipc, cuda out" in ms:
        target = {16 << 20: "<= 0.1x", 256 << 20: "<= 0.05x"}.get(size, "")
        rows.append(
            Row("stream", f"Execute {label} from a CUDA tensor, results on the GPU, time",
                ms["execute cuda ipc, cuda out"], "ms", "unary echo ms", ms["echo"], target=target,
                note=f"transport {point['transports'].get('execute cuda ipc, cuda out')}").judge()
        )  # fmt: skip
    return rows


def _chunk_sweep(ctx: Context, key: int) -> list[dict[str, Any]]:
    """A 64 MiB streamed Execute at each chunk size."""
    size = 64 << 20
    tensor = torch.full((size,), 7, dtype=torch.uint8)
    clients = {
        c: Client(ctx.target, timeout=ctx.options.timeout, stream_above=0, stream_chunk_bytes=c, shared_memory=False)
        for c in CHUNKS
    }
    try:
        calls = {fmt_bytes(c): (lambda cl=cl: cl.execute(key, [tensor])) for c, cl in clients.items()}
        lat = time_interleaved(calls, 6, warmup=1)
    finally:
        for cl in clients.values():
            cl.close()
    return [{"chunk": c, "p50_us": summary(lat[fmt_bytes(c)])["p50_us"]} for c in CHUNKS]


def _threshold_sweep(ctx: Context, key: int, unary: Client, streamed: Client) -> list[dict[str, Any]]:
    """Unary against streamed Execute at each size: where the stream starts to win."""
    out = []
    for size in THRESHOLDS:
        tensor = torch.full((size,), 7, dtype=torch.uint8)
        lat = time_interleaved(
            {
                "unary": lambda t=tensor: unary.execute(key, [t]),
                "stream": lambda t=tensor: streamed.execute(key, [t]),
            },
            20 if size <= 8 << 20 else 8,
            warmup=3,
        )
        out.append({"size": size, **{k: summary(v)["p50_us"] for k, v in lat.items()}})
    return out


def _shared_sweep(key: int, unary: Client, shared: Client) -> list[dict[str, Any]]:
    """Unary against shared-memory Execute at small sizes: where shared memory starts to win."""
    out = []
    for size in (16 << 10, 64 << 10, 256 << 10, 1 << 20):
        tensor = torch.full((size,), 7, dtype=torch.uint8)
        lat = time_interleaved(
            {"unary": lambda t=tensor: unary.execute(key, [t]), "shm": lambda t=tensor: shared.execute(key, [t])},
            40,
            warmup=5,
        )
        out.append({"size": size, **{k: summary(v)["p50_us"] for k, v in lat.items()}})
    return out


def _sweep_rows(data: dict[str, Any]) -> list[Row]:
    rows = []
    chunks = data["chunk_sweep"]
    best = min(chunks, key=lambda c: c["p50_us"])
    rows.append(
        Row("stream", "best chunk, 64 MiB Execute stream", best["chunk"] / (1 << 20), "MiB",
            note=", ".join(f"{fmt_bytes(c['chunk'])} {c['p50_us'] / 1e3:.0f} ms" for c in chunks))
    )  # fmt: skip
    for p in data["threshold_sweep"]:
        rows.append(
            Row("stream", f"Execute {fmt_bytes(p['size'])} stream/unary time", p["stream"] / 1e3, "ms",
                "unary ms", p["unary"] / 1e3)
        )  # fmt: skip
    for p in data.get("shared_sweep", ()):
        rows.append(
            Row("stream", f"Execute {fmt_bytes(p['size'])} shm/unary time", p["shm"] / 1e3, "ms",
                "unary ms", p["unary"] / 1e3)
        )  # fmt: skip
    return rows
