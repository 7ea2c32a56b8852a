"""The KServe v2 / Triton gRPC protocol on a real server: hostile requests get typed errors and
the server keeps serving; ModelInfer equals eager torch; metadata, Triton's model config, readiness,
the repository index,
aliases (validated, stored, gated by tokens) and the metrics of inference calls.

Called through the generated `inference` stubs (fuseport.kserve) with plain grpc, as any KServe
client would; .ci/beside_tritonclient.py calls it with tritonclient itself.
"""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from fuseport.cli import commands as cli
from fuseport.client import Client, InvalidAlias
from fuseport.kserve import grpc_service_pb2 as pb
from fuseport.kserve import grpc_service_pb2_grpc as pb_grpc
from fuseport.server.rpc import kserve
from fuseport.server.security import INFERENCE_METHODS
from fuseport.v1 import service_pb2, service_pb2_grpc
from fuseport.wire.capture import capture

from .conftest import ServerProcess, start_server

ALIAS = "tanh-mul.v1"
USER_TOKEN = "kserve-us3r-5c1e9a7b2d4f6083"


def tanh_mul(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.tanh(x * y) + alpha


def triple(n: torch.Tensor) -> torch.Tensor:
    return n * 3


@dataclass
class Served:
    server: ServerProcess
    stub: pb_grpc.GRPCInferenceServiceStub
    channel: grpc.Channel
    key: int  # tanh_mul, registered with ALIAS
    int_key: int  # triple on int32, no alias: its model name is its key in decimal


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = start_server(
        tmp_path_factory.mktemp("kserve"), None, "--compile-mode", "off", "--metrics-port", "0"
    )
    try:
        with Client(server.target, timeout=120) as c:
            key = c.register(tanh_mul, [torch.randn(4), torch.randn(4), 0.5], alias=ALIAS)
            int_key = c.register(triple, [torch.arange(5, dtype=torch.int32)])
        with grpc.insecure_channel(server.target) as channel:
            yield Served(server, pb_grpc.GRPCInferenceServiceStub(channel), channel, key, int_key)
    finally:
        server.stop()


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _request(x: torch.Tensor, y: torch.Tensor, alpha: float, model: str = ALIAS) -> pb.ModelInferRequest:
    """A well-formed ModelInfer for tanh_mul, in raw contents: the tests break one thing each."""
    req = pb.ModelInferRequest(model_name=model, id="req-1")
    for name, t in (("x", x), ("y", y), ("alpha", torch.tensor([alpha], dtype=torch.float64))):
        req.inputs.add(
            name=name, datatype={torch.float32: "FP32", torch.float64: "FP64"}[t.dtype], shape=list(t.shape)
        )
        req.raw_input_contents.append(_raw(t))
    return req


def _output(resp: pb.ModelInferResponse, i: int) -> torch.Tensor:
    dtype = {"FP32": torch.float32, "FP64": torch.float64, "INT32": torch.int32, "INT64": torch.int64}
    t = resp.outputs[i]
    return torch.frombuffer(bytearray(resp.raw_output_contents[i]), dtype=dtype[t.datatype]).reshape(
        list(t.shape)
    )


def _refused(call: Any, request: Any) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=60)
    error_class = dict(e.value.trailing_metadata() or ()).get("fuseport-error", "")
    return e.value.code(), e.value.details(), error_class


def _still_serves(s: Served) -> None:
    x, y = torch.randn(6), torch.randn(6)
    resp = s.stub.ModelInfer(_request(x, y, 0.25), timeout=60)
    torch.testing.assert_close(_output(resp, 0), tanh_mul(x, y, 0.25))


# --- hostile requests: a typed error naming what is wrong, and the server keeps serving ---------


def _break(change: Any) -> pb.ModelInferRequest:
    req = _request(torch.randn(6), torch.randn(6), 0.5)
    change(req)
    return req


def _set(**fields: Any) -> Any:
    def change(req: pb.ModelInferRequest) -> None:
        for name, value in fields.items():
            setattr(req, name, value)

    return change


def _input(i: int, **fields: Any) -> Any:
    def change(req: pb.ModelInferRequest) -> None:
        tensor = req.inputs[i]
        for name, value in fields.items():
            if name == "shape":
                del tensor.shape[:]
                tensor.shape.extend(value)
            else:
                setattr(tensor, name, value)

    return change


def _raw_entry(i: int, data: bytes) -> Any:
    def change(req: pb.ModelInferRequest) -> None:
        req.raw_input_contents[i] = data

    return change


def _typed_too(req: pb.ModelInferRequest) -> None:
    req.inputs[0].contents.fp32_contents.extend([0.0] * 6)


def _extra_input(req: pb.ModelInferRequest) -> None:
    req.inputs.add(name="w", datatype="FP32", shape=[6])
    req.raw_input_contents.append(bytes(24))


def _drop_raw(req: pb.ModelInferRequest) -> None:
    del req.raw_input_contents[2]


def _duplicate(req: pb.ModelInferRequest) -> None:
    req.inputs[1].name = "x"


def _typed_only(change: Any) -> Any:
    def apply(req: pb.ModelInferRequest) -> None:
        del req.raw_input_contents[:]
        req.inputs[0].contents.fp32_contents.extend([1.0] * 6)
        req.inputs[1].contents.fp32_contents.extend([1.0] * 6)
        req.inputs[2].contents.fp64_contents.append(0.5)
        change(req)

    return apply


def _wrong_typed_field(req: pb.ModelInferRequest) -> None:
    req.inputs[0].contents.ClearField("fp32_contents")
    req.inputs[0].contents.fp64_contents.extend([1.0] * 6)


def _short_typed(req: pb.ModelInferRequest) -> None:
    del req.inputs[1].contents.fp32_contents[-1]


def _shared_memory(req: pb.ModelInferRequest) -> None:
    req.inputs[0].parameters["shared_memory_region"].string_param = "/dev/shm/x"


def _unknown_output(req: pb.ModelInferRequest) -> None:
    req.outputs.add(name="output7")


HOSTILE = {
    "unknown model": (_set(model_name="no-such-model"), grpc.StatusCode.NOT_FOUND, "KernelNotFound", "no kernel named 'no-such-model'"),
    "unknown key": (_set(model_name="12345"), grpc.StatusCode.NOT_FOUND, "KernelNotFound", "no kernel named '12345'"),
    "key past int64": (_set(model_name="9" * 25), grpc.StatusCode.NOT_FOUND, "KernelNotFound", "no kernel named"),
    "other version": (_set(model_version="2"), grpc.StatusCode.NOT_FOUND, "KernelNotFound", "its one version is 1"),
    "wrong datatype": (
        _input(0, datatype="FP64"),  # 24 bytes read as 3 doubles: the size check catches it first
        grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack", "float64 tensor of shape [6] needs 48 bytes, got 24",
    ),
    "wrong datatype, consistent bytes": (
        lambda r: (_input(0, datatype="INT32")(r)),
        grpc.StatusCode.INVALID_ARGUMENT, "NoMatchingVariant", "expected a float32 tensor, got int32",
    ),
    "raw length short": (_raw_entry(0, bytes(20)), grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack", "needs 24 bytes, got 20"),
    "raw and typed": (_typed_too, grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack", "send one or the other"),
    "negative dim": (_input(0, shape=[-6]), grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack", "negative dim"),
    "huge shape": (
        _input(0, shape=[1 << 40, 1 << 40]),
        grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack", f"needs {(1 << 80) * 4} bytes, got 24",
    ),
    "empty, strides past int64, typed": (
        _typed_only(lambda r: (r.inputs[0].contents.ClearField("fp32_contents"), _input(0, shape=[0, 1 << 62, 1 << 62])(r))),
        grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack", "is too large",
    ),
    "empty, strides past int64, raw": (
        lambda r: (_input(0, shape=[0, 1 << 62, 1 << 62])(r), _raw_entry(0, b"")(r)),
        grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack", "is too large",
    ),
    "huge rank": (_input(0, shape=[1] * 65), grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack", "rank 65 is over 64"),
    "too many inputs": (_extra_input, grpc.StatusCode.INVALID_ARGUMENT, "SignatureMismatch", "takes 3 inputs ('x', 'y', 'alpha'), the request has 4"),
    "wrong input name": (_input(1, name="z"), grpc.StatusCode.INVALID_ARGUMENT, "SignatureMismatch", "input 'z': model 'tanh-mul.v1' has no such input"),
    "input twice": (_duplicate, grpc.StatusCode.INVALID_ARGUMENT, "SignatureMismatch", "input 'x': given twice"),
    "raw entries short": (_drop_raw, grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack", "raw_input_contents has 2 entries for 3 inputs"),
    "BYTES": (_input(0, datatype="BYTES"), grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack", "BYTES (strings) is not served"),
    "unknown datatype": (_input(0, datatype="FP8"), grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack", "unknown datatype 'FP8'"),
    "typed in the wrong field": (
        _typed_only(_wrong_typed_field), grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack", "FP32 contents go in fp32_contents, got fp64_contents",
    ),
    "typed count short": (
        _typed_only(_short_typed), grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack", "shape [6] has 6 elements, fp32_contents holds 5",
    ),
    "FP16 typed": (
        _typed_only(_input(0, datatype="FP16")), grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack", "FP16 has no typed contents field",
    ),
    "scalar with two elements": (
        lambda r: (_input(2, shape=[2])(r), _raw_entry(2, bytes(16))(r)),
        grpc.StatusCode.INVALID_ARGUMENT, "SignatureMismatch", "input 'alpha' is a float (a scalar): send one element",
    ),
    "shapes the graph refuses": (
        lambda r: (_input(1, shape=[5])(r), _raw_entry(1, bytes(20))(r)),
        grpc.StatusCode.INVALID_ARGUMENT, "NoMatchingVariant", "does not hold",
    ),
    "shared memory": (_shared_memory, grpc.StatusCode.INVALID_ARGUMENT, "InvalidArgument", "shared-memory regions are not served"),
    "unknown output": (_unknown_output, grpc.StatusCode.INVALID_ARGUMENT, "SignatureMismatch", "requested output 'output7'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_model_infer_refuses_hostile_requests_with_typed_errors_and_keeps_serving(
    served: Served, case: str
) -> None:
    change, code, error_class, message = HOSTILE[case]
    got = _refused(served.stub.ModelInfer, _break(change))
    assert got[0] == code, got
    assert got[2] == error_class, got
    assert message in got[1], got
    _still_serves(served)


def test_malformed_protobuf_is_invalid_argument(served: Served) -> None:
    raw = served.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    code, details, error_class = _refused(raw, b"\xff\xff\xff\xff")
    assert (code, error_class) == (grpc.StatusCode.INVALID_ARGUMENT, "InvalidArgument")
    assert details.startswith("malformed ModelInferRequest")
    _still_serves(served)


def test_typed_uint64_contents_take_the_full_range() -> None:
    """Past 2**63 (no int64 holds them): decoded as the bits they are, not an INTERNAL error."""
    from fuseport.server.rpc.kserve import _tensor

    tensor = pb.ModelInferRequest.InferInputTensor(name="u", datatype="UINT64", shape=[2])
    tensor.contents.uint64_contents.extend([(1 << 64) - 1, 5])
    decoded = _tensor(tensor, None, "input 'u'")
    assert decoded.dtype == torch.uint64 and [int(v) for v in decoded.tolist()] == [(1 << 64) - 1, 5]


def test_typed_int_contents_out_of_range_are_refused(served: Served) -> None:
    req = pb.ModelInferRequest(model_name=str(served.int_key))
    req.inputs.add(name="n", datatype="INT8", shape=[2]).contents.int_contents.extend([1, 300])
    code, details, error_class = _refused(served.stub.ModelInfer, req)
    assert (code, error_class) == (grpc.StatusCode.INVALID_ARGUMENT, "InvalidStack")
    assert "int_contents holds values outside INT8's range" in details


@pytest.fixture(scope="module")
def graph() -> Any:
    return capture(lambda t: t - 1, [torch.randn(3)])


@pytest.mark.parametrize(
    "alias, message",
    [
        ("", "is not 1 to 64 characters"),
        ("7up", "is not 1 to 64 characters"),  # a digit first would read as a key
        ("-1", "is not 1 to 64 characters"),
        ("a" * 65, "(65 characters)"),
        ("../../etc/passwd", "is not 1 to 64 characters"),
        ("a/b", "is not 1 to 64 characters"),
        ("name\n", "is not 1 to 64 characters"),
        ("caf\u00e9", "is not 1 to 64 characters"),
        ("a b", "is not 1 to 64 characters"),
    ],
)
def test_register_refuses_a_malformed_alias(served: Served, graph: Any, alias: str, message: str) -> None:
    """Sent raw (the client refuses these itself before capturing): the server's own check."""
    stub = service_pb2_grpc.KernelServiceStub(served.channel)
    code, details, error_class = _refused(
        stub.Register, service_pb2.RegisterRequest(graph=graph, alias=alias)
    )
    assert (code, error_class) == (grpc.StatusCode.INVALID_ARGUMENT, "InvalidAlias")
    assert message in details
    assert "passwd" not in details or len(alias) <= 40  # shown, but cut short when long
    with Client(served.server.target) as c:
        with pytest.raises(InvalidAlias):
            c.register(graph, alias=alias)
        assert alias not in {k.alias for k in c.list() if k.alias}


def test_an_alias_names_one_kernel_and_a_kernel_has_one_alias(served: Served) -> None:
    with Client(served.server.target, timeout=120) as c:
        with pytest.raises(InvalidAlias, match=rf"alias '{ALIAS}' names kernel {served.key}"):
            c.register(lambda t: t - 2, [torch.randn(3)], alias=ALIAS)
        with pytest.raises(InvalidAlias, match=rf"kernel {served.key} has the alias '{ALIAS}'"):
            c.register(tanh_mul, [torch.randn(4), torch.randn(4), 0.5], alias="another")
        assert (
            c.register(tanh_mul, [torch.randn(4), torch.randn(4), 0.5], alias=ALIAS) == served.key
        )  # idempotent
        # Unregistering frees the alias for another kernel.
        temp = c.register(lambda t: t + 7, [torch.randn(3)], alias="temporary")
        assert c.unregister(temp)
        assert not served.stub.ModelReady(pb.ModelReadyRequest(name="temporary"), timeout=30).ready
        other = c.register(lambda t: t * 7, [torch.randn(3)], alias="temporary")
        assert {k.key: k.alias for k in c.list()}[other] == "temporary"
        assert c.unregister(other)


# --- what a KServe client sees -------------------------------------------------------------------


def test_model_infer_raw_contents_equal_eager_torch(served: Served) -> None:
    x, y = torch.randn(21), torch.randn(21)
    resp = served.stub.ModelInfer(_request(x, y, -1.5), timeout=60)
    assert (resp.model_name, resp.model_version, resp.id) == (ALIAS, "1", "req-1")
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [("output0", "FP32", [21])]
    torch.testing.assert_close(_output(resp, 0), tanh_mul(x, y, -1.5))


def test_model_infer_typed_contents_equal_eager_torch(served: Served) -> None:
    x, y = torch.randn(4), torch.randn(4)
    req = pb.ModelInferRequest(model_name=ALIAS)
    req.inputs.add(name="y", datatype="FP32", shape=[4]).contents.fp32_contents.extend(y.tolist())
    req.inputs.add(name="alpha", datatype="FP64", shape=[]).contents.fp64_contents.append(
        0.75
    )  # shape [] too
    req.inputs.add(name="x", datatype="FP32", shape=[4]).contents.fp32_contents.extend(
        x.tolist()
    )  # any order
    req.outputs.add(name="output0")
    torch.testing.assert_close(_output(served.stub.ModelInfer(req, timeout=60), 0), tanh_mul(x, y, 0.75))


def test_model_named_by_its_key_takes_int_contents(served: Served) -> None:
    n = torch.tensor([-4, 0, 9], dtype=torch.int32)
    req = pb.ModelInferRequest(model_name=str(served.int_key))
    req.inputs.add(name="n", datatype="INT32", shape=[3]).contents.int_contents.extend(n.flatten().tolist())
    out = _output(served.stub.ModelInfer(req, timeout=60), 0)
    assert out.dtype == torch.int32 and torch.equal(out, triple(n))


def test_model_metadata_names_and_types_inputs_and_outputs(served: Served) -> None:
    meta = served.stub.ModelMetadata(pb.ModelMetadataRequest(name=ALIAS), timeout=30)
    assert (meta.name, list(meta.versions), meta.platform) == (ALIAS, ["1"], "fuseport")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("x", "FP32", [-1]),
        ("y", "FP32", [-1]),
        ("alpha", "FP64", [1]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("output0", "FP32", [-1])]
    by_key = served.stub.ModelMetadata(pb.ModelMetadataRequest(name=str(served.int_key)), timeout=30)
    assert [(t.name, t.datatype) for t in by_key.inputs] == [("n", "INT32")]
    assert [(t.name, t.datatype) for t in by_key.outputs] == [("output0", "INT32")]
    code, details, error_class = _refused(served.stub.ModelMetadata, pb.ModelMetadataRequest(name="nope"))
    assert (code, error_class) == (grpc.StatusCode.NOT_FOUND, "KernelNotFound")


def test_model_config_is_tritons_for_the_same_tensors(served: Served) -> None:
    """What perf_analyzer reads first: the inputs and outputs of ModelMetadata, in Triton's
    DataType, no batch dim, and the model's own name whichever name the request used."""
    for name in (ALIAS, str(served.key)):
        config = served.stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=30).config
        assert (config.name, config.platform, config.backend, config.max_batch_size) == (
            ALIAS,
            "fuseport",
            "fuseport",
            0,
        )
        assert config.version_policy.WhichOneof("policy_choice") == "latest"
        assert config.version_policy.latest.num_versions == 1
        assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == [
            ("x", "TYPE_FP32", [-1]),
            ("y", "TYPE_FP32", [-1]),
            ("alpha", "TYPE_FP64", [1]),
        ]
        assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in config.output] == [
            ("output0", "TYPE_FP32", [-1])
        ]
    by_key = served.stub.ModelConfig(pb.ModelConfigRequest(name=str(served.int_key), version="1"), timeout=30)
    assert by_key.config.name == str(served.int_key)  # no alias: its key in decimal
    assert [(t.name, t.data_type) for t in by_key.config.input] == [("n", pb.TYPE_INT32)]
    assert [(t.name, t.data_type) for t in by_key.config.output] == [("output0", pb.TYPE_INT32)]
    # The dims are ModelMetadata's shapes, tensor for tensor.
    meta = served.stub.ModelMetadata(pb.ModelMetadataRequest(name=str(served.int_key)), timeout=30)
    assert [list(t.dims) for t in by_key.config.input] == [list(t.shape) for t in meta.inputs]
    assert [list(t.dims) for t in by_key.config.output] == [list(t.shape) for t in meta.outputs]


@pytest.mark.parametrize("name, version", [("nope", ""), (ALIAS, "2")])
def test_model_config_of_an_unknown_model_is_not_found_as_its_metadata(
    served: Served, name: str, version: str
) -> None:
    config = _refused(served.stub.ModelConfig, pb.ModelConfigRequest(name=name, version=version))
    meta = _refused(served.stub.ModelMetadata, pb.ModelMetadataRequest(name=name, version=version))
    assert config == meta
    assert config[::2] == (grpc.StatusCode.NOT_FOUND, "KernelNotFound")


def test_every_inference_method_is_served_and_gated() -> None:
    """A method the service declares is both handled and in the roles' allowlist (a method
    missing from INFERENCE_METHODS would be PERMISSION_DENIED to every token)."""
    declared = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    assert set(kserve.METHODS) == {m.name for m in declared} == INFERENCE_METHODS


def test_server_and_model_readiness(served: Served) -> None:
    assert served.stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
    assert served.stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
    meta = served.stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=30)
    assert meta.name == "fuseport" and meta.version
    ready = served.stub.ModelReady
    assert ready(pb.ModelReadyRequest(name=ALIAS), timeout=30).ready
    assert ready(pb.ModelReadyRequest(name=str(served.key), version="1"), timeout=30).ready
    assert not ready(pb.ModelReadyRequest(name=ALIAS, version="2"), timeout=30).ready
    assert not ready(pb.ModelReadyRequest(name="no-such-model"), timeout=30).ready


def test_repository_index_lists_aliases_and_keys(served: Served) -> None:
    index = served.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30)
    models = {(m.name, m.version, m.state) for m in index.models}
    assert {(ALIAS, "1", "READY"), (str(served.int_key), "1", "READY")} <= models
    assert str(served.key) not in {
        m.name for m in index.models
    }  # a kernel with an alias is listed once, by it


def test_cli_list_shows_the_alias(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "--target", served.server.target]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if str(served.key) in line)
    assert f"alias={ALIAS}" in line


def test_inference_calls_are_counted_by_method_and_code(served: Served) -> None:
    def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with urllib.request.urlopen(served.server.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        return {
            (s[0], frozenset(s[1].items())): float(s[2])
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    def count(samples: dict[Any, float], method: str, path: str, reason: str, code: str) -> float:
        labels = {"method": method, "path": path, "reason": reason, "code": code}
        return samples.get(("fuseport_requests_total", frozenset(labels.items())), 0.0)

    before = scrape()
    _still_serves(served)
    _refused(served.stub.ModelInfer, pb.ModelInferRequest(model_name="no-such-model"))
    served.stub.ModelMetadata(pb.ModelMetadataRequest(name=ALIAS), timeout=30)
    after = scrape()
    for labels in (
        ("ModelInfer", "fallback", "disabled", "OK"),  # --compile-mode off: the fallback ran
        ("ModelInfer", "none", "none", "NOT_FOUND"),
        ("ModelMetadata", "none", "none", "OK"),
    ):
        assert count(after, *labels) - count(before, *labels) == 1, labels


def test_aliases_survive_a_restart_and_tokens_gate_every_inference_method(
    served: Served, tmp_path: Path
) -> None:
    """A second server on a copy of the store: the alias is still there; without a token every
    inference method is UNAUTHENTICATED, with a `user` token ModelInfer runs."""
    store = tmp_path / "store"
    shutil.copytree(served.server.store_dir, store)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{USER_TOKEN} user\n")
    second = start_server(tmp_path / "second", store, "--compile-mode", "off", "--auth-tokens", str(tokens))
    try:
        with grpc.insecure_channel(second.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for method, request in (
                ("ServerLive", pb.ServerLiveRequest()),
                ("ModelMetadata", pb.ModelMetadataRequest(name=ALIAS)),
                ("ModelConfig", pb.ModelConfigRequest(name=ALIAS)),
                ("RepositoryIndex", pb.RepositoryIndexRequest()),
                ("ModelInfer", _request(torch.randn(2), torch.randn(2), 0.0)),
            ):
                code, _, error_class = _refused(getattr(stub, method), request)
                assert (code, error_class) == (grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated"), method
            auth = (("authorization", f"Bearer {USER_TOKEN}"),)
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30, metadata=auth)
            assert ALIAS in {m.name for m in index.models}
            config = stub.ModelConfig(pb.ModelConfigRequest(name=ALIAS), timeout=30, metadata=auth).config
            assert config.name == ALIAS
            x, y = torch.randn(5), torch.randn(5)
            resp = stub.ModelInfer(_request(x, y, 1.0), timeout=60, metadata=auth)
            torch.testing.assert_close(_output(resp, 0), tanh_mul(x, y, 1.0))
    finally:
        assert second.stop() == 0


def test_only_the_server_imports_the_inference_stubs() -> None:
    """They define `inference.*` in protobuf's default pool, as tritonclient's do: a client
    process must be able to import fuseport.client beside tritonclient.grpc."""
    import ast

    root = Path(__file__).resolve().parent.parent
    importers = set()
    for folder in ("client", "wire", "server", "bench"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if any(n == "fuseport.kserve" or n.startswith("fuseport.kserve.") for n in names):
                    importers.add(path.relative_to(root).as_posix())
                if any(n == "fuseport.server.rpc.kserve" for n in names) or (
                    isinstance(node, ast.ImportFrom)
                    and node.module == "fuseport.server.rpc"
                    and any(a.name == "kserve" for a in node.names)
                ):
                    importers.add(f"{path.relative_to(root).as_posix()} (server.rpc.kserve)")
    assert importers == {"server/rpc/kserve.py", "server/app.py (server.rpc.kserve)"}


def test_a_client_that_heals_a_lost_kernel_gives_it_its_alias_again(served: Served) -> None:
    """Another caller unregisters the kernel (as a restart without its store would lose it):
    the registering client's next Execute registers it again, alias included."""
    with Client(served.server.target, timeout=120) as c:
        key = c.register(lambda t: t * 5, [torch.randn(3)], alias="healed")
        stub = service_pb2_grpc.KernelServiceStub(served.channel)
        assert stub.Unregister(service_pb2.UnregisterRequest(key=key), timeout=30).removed
        assert not served.stub.ModelReady(pb.ModelReadyRequest(name="healed"), timeout=30).ready
        x = torch.randn(3)
        torch.testing.assert_close(c.execute(key, [x])[0], x * 5)
        assert served.stub.ModelReady(pb.ModelReadyRequest(name="healed"), timeout=30).ready
        assert c.unregister(key)


def test_an_int_input_sent_as_uint64_past_int64_is_refused_not_wrapped(served: Served) -> None:
    # Found by an adversarial probe: 2**64 - 1 reached the kernel as -1 (x + n gave x - 1).
    with Client(served.server.target, timeout=120) as c:
        key = c.register(lambda x, n: x + n, [torch.ones(4, dtype=torch.int64), 2])
    for n, ok in ((2**63 - 1, True), (2**63, False), (2**64 - 1, False)):
        req = pb.ModelInferRequest(model_name=str(key))
        req.inputs.add(name="x", datatype="INT64", shape=[4]).contents.int64_contents.extend([0] * 4)
        req.inputs.add(name="n", datatype="UINT64", shape=[1]).contents.uint64_contents.append(n)
        if ok:
            assert torch.equal(_output(served.stub.ModelInfer(req, timeout=60), 0), torch.full((4,), n))
        else:
            code, details, _ = _refused(served.stub.ModelInfer, req)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not fit in int64" in details, details
    _still_serves(served)


def test_a_model_with_an_output_kserve_cannot_type_is_described_and_its_other_outputs_served(
    served: Served,
) -> None:
    with Client(served.server.target, timeout=120) as c:
        key = c.register(lambda x: (x * 2, x.to(torch.complex64)), [torch.ones(4)])
    name = str(key)
    meta = served.stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=30)
    assert [(t.name, t.datatype) for t in meta.outputs] == [("output0", "FP32"), ("output1", "")]
    config = served.stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=30).config
    assert [pb.DataType.Name(t.data_type) for t in config.output] == ["TYPE_FP32", "TYPE_INVALID"]
    req = pb.ModelInferRequest(model_name=name)
    req.inputs.add(name="x", datatype="FP32", shape=[3])
    req.raw_input_contents.append(_raw(torch.tensor([1.0, 2.0, 3.0])))
    req.outputs.add(name="output0")
    assert torch.equal(_output(served.stub.ModelInfer(req, timeout=60), 0), torch.tensor([2.0, 4.0, 6.0]))


def test_a_result_over_the_message_limit_names_what_a_kserve_caller_can_do(tmp_path: Path) -> None:
    server = start_server(tmp_path, None, "--compile-mode", "off", "--max-message-bytes", str(1 << 20))
    try:
        with Client(server.target, timeout=120) as c:
            key = c.register(lambda x: x.repeat(4), [torch.ones(4)])
        req = pb.ModelInferRequest(model_name=str(key))
        req.inputs.add(name="x", datatype="FP32", shape=[1 << 17])  # 512 KiB in, 2 MiB out
        req.raw_input_contents.append(_raw(torch.ones(1 << 17)))
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(req, timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-message-bytes" in e.value.details() and "ExecuteStream" not in e.value.details()
        assert "KServe's ModelInfer answers in one message" in e.value.details()
    finally:
        server.stop()


def test_an_empty_fp16_input_needs_no_raw_contents(served: Served) -> None:
    # FP16 and BF16 have no typed contents field; an input with no element has no bytes to
    # send, and was refused for not sending them in raw_input_contents.
    with Client(served.server.target, timeout=120) as c:
        key = c.register(lambda x: x * 2, [torch.ones(0, dtype=torch.float16)])  # captured empty
    req = pb.ModelInferRequest(model_name=str(key))
    req.inputs.add(name="x", datatype="FP16", shape=[0])
    resp = served.stub.ModelInfer(req, timeout=60)
    assert (resp.outputs[0].datatype, list(resp.outputs[0].shape)) == ("FP16", [0])
    assert resp.raw_output_contents[0] == b""
