"""The `fuseport` command: its parser and its subcommands (serve, health, list, describe, stats, demo, cache, bench)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fuseport.client.flags import (
    TARGET_ENV,
    TOKEN_ENV,
    add_target_flags,
    add_tls_flags,
    client_kwargs,
    default_target,
)
from fuseport.wire.errors import FuseportError, PermissionDenied, Unauthenticated

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from fuseport.client.stats import DEFAULT_METRICS_URL
    from fuseport.server.settings import Settings, parse_bool

    parser = argparse.ArgumentParser(prog="fuseport", description="Fused PyTorch kernels behind a gRPC port.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the server",
        description="Run the server until SIGTERM/SIGINT. Every flag is also an environment "
        "variable FUSEPORT_<NAME> (flags win).",
    )
    for f in dataclasses.fields(Settings):
        if f.metadata.get("env_only"):
            continue  # FUSEPORT_<NAME> only (test-only switches): see Settings
        kind = str(f.type).removesuffix(" | None")
        flag_type: Any = {"int": int, "float": float, "bool": parse_bool}.get(
            kind, Path if "Path" in kind else str
        )
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        # A bool flag alone means true (`--insecure`); `--keep-host-memory false` still works.
        bool_flag: dict[str, Any] = {"nargs": "?", "const": True} if kind == "bool" else {}
        serve.add_argument(
            "--" + f.name.replace("_", "-"),
            type=flag_type,
            default=None,
            help=f"{f.metadata.get('help', '')} [env FUSEPORT_{f.name.upper()}; default {default}]",
            **bool_flag,
        )

    health = sub.add_parser(
        "health",
        help="check a server's health (exit 0 when SERVING)",
        description="Exit status 0 when the server reports SERVING, 1 otherwise: usable as a "
        "container health check.",
    )
    add_target_flags(health)
    health.add_argument("--service", default="", help="service name to check (default: the server)")

    lst = sub.add_parser("list", help="list registered kernels")
    add_target_flags(lst)

    describe = sub.add_parser("describe", help="show a kernel: inputs, ArgSpecs, fused kernel source")
    add_target_flags(describe)
    describe.add_argument("key", type=int, help="the kernel's key")
    describe.add_argument("--no-source", action="store_true", help="leave out generated kernel source")

    stats = sub.add_parser(
        "stats",
        help="summarise a server's Prometheus metrics (requests, fused share, latency, compiles)",
        description="Scrapes a server's metrics endpoint (`fuseport serve --metrics-port N`) and prints "
        "requests, the fused share of Execute, p50/p99 latency estimated from histogram buckets, "
        "compiles, kernels and memory.",
    )
    stats.add_argument(
        "--metrics-url",
        default=DEFAULT_METRICS_URL,
        help=f"the server's metrics endpoint (default: {DEFAULT_METRICS_URL})",
    )
    stats.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for it (default: 10)")

    demo = sub.add_parser(
        "demo",
        help="register a small kernel and run it, fused and unfused",
        description="Registers a small kernel, runs Execute (waiting for the fused kernel) and "
        "Fallback, and prints the results and which path ran. Without --target it starts a "
        "server of its own (on the GPU if there is one, else the CPU) and stops it afterwards.",
    )
    demo.add_argument(
        "--target", default=None, help=f"use this server (default: ${TARGET_ENV}) instead of starting one"
    )
    demo.add_argument("--timeout", type=float, default=300.0, help="seconds per call (default: 300)")
    demo.add_argument(
        "--alias", default=None, metavar="NAME",
        help="register the demo kernel under this alias too: its model name for KServe v2 clients (tritonclient)",
    )  # fmt: skip
    add_tls_flags(demo)

    cache = sub.add_parser(
        "cache",
        help="show or clear the compiled-artifact cache",
        description="The artifact cache holds compiled kernels (AOTInductor packages) so that a restarted "
        "server runs them without compiling. `info` lists it, `clear` empties it (safe while servers "
        "run: they keep what they loaded and compile again what they miss).",
    )
    cache.add_argument("action", choices=("info", "clear"))
    cache.add_argument(
        "--store-dir", type=Path, default=None, help="the server's --store-dir (env FUSEPORT_STORE_DIR)"
    )
    cache.add_argument(
        "--artifact-dir",
        type=Path,
        default=None,
        help="the server's --artifact-dir (env FUSEPORT_ARTIFACT_DIR)",
    )

    # Listed for --help only: main() hands `bench ...` to the benchmark's own parser.
    sub.add_parser("bench", help="benchmark against the transport floor (fuseport bench --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except FuseportError as e:
        # Whatever the command, a refused or failed call is one line, never a traceback.
        print(_one_line(argv[0] if argv else "", e), file=sys.stderr)
        return 1


def _run(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:
        # The benchmark parses its own flags (argparse's REMAINDER would not pass
        # a leading --help through).
        from fuseport.bench.run import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    command = args.command
    if command == "serve":
        return _serve(args)
    if command == "stats":
        return _stats(args.metrics_url, args.timeout)
    if command == "cache":
        return _cache(args)
    if command == "health":
        return _health(args.target or default_target(), args.service, args.timeout, client_kwargs(args))
    try:
        if command == "demo":
            return _demo(args)
        from fuseport.client import Client

        with Client(args.target or default_target(), timeout=args.timeout, **client_kwargs(args)) as c:
            if command == "list":
                return _list(c)
            return _describe(c, args.key, not args.no_source)
    except ValueError as e:  # an unreadable --tls-* file
        print(f"fuseport {command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _one_line(command: str, e: FuseportError) -> str:
    """A failed call as the user reads it: the error's class and message on one
    line, and for a refused token, how the command sends one."""
    hint = ""
    if isinstance(e, Unauthenticated):
        hint = f" (the fuseport command sends the token in ${TOKEN_ENV}: set it to one the server accepts)"
    elif isinstance(e, PermissionDenied):
        hint = f" (set ${TOKEN_ENV} to a token whose role may)"
    return f"fuseport {command}: {type(e).__name__}: {' '.join(str(e).split())}{hint}"


def _cache(args: argparse.Namespace) -> int:
    from fuseport.server.artifacts import ArtifactCache, ArtifactError
    from fuseport.server.settings import Settings

    try:
        settings = Settings.load({"store_dir": args.store_dir, "artifact_dir": args.artifact_dir})
        cache = ArtifactCache(settings.artifact_path, settings.artifact_cache_bytes)
    except (ValueError, OSError, ArtifactError) as e:
        print(f"fuseport cache: {e}", file=sys.stderr)
        return 1
    if args.action == "clear":
        print(f"removed {cache.clear()} artifacts from {cache.dir}")
        return 0
    entries = cache.entries()
    total = sum(size for _, _, size in entries)
    print(f"{cache.dir}: {len(entries)} artifacts, {total} bytes (bound {settings.artifact_cache_bytes})")
    return 0


def _health(target: str, service: str, timeout: float, tls: dict[str, Any]) -> int:
    """The health check, with nothing but grpc: a container runs it every few
    seconds, and importing torch would cost more than the check itself. Health
    needs no token, so none is sent."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fuseport.wire.security import channel_credentials, open_channel

    try:
        credentials = channel_credentials(tls["tls_ca"], tls["tls_cert"], tls["tls_key"])
    except ValueError as e:
        print(f"fuseport health: {e}", file=sys.stderr)
        return 1
    options = [("grpc.ssl_target_name_override", tls["tls_server_name"])] if tls["tls_server_name"] else []
    try:
        with open_channel(target, credentials, options) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as e:
        print(f"fuseport health: {target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(status)
    return 0 if status == "SERVING" else 1


def _stats(url: str, timeout: float) -> int:
    import http.client

    from fuseport.client.stats import scrape, summarize

    try:
        text = scrape(url, timeout)
    # URLError and HTTPError are OSErrors; something that is not HTTP at all (a
    # gRPC port) is an HTTPException.
    except (OSError, http.client.HTTPException) as e:
        print(f"fuseport stats: cannot read {url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    try:
        print(f"fuseport metrics at {url}\n{summarize(text)}")
    except ValueError as e:
        print(f"fuseport stats: {url}: {e}", file=sys.stderr)
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    # Settings and security first, without torch: a refusal (a bad value, a
    # missing tokens file, an unguarded public port) is one line, at once.
    from fuseport.server.security import Security
    from fuseport.server.settings import Settings

    flags = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = Settings.load(flags)
        # Read the TLS and token files now, so that a missing one is one line here.
        security = Security.load(settings)
    except ValueError as e:
        print(f"fuseport serve: {e}", file=sys.stderr)
        return 2
    from fuseport.server.supervisor import plan_processes, supervise

    try:
        processes, devices = plan_processes(settings)
    except ValueError as e:
        print(f"fuseport serve: {e}", file=sys.stderr)
        return 2
    from fuseport.server.app import CannotListen, serve

    try:
        if processes > 1 or len(devices) > 1:
            return supervise(settings)
        return serve(settings.replace(device=devices[0]), security)
    except CannotListen as e:
        print(f"fuseport serve: {e}", file=sys.stderr)
        return 2


def _list(c: Any) -> int:
    kernels = c.list()
    if not kernels:
        print("no kernels registered")
    for k in kernels:
        print(k.summary())
    return 0


def _describe(c: Any, key: int, source: bool) -> int:
    print(c.describe(key, include_source=source))
    return 0


@contextlib.contextmanager
def _local_server() -> Iterator[str]:
    """A `fuseport serve` of our own on a free port, ready (health SERVING) on entry."""
    from fuseport.wire._local import read_port_file, stop_process, wait_until_serving

    # Private and short-lived: loopback only, plaintext, no tokens, whatever the
    # environment configures for the real server (in the image it names tokens).
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("FUSEPORT_TLS_CERT", "FUSEPORT_TLS_KEY", "FUSEPORT_TLS_CLIENT_CA", "FUSEPORT_AUTH_TOKENS")
    }
    with tempfile.TemporaryDirectory(prefix="fuseport-demo-") as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fuseport.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--store-dir",
                str(Path(tmp) / "store"),
            ],
            env=env,
        )
        try:
            print("starting a local server ...", file=sys.stderr)
            target = f"127.0.0.1:{read_port_file(proc, port_file, 'the local server (see its log above)')}"
            wait_until_serving(target)
            yield target
        finally:
            stop_process(proc)


def _demo(args: argparse.Namespace) -> int:
    if args.alias is not None:
        from fuseport.wire.errors import InvalidAlias
        from fuseport.wire.keys import check_alias

        try:
            check_alias(args.alias)  # before a server starts
        except InvalidAlias as e:
            print(f"fuseport demo: {e}", file=sys.stderr)
            return 2
    target = args.target or os.environ.get(TARGET_ENV)
    if target:
        return _run_demo(target, args.timeout, own_server=False, client=client_kwargs(args), alias=args.alias)
    with _local_server() as target:
        return _run_demo(target, args.timeout, own_server=True, client={"token": ""}, alias=args.alias)


def _run_demo(
    target: str,
    timeout: float,
    own_server: bool,
    client: dict[str, Any] | None = None,
    alias: str | None = None,
) -> int:
    import torch

    from fuseport.client import Client

    def kernel(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
        return torch.nn.functional.gelu(x * y + alpha).sum(dim=-1)

    x, y = torch.randn(4, 8), torch.randn(4, 8)
    with Client(target, timeout=timeout, **(client or {})) as c:
        print(f"server {target}: {c.health()}")
        key = c.register(kernel, [x, y, 0.5], alias=alias)
        named = f" (alias {alias!r}: its KServe v2 model name)" if alias else ""
        print(f"registered kernel {key}{named}: gelu(x * y + alpha).sum(-1)")
        stack = ["below the inputs", x, y, 2.0]
        res = _with_progress(lambda: c.execute_detailed(key, stack, wait=True))
        expected = kernel(x, y, 2.0)
        print(f"Execute  -> path={res.path} stack={_show(res.stack)}")
        print(
            f"            server timings (us): run={res.timings.run_us} total={res.timings.total_us}"
            " (run includes waiting for the compile)"
        )
        again = c.execute_detailed(key, stack)
        print(
            f"Execute  -> path={again.path} again, the kernel ready: run={again.timings.run_us}"
            f" total={again.timings.total_us} (us)"
        )
        fb = c.fallback_detailed(key, stack)
        print(f"Fallback -> path={fb.path} reason={fb.reason} stack={_show(fb.stack)}")
        ok = all(torch.allclose(r.stack[-1], expected, atol=1e-5) for r in (res, again, fb))
        print("results match eager PyTorch" if ok else "RESULTS DIFFER FROM EAGER PYTORCH")
        source = next((a.source for a in c.describe(key, include_source=True).arg_specs if a.source), "")
        lines = source.strip().splitlines()
        print(f"the fused kernel's generated source ({len(lines)} lines):")
        print("\n".join("    " + line for line in lines[:12]) + ("\n    ..." if len(lines) > 12 else ""))
        if own_server:
            # This server and its store go when the demo ends: `describe KEY` alone would find nothing.
            print(
                "this demo's server stops now; to keep one, run `fuseport serve` in another shell, then\n"
                f"    fuseport demo --target 127.0.0.1:50051 && fuseport describe {key} --target 127.0.0.1:50051"
            )
        else:
            print(f"`fuseport describe {key} --target {target}` shows it all")
        return 0 if ok else 1


def _with_progress(call: Any) -> Any:
    """Runs `call` while printing compile progress, so a long compile is not silence."""
    done = threading.Event()
    result: list[Any] = []

    def worker() -> None:
        try:
            result.append(call())
        except BaseException as e:  # noqa: BLE001 - re-raised below
            result.append(e)
        done.set()

    threading.Thread(target=worker, daemon=True).start()
    start = time.monotonic()
    while not done.wait(1.0):
        print(f"  compiling the fused kernel ... {time.monotonic() - start:.0f} s", file=sys.stderr)
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _show(stack: list[Any]) -> str:
    import torch

    return (
        "["
        + ", ".join(f"tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else repr(v) for v in stack)
        + "]"
    )
