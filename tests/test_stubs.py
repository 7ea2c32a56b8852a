"""Pins that the committed protobuf/gRPC stubs are exactly what proto/generate.py makes
from the .proto files, and that the .proto files ship inside the fuseport.v1 package."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "proto" / "fuseport" / "v1"
PROTOS = ("values.proto", "graph.proto", "service.proto")
STUB_PATTERNS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")
REGENERATE = "run `python proto/generate.py` and commit the result"


def _stubs(folder: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in STUB_PATTERNS)
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) generates the stubs")
    out = tmp_path_factory.mktemp("stubs")
    subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(out)],
        check=True,
        cwd=out,  # the script must not depend on the working directory
    )
    return out


def test_generate_writes_only_fuseport_v1_stubs(generated: Path) -> None:
    written = sorted(str(p.relative_to(generated)) for p in generated.rglob("*") if p.is_file())
    expected = sorted(
        [f"fuseport/v1/{name}_pb2.py" for name in ("values", "graph", "service")]
        + [f"fuseport/v1/{name}_pb2.pyi" for name in ("values", "graph", "service")]
        + ["fuseport/v1/service_pb2_grpc.py"]
    )
    assert written == expected


def test_committed_stubs_match_the_proto_files(generated: Path) -> None:
    fresh = _stubs(generated / "fuseport" / "v1")
    committed = _stubs(COMMITTED)
    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    assert not missing, f"stubs missing from proto/fuseport/v1: {missing}; {REGENERATE}"
    assert not extra, f"stale stubs in proto/fuseport/v1 that protoc does not make: {extra}; {REGENERATE}"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"committed stubs differ from the .proto files: {stale}; {REGENERATE}"


@pytest.mark.parametrize("proto", PROTOS)
def test_proto_files_ship_as_fuseport_v1_package_data(proto: str) -> None:
    found = resources.files("fuseport.v1") / proto
    assert found.is_file(), f"{proto} is not found through importlib.resources in fuseport.v1"
    assert found.read_bytes() == (COMMITTED / proto).read_bytes()
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["fuseport.v1"]
    assert any(fnmatch.fnmatch(proto, pat) for pat in patterns), (
        f"pyproject.toml's package-data for fuseport.v1 ({patterns}) leaves {proto} out of wheels"
    )


def test_generated_modules_import_under_fuseport_v1() -> None:
    from fuseport.v1 import graph_pb2, service_pb2, service_pb2_grpc, values_pb2

    assert service_pb2.DESCRIPTOR.package == "fuseport.v1"
    assert [d.name for d in service_pb2.DESCRIPTOR.dependencies] == [
        graph_pb2.DESCRIPTOR.name,
        values_pb2.DESCRIPTOR.name,
    ]
    assert hasattr(service_pb2_grpc, "KernelServiceStub")
