"""Pins that the committed protobuf/gRPC stubs are what proto/generate.py makes from the
.proto files, with the pinned (oldest) generator, and that the .proto files ship inside the
fuseport.v1 and fuseport.kserve (the KServe v2 protocol) packages.

The generator runs here with whatever grpcio-tools is installed (pip picks the one that
fits the protobuf runtime): what the stubs describe (each file's descriptor, the service's
methods) must match for any version, and every byte must match when it is the pinned one,
as in CI's lowest-versions venv.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import re
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "proto" / "fuseport" / "v1"
PROTOS = ("values.proto", "graph.proto", "service.proto")
# Each generated package: its folder under proto/, and its .proto files.
PACKAGES = {"v1": PROTOS, "kserve": ("grpc_service.proto",)}
STUB_PATTERNS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")
REGENERATE = "run `python proto/generate.py` and commit the result"


def _generate_script():  # proto/ is not a package; load the script as a module
    spec = importlib.util.spec_from_file_location("fuseport_generate", REPO / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATE = _generate_script()
pytestmark = pytest.mark.compat


def _stubs(folder: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in STUB_PATTERNS)
    }


def _descriptor(pb2_source: bytes) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto a *_pb2.py module registers, read without importing it."""
    for node in ast.walk(ast.parse(pb2_source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            return descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(node.args[0]))
    raise AssertionError("no AddSerializedFile call in the module")


def _routes(grpc_source: bytes) -> list[str]:
    return sorted(set(re.findall(rb"'(/(?:fuseport\.v1|inference)\.\w+/\w+)'", grpc_source)))


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) generates the stubs")
    out = tmp_path_factory.mktemp("stubs")
    subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--installed", "--out", str(out)],
        check=True,
        cwd=out,  # the script must not depend on the working directory
    )
    return out


def test_generate_writes_only_fuseport_v1_and_kserve_stubs(generated: Path) -> None:
    written = sorted(str(p.relative_to(generated)) for p in generated.rglob("*") if p.is_file())
    expected = sorted(
        [f"fuseport/v1/{name}_pb2.py" for name in ("values", "graph", "service")]
        + [f"fuseport/v1/{name}_pb2.pyi" for name in ("values", "graph", "service")]
        + ["fuseport/v1/service_pb2_grpc.py"]
        + [f"fuseport/kserve/grpc_service_pb2{suffix}" for suffix in (".py", ".pyi", "_grpc.py")]
    )
    assert written == expected


@pytest.mark.parametrize("package", list(PACKAGES))
def test_committed_stubs_match_the_proto_files(generated: Path, package: str) -> None:
    fresh = _stubs(generated / "fuseport" / package)
    committed = _stubs(REPO / "proto" / "fuseport" / package)
    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    assert not missing, f"stubs missing from proto/fuseport/{package}: {missing}; {REGENERATE}"
    assert not extra, f"stale stubs in proto/fuseport/{package} that protoc does not make: {extra}; {REGENERATE}"
    for name in fresh:
        if name.endswith("_pb2.py"):
            assert _descriptor(fresh[name]) == _descriptor(committed[name]), (
                f"{name} describes another version of the .proto; {REGENERATE}"
            )
        elif name.endswith("_grpc.py"):
            assert _routes(fresh[name]) == _routes(committed[name]), f"{name}: methods differ; {REGENERATE}"
    if GENERATE.installed_generator() == GENERATE.GENERATOR:
        stale = [name for name in fresh if fresh[name] != committed[name]]
        assert not stale, f"committed stubs differ from the .proto files: {stale}; {REGENERATE}"


@pytest.mark.parametrize("package", list(PACKAGES))
def test_committed_stubs_come_from_the_oldest_generator(package: str) -> None:
    """Newer protoc output checks the runtime version and would refuse protobuf 4 to 6."""
    for name, source in _stubs(REPO / "proto" / "fuseport" / package).items():
        assert b"ValidateProtobufRuntimeVersion" not in source, f"{name}: made by a newer protoc; {REGENERATE}"
        assert b"GRPC_GENERATED_VERSION" not in source, f"{name}: made by a newer grpcio-tools; {REGENERATE}"
        if name.endswith("_pb2.py"):
            assert f"# Protobuf Python Version: {GENERATE.GENCODE}\n".encode() in source, name


def test_declared_floors_are_what_the_stubs_need_and_what_ci_installs() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(m.groups() for d in deps if (m := re.fullmatch(r"([\w.-]+)>=([\w.]+)(?:,<[\w.]+)?", d)))
    assert floors["protobuf"] == GENERATE.GENCODE
    for grpc_dist in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert floors[grpc_dist] == GENERATE.GENERATOR, grpc_dist
    lines = (REPO / ".ci" / "lowest.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    floors.pop("torch")  # CI's CPU venvs take 2.13.0 from disk; 2.11 is the GPU machine's
    assert {name: pins.get(name) for name in floors} == floors, ".ci/lowest.txt drifted from pyproject.toml"
    assert pins["grpcio-tools"] == GENERATE.GENERATOR, "the lowest venv regenerates the stubs byte for byte"


@pytest.mark.parametrize("package, proto", [(p, f) for p, files in PACKAGES.items() for f in files])
def test_proto_files_ship_as_package_data(package: str, proto: str) -> None:
    found = resources.files(f"fuseport.{package}") / proto
    assert found.is_file(), f"{proto} is not found through importlib.resources in fuseport.{package}"
    assert found.read_bytes() == (REPO / "proto" / "fuseport" / package / proto).read_bytes()
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"][f"fuseport.{package}"]
    assert any(fnmatch.fnmatch(proto, pat) for pat in patterns), (
        f"pyproject.toml's package-data for fuseport.{package} ({patterns}) leaves {proto} out of wheels"
    )


def test_generated_modules_import_under_fuseport_v1() -> None:
    from fuseport.v1 import graph_pb2, service_pb2, service_pb2_grpc, values_pb2

    assert service_pb2.DESCRIPTOR.package == "fuseport.v1"
    assert [d.name for d in service_pb2.DESCRIPTOR.dependencies] == [
        graph_pb2.DESCRIPTOR.name,
        values_pb2.DESCRIPTOR.name,
    ]
    assert hasattr(service_pb2_grpc, "KernelServiceStub")


def test_inference_stubs_import_under_fuseport_kserve_with_the_protocol_names() -> None:
    """The package and method paths are what KServe v2 clients call; the file name is
    fuseport's own, so only the `inference.*` symbols meet tritonclient's (see docs/guides/kserve.md)."""
    from fuseport.kserve import grpc_service_pb2, grpc_service_pb2_grpc

    assert grpc_service_pb2.DESCRIPTOR.package == "inference"
    assert grpc_service_pb2.DESCRIPTOR.name == "fuseport/kserve/grpc_service.proto"
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert [m.name for m in service.methods] == [
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelConfig",
        "RepositoryIndex",
    ]  # fmt: skip
    assert hasattr(grpc_service_pb2_grpc, "GRPCInferenceServiceStub")


# Triton's model_config.proto, as far as fuseport declares it: tritonclient and perf_analyzer
# decode ModelConfig with their own stubs, so each name and number must be upstream's.
TRITON_MODEL_CONFIG = {
    "ModelConfig": {"name": 1, "platform": 2, "backend": 17, "version_policy": 3, "max_batch_size": 4,
                    "input": 5, "output": 6},
    "ModelInput": {"name": 1, "data_type": 2, "format": 3, "dims": 4, "reshape": 5, "is_shape_tensor": 6,
                   "allow_ragged_batch": 7, "optional": 8, "is_non_linear_format_io": 9},
    "ModelOutput": {"name": 1, "data_type": 2, "dims": 3, "reshape": 5, "label_filename": 4,
                    "is_shape_tensor": 6, "is_non_linear_format_io": 7},
    "ModelTensorReshape": {"shape": 1},
    "ModelVersionPolicy": {"latest": 1, "all": 2, "specific": 3},
    "ModelConfigRequest": {"name": 1, "version": 2},
    "ModelConfigResponse": {"config": 1},
}  # fmt: skip
TRITON_DATA_TYPES = (
    "TYPE_INVALID TYPE_BOOL TYPE_UINT8 TYPE_UINT16 TYPE_UINT32 TYPE_UINT64 TYPE_INT8 TYPE_INT16 TYPE_INT32 "
    "TYPE_INT64 TYPE_FP16 TYPE_FP32 TYPE_FP64 TYPE_STRING TYPE_BF16"
).split()


def test_model_config_messages_have_tritons_names_and_numbers() -> None:
    from fuseport.kserve import grpc_service_pb2 as pb

    for message, fields in TRITON_MODEL_CONFIG.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[message]
        assert descriptor.full_name == f"inference.{message}"
        assert {f.name: f.number for f in descriptor.fields} == fields, message
    data_type = pb.DESCRIPTOR.enum_types_by_name["DataType"]
    assert data_type.full_name == "inference.DataType"
    assert [(v.name, v.number) for v in data_type.values] == [(n, i) for i, n in enumerate(TRITON_DATA_TYPES)]
