"""Regenerates the committed protobuf and gRPC stubs of fuseport.v1 and fuseport.kserve from the .proto files.

The stubs in proto/fuseport/v1/ (`*_pb2.py`, `*_pb2.pyi`, `service_pb2_grpc.py`)
and proto/fuseport/kserve/ (the KServe v2 protocol, imported by the server only)
are generated output and are never edited by hand: change the .proto, then run

    python proto/generate.py            # writes into proto/ (next to the sources)
    python proto/generate.py --out DIR  # writes DIR/fuseport/v1/... instead

and commit the result.

Why an old generator: protobuf's generated code refuses a runtime older than the
protoc that made it (and, since 5.26, one more than a major newer). The gRPC
convention is to generate with the oldest version supported. grpcio-tools 1.62.3
emits protobuf 4.25.1 code with no runtime version check, which loads unchanged
on protobuf 4.25.1 through 7.x, and a service module that loads on grpcio 1.62.3
and newer; that is what lets fuseport install beside libraries still on
protobuf 5 or 6 (tritonclient among them). CI proves both ends.

When the grpcio-tools installed here is not GENERATOR, the script makes a
virtual environment with it (once, under ~/.cache/fuseport; needs the package
index) and runs itself there. `--installed` uses whatever grpcio-tools is
installed instead: tests/test_stubs.py does, to compare what the committed stubs
describe (byte for byte when the versions match).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv
from importlib import metadata, resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE = "fuseport/v1"
# Only service.proto declares a service; the others get no (empty) _grpc module.
PROTOS = ("values.proto", "graph.proto", "service.proto")
GRPC_PROTOS = ("service.proto",)
# The KServe v2 protocol (package `inference`), installed as fuseport.kserve.
KSERVE_PACKAGE = "fuseport/kserve"
KSERVE_PROTOS = ("grpc_service.proto",)
GENERATOR = "1.62.3"  # grpcio-tools; its protoc writes "Protobuf Python Version: 4.25.1"
GENCODE = "4.25.1"


def generate(out: Path) -> None:
    """Runs protoc (from the installed grpcio-tools) for every .proto, writing under `out`."""
    from grpc_tools import protoc  # a test/dev dependency, so imported only here

    out.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    base = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}"]
    protos = [f"{PACKAGE}/{p}" for p in PROTOS] + [f"{KSERVE_PACKAGE}/{p}" for p in KSERVE_PROTOS]
    services = [f"{PACKAGE}/{p}" for p in GRPC_PROTOS] + [f"{KSERVE_PACKAGE}/{p}" for p in KSERVE_PROTOS]
    runs = [
        [*base, f"--python_out={out}", f"--pyi_out={out}", *protos],
        [*base, f"--grpc_python_out={out}", *services],
    ]
    for args in runs:
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed: {' '.join(args[1:])}")


def installed_generator() -> str | None:
    try:
        return metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        return None


def _pinned_python() -> Path:
    """The interpreter of a cached venv holding grpcio-tools==GENERATOR (made on first use)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    env = cache / "fuseport" / f"grpcio-tools-{GENERATOR}"
    python = env / "bin" / "python"
    if not python.exists():
        print(f"making {env} with grpcio-tools=={GENERATOR}", file=sys.stderr)
        venv.create(env, with_pip=True, clear=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"grpcio-tools=={GENERATOR}"], check=True
        )
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=PROTO_ROOT,
        help="root to write fuseport/v1/*.py and fuseport/kserve/*.py under (default: proto/, the committed stubs)",
    )
    parser.add_argument(
        "--installed",
        action="store_true",
        help=f"use the installed grpcio-tools even when it is not {GENERATOR}",
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.installed or installed_generator() == GENERATOR:
        generate(out)
        return 0
    python = _pinned_python()
    return subprocess.run([str(python), __file__, "--installed", "--out", str(out)]).returncode


if __name__ == "__main__":
    sys.exit(main())
