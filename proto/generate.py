"""Regenerates the committed protobuf and gRPC stubs of fuseport.v1 from the .proto files.

The stubs in proto/fuseport/v1/ (`*_pb2.py`, `*_pb2.pyi`, `service_pb2_grpc.py`)
are generated output and are never edited by hand: change the .proto, then run

    python proto/generate.py            # writes into proto/ (next to the sources)
    python proto/generate.py --out DIR  # writes DIR/fuseport/v1/... instead

with the grpcio-tools version pinned in pyproject.toml, and commit the result.
tests/test_stubs.py regenerates into a temporary folder and fails when the
committed files differ.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE = "fuseport/v1"
# Only service.proto declares a service; the others get no (empty) _grpc module.
PROTOS = ("values.proto", "graph.proto", "service.proto")
GRPC_PROTOS = ("service.proto",)


def generate(out: Path) -> None:
    """Runs protoc (from grpcio-tools) for every .proto, writing under `out`."""
    from grpc_tools import protoc  # a test/dev dependency, so imported only here

    out.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    base = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}"]
    runs = [
        [*base, f"--python_out={out}", f"--pyi_out={out}", *(f"{PACKAGE}/{p}" for p in PROTOS)],
        [*base, f"--grpc_python_out={out}", *(f"{PACKAGE}/{p}" for p in GRPC_PROTOS)],
    ]
    for args in runs:
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed: {' '.join(args[1:])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=PROTO_ROOT,
        help="root to write fuseport/v1/*.py under (default: proto/, the committed stubs)",
    )
    args = parser.parse_args(argv)
    generate(args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
