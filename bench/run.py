"""`fuseport bench`: the benchmark suite, each number next to the floor it is compared to.

Sections (docs: the issue this implements, and each module's docstring):

* transport   Execute and Fallback of `x + 0` against a raw gRPC echo of the
              same bytes, 1 KiB to 256 MiB; the server's own overhead on a
              small call; page-fault cost on large payloads.
* device      fused against unfused run time of a pointwise chain, a softmax
              and an MLP; the pointwise chain against the memory floor.
* concurrency 1, 4, 16 client processes against fuseport and the echo.
* compile     first-call compile time; latency of requests during a compile.
* stream      streamed Execute (ExecuteStream) against unary Execute, the raw
              unary echo and a raw streaming echo of the same chunks, 16 and
              256 MiB; the chunk size and the client's streaming threshold.
* resident    a chain of three kernels on device-resident handles against
              shipping the data each call; Execute vs Fallback on a resident input.
* gpus        (only when named) compute-bound calls on every device --device
              names (`all` on a two-GPU machine) against one device alone.

Without --target it starts `fuseport serve` (and always an echo server) on
127.0.0.1, and stops them at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from fuseport.client.flags import add_tls_flags, client_kwargs

__all__ = ["DEFAULT_SECTIONS", "SECTIONS", "main"]

log = logging.getLogger(__name__)

SECTIONS = ("transport", "device", "concurrency", "compile", "stream", "resident", "restart", "gpus")
# gpus needs a machine with two GPUs (or says so and stops): only when named.
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "gpus")
DEFAULT_SIZES = "1K,64K,1M,16M,256M"
QUICK_SIZES = "1K,64K"
DEFAULT_CLIENTS = "1,4,16"
QUICK_CLIENTS = "1,2"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fuseport bench",
        description="Benchmarks fuseport against its floors (a raw gRPC echo, eager PyTorch, "
        "the memory bandwidth) and prints a table; writes JSON and, with matplotlib, a PNG.",
    )
    p.add_argument("--target", default=None,
                   help="benchmark this server (host:port) instead of starting one; the echo server "
                        "still runs here, so compare only on the same host")
    p.add_argument("--device", default="auto",
                   help="device for the server this starts: auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and iteration counts: checks that everything runs, measures little")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {', '.join(SECTIONS)} (default: all but gpus, which "
                        "compares one device with every device --device names: --device all on a machine "
                        "with two GPUs, or --device cpu,cpu for a smoke run on the CPU)")
    p.add_argument("--sizes", default=None,
                   help=f"transport payload sizes (default: {DEFAULT_SIZES}; --quick: {QUICK_SIZES})")
    p.add_argument("--iterations", type=int, default=None,
                   help="timed iterations per measurement, for every section (default: per section and size)")
    p.add_argument("--clients", default=None,
                   help=f"client process counts for concurrency (default: {DEFAULT_CLIENTS}; --quick: "
                        f"{QUICK_CLIENTS})")
    p.add_argument("--processes", default=None,
                   help="serving processes of the server this starts (its --processes), or a list such as 1,2: "
                        "the first serves every section, and the concurrency section runs again against a "
                        "server of each further count, in the same run (default: the server's default)")
    p.add_argument("--json", type=Path, default=Path("bench-results.json"), dest="json_path",
                   help="where to write the results (default: bench-results.json)")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG plot path, if matplotlib is installed (default: the JSON path with .png)")
    p.add_argument("--no-plot", action="store_true", help="write no plot")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the server this starts (repeatable), e.g. to try "
                        "allocator settings: GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per call (default: 600)")
    # For a --target behind TLS; the token comes from $FUSEPORT_TOKEN, as for every command.
    add_tls_flags(p)
    p.add_argument("--strict", action="store_true", help="exit with status 3 when a target is missed")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        # `fuseport bench -- --quick`: the CLI passes its REMAINDER on, "--" included.
        argv = argv[1:]
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="bench %(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # This process is the client of both the echo and fuseport; with the host
    # memory setting both servers have, its large buffers stop page-faulting too.
    from fuseport.wire.hostmem import keep_host_memory

    keep_host_memory()
    from fuseport.bench.stats import parse_size

    try:
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown or not sections:
            raise ValueError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
        sizes = tuple(parse_size(s) for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)).split(","))
        clients = tuple(int(c) for c in (args.clients or (QUICK_CLIENTS if args.quick else DEFAULT_CLIENTS)).split(","))
        if any(c < 1 for c in clients):
            raise ValueError("--clients must be positive")
        processes = tuple(int(c) for c in args.processes.split(",")) if args.processes else (None,)
        if any(c is not None and c < 1 for c in processes):
            raise ValueError("--processes must be positive")
        if args.target and args.processes:
            raise ValueError("--processes is for the server this starts, not for a --target")
        if args.iterations is not None and args.iterations < 1:
            raise ValueError("--iterations must be at least 1")
        server_env = dict(_env_pair(e) for e in args.server_env)
        if "gpus" in sections:
            _check_gpus(args.device, args.target)
    except ValueError as e:
        print(f"fuseport bench: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args, sections, sizes, clients, server_env, processes)
    except KeyboardInterrupt:
        return 130


def _check_gpus(device: str, target: str | None) -> None:
    """The gpus section starts its own servers, on at least two devices."""
    if target:
        raise ValueError("the gpus section starts its own servers: it cannot run against a --target")
    from fuseport.server.supervisor import devices_of

    devices = devices_of(device)
    if len(devices) < 2:
        raise ValueError(
            f"the gpus section compares one device with several, and --device {device} names {len(devices)} "
            f"({', '.join(devices)}): run it with --device all on a machine with at least two GPUs "
            "(or --device cpu,cpu for a smoke run on the CPU)"
        )


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--server-env wants NAME=VALUE, not {text!r}")
    return name, value


def _run(
    args: argparse.Namespace,
    sections: list[str],
    sizes: tuple[int, ...],
    clients: tuple[int, ...],
    server_env: dict[str, str],
    processes: tuple[int | None, ...] = (None,),
) -> int:
    # torch warns at import when numpy is absent; the benchmark never needs it.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch

    from fuseport.bench import compiling, concurrency, device, gpus, resident, restart, streaming, transport
    from fuseport.bench.context import Context, Options, fuseport_server
    from fuseport.bench.echo import echo_server
    from fuseport.bench.kernels import identity
    from fuseport.bench.report import print_table, write_json, write_plot
    from fuseport.bench.stats import Row
    from fuseport.client import Client

    runners = {"transport": transport.run, "device": device.run, "concurrency": concurrency.run,
               "compile": compiling.run, "stream": streaming.run, "resident": resident.run,
               "restart": restart.run}
    if "gpus" in sections:
        from fuseport.server.supervisor import devices_of

        served = devices_of(args.device)
        runners["gpus"] = lambda ctx: gpus.run(ctx, served, processes[0] or len(served), server_env)
    options = Options(quick=args.quick, sizes=sizes, iterations=args.iterations, clients=clients,
                      timeout=args.timeout)
    started = time.perf_counter()
    notes: list[str] = []
    result: dict[str, Any] = {"sections": {}, "errors": {}}
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        if args.target:
            target, server_pid = args.target, None
            notes.append(f"note: server {target} given with --target; the echo floor runs on this host")
        else:
            log.info("starting fuseport serve --device %s", args.device)
            target, server_pid = stack.enter_context(fuseport_server(args.device, server_env, processes=processes[0]))
        echo_target, echo_pid = stack.enter_context(echo_server())
        # The server this starts is plaintext on loopback: TLS flags are for --target.
        tls = client_kwargs(args) if args.target else {}
        # The network path unless a section asks for shared memory itself (the
        # stream section's "shm" calls): the floors every section compares with
        # are network echoes.
        tls["shared_memory"] = False
        client = stack.enter_context(Client(target, timeout=args.timeout, **tls))
        # Registering is cheap; its Describe tells which device the server runs on.
        probe = client.register(identity, [torch.zeros(1024, dtype=torch.uint8)])
        server_device = torch.device(client.describe(probe).device)
        local_device = _local_device(server_device, target)
        if local_device is None:
            notes.append(f"note: in-process measurements skipped: {server_device} of {target} is not on this host")
        ctx = Context(options, client, target, echo_target, server_pid, echo_pid, server_device, local_device,
                      client_kwargs=tls)
        result["settings"] = {
            "target": target,
            "started_server": args.target is None,
            "device_flag": args.device,
            "server_env": server_env,
            "server_device": str(server_device),
            "local_device": str(local_device) if local_device is not None else None,
            "quick": args.quick,
            "sections": sections,
            "sizes": list(sizes),
            "iterations": args.iterations,
            "clients": list(clients),
            "processes": list(processes),
        }
        result["machine"] = _machine(local_device)
        for name in sections:
            t0 = time.perf_counter()
            log.info("section %s", name)
            try:
                section = runners[name](ctx)
            except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
                log.exception("section %s failed", name)
                result["errors"][name] = f"{type(e).__name__}: {e}"
                notes.append(f"ERROR: section {name} failed: {type(e).__name__}: {e}")
                continue
            section.data["wall_s"] = time.perf_counter() - t0
            if len(processes) > 1 and name == "concurrency":
                _label(section.rows, processes[0])
            rows.extend(section.rows)
            result["sections"][name] = {"rows": [r.to_json() for r in section.rows], **section.data}
        if "concurrency" in sections:
            for count in processes[1:]:
                # The same section against a server of `count` processes, beside the same echo.
                log.info("section concurrency, %d serving processes", count)
                try:
                    section = _concurrency_with(args.device, server_env, count, ctx)
                except Exception as e:  # noqa: BLE001 - keep what was measured
                    log.exception("concurrency with %d processes failed", count)
                    result["errors"][f"concurrency-p{count}"] = f"{type(e).__name__}: {e}"
                    continue
                _label(section.rows, count)
                rows.extend(section.rows)
                result["sections"][f"concurrency-p{count}"] = {
                    "rows": [r.to_json() for r in section.rows], **section.data
                }
    result["wall_seconds"] = time.perf_counter() - started
    if "machine" in result:
        result["machine"]["loadavg_1min_at_end"] = os.getloadavg()[0]
    result["rows"] = [r.to_json() for r in rows]
    result["summary"] = {s: sum(r.status == s for r in rows) for s in ("PASS", "MISS", "n/a", "info")}

    write_json(args.json_path, result)
    notes.append(f"results: {args.json_path}")
    if not args.no_plot:
        plot = args.plot or args.json_path.with_suffix(".png")
        why = write_plot(plot, result)
        notes.append(f"plot: {plot}" if why is None else f"plot: not written: {why}")
    print_table(result, rows, notes)
    if result["errors"]:
        return 1
    if args.strict and result["summary"]["MISS"]:
        return 3
    return 0


def _label(rows: list[Any], processes: int | None) -> None:
    for row in rows:
        row.name = f"{row.name} [{processes} proc]"


def _concurrency_with(device: str, server_env: dict[str, str], processes: int, ctx: Any) -> Any:
    """The concurrency section against a server of its own with `processes` serving processes."""
    import dataclasses

    from fuseport.bench import concurrency
    from fuseport.bench.context import fuseport_server
    from fuseport.client import Client

    with fuseport_server(device, server_env, processes=processes) as (target, pid), Client(
        target, timeout=ctx.options.timeout
    ) as client:
        return concurrency.run(dataclasses.replace(ctx, client=client, target=target, server_pid=pid, cache={}))


def _local_device(server_device: Any, target: str) -> Any:
    """The server's device, if it is this host's too (in-process comparisons run there)."""
    import torch

    host = target.rsplit(":", 1)[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        return None
    if server_device.type == "cuda":
        if not torch.cuda.is_available() or (server_device.index or 0) >= torch.cuda.device_count():
            return None
    return server_device


def _machine(local_device: Any) -> dict[str, Any]:
    import grpc
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    on_cuda = local_device is not None and local_device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name(local_device) if on_cuda else cpu,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "grpc": grpc.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # Other work on the host skews every number; a load above the CPU count says so.
        "loadavg_1min_at_start": os.getloadavg()[0],
    }


if __name__ == "__main__":
    sys.exit(main())
