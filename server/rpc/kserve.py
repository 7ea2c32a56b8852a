"""The KServe v2 / Triton gRPC inference protocol on fuseport's port: decode, call the core, encode.

Each registered kernel is a model, named by its alias or its key in decimal,
with one version ("1"). Its inputs are the inputs of the kernel's own graph,
by name; its outputs are output0, output1, ... ModelMetadata describes them,
and Triton's ModelConfig (what perf_analyzer reads) says the same in Triton's
terms. A ModelInfer runs the same core path as Execute (the fused kernel when
it is ready, the fallback otherwise) and answers in raw_output_contents. Errors
are fuseport's own (wire/errors.py) and travel with the same status codes as
KernelService's: both run through plumbing.py.

This is the only module that imports the generated `inference` stubs
(fuseport.kserve): they register the `inference.*` names in protobuf's default
descriptor pool, as tritonclient's own stubs do, so a process that imports the
server cannot import tritonclient.grpc, and the other way round. The client
never imports this module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import grpc
import torch

from fuseport.kserve import grpc_service_pb2 as _kpb
from fuseport.server.core import Core
from fuseport.server.rpc.plumbing import CallRecord, Method, Plumbing, parse
from fuseport.wire import _pb, codec, dtypes
from fuseport.wire.codec import MAX_RANK
from fuseport.wire.errors import (
    ExecutionFailed,
    InvalidArgument,
    InvalidStack,
    KernelNotFound,
    SignatureMismatch,
)
from fuseport.wire.graph import InputSpec, Signature

__all__ = ["DATATYPES", "METHODS", "SERVICE_NAME", "InferenceService"]

SERVICE_NAME = _kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
METHODS = (
    "ServerLive",
    "ServerReady",
    "ServerMetadata",
    "ModelReady",
    "ModelMetadata",
    "ModelInfer",
    "ModelConfig",
    "RepositoryIndex",
)

# KServe v2 datatype -> torch dtype. BYTES (strings) has no tensor here; the
# dtypes KServe has no name for (complex, float8, ...) make a kernel unavailable.
DATATYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
}
_DATATYPE_OF: dict[torch.dtype, str] = {dt: name for name, dt in DATATYPES.items()}
# The InferTensorContents field each datatype's typed contents go in; FP16 and
# BF16 have none (the protocol carries them raw only).
_TYPED_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_CONTENT_FIELDS = tuple(f.name for f in _kpb.InferTensorContents.DESCRIPTOR.fields)
# A scalar (int, float, bool) kernel input or output is a one-element tensor of these.
_SCALAR_DATATYPE = {"int": "INT64", "float": "FP64", "bool": "BOOL"}
_VERSION = "1"
_PLATFORM = "fuseport"
# ModelConfig's backend: Triton names the backend that runs a model; here it is fuseport.
_BACKEND = "fuseport"
_MAX_SHOWN = 80
# An input or output as ModelMetadata and ModelConfig describe it: name, KServe datatype, shape.
_Tensor = tuple[str, str, list[int]]


def _show(name: str) -> str:
    """A client-sent name as an error message shows it: quoted, at most _MAX_SHOWN characters."""
    return repr(name if len(name) <= _MAX_SHOWN else name[:_MAX_SHOWN] + "...")


def _server_version() -> str:
    try:
        return metadata.version("fuseport")
    except metadata.PackageNotFoundError:
        return "unknown"


def _datatype(spec: InputSpec) -> str:
    """The KServe datatype of an input or output; InvalidArgument for a dtype KServe has no name for."""
    if spec.kind != "tensor":
        return _SCALAR_DATATYPE[spec.kind]
    assert spec.dtype is not None
    name = _DATATYPE_OF.get(spec.dtype)
    if name is None:
        raise SignatureMismatch(
            f"{spec.name!r} is a {str(spec.dtype).removeprefix('torch.')} tensor, which KServe v2 has no "
            "datatype for; run this kernel through fuseport's own client"
        )
    return name


def _data_type(datatype: str) -> int:
    """Triton's DataType (model_config.proto) of a KServe datatype: FP32 is TYPE_FP32, and so
    on; the empty datatype of an output planning cannot tell is TYPE_INVALID."""
    return _kpb.DataType.Value(f"TYPE_{datatype}") if datatype else _kpb.TYPE_INVALID


def _shape(spec: InputSpec) -> list[int]:
    if spec.kind != "tensor":
        return [1]
    assert spec.shape is not None
    return list(spec.shape)


class InferenceService:
    """The `inference.GRPCInferenceService` methods. Calls go through the same
    plumbing as KernelService's (worker threads, deadline, error mapping, the
    metrics observer), so they behave, fail and count like its own."""

    def __init__(self, core: Core, plumbing: Plumbing) -> None:
        self.core = core
        self.plumbing = plumbing
        self._version = _server_version()

    def handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, Method] = {
            "ServerLive": self._server_live,
            "ServerReady": self._server_ready,
            "ServerMetadata": self._server_metadata,
            "ModelReady": self._model_ready,
            "ModelMetadata": self._model_metadata,
            "ModelInfer": self._model_infer,
            "ModelConfig": self._model_config,
            "RepositoryIndex": self._repository_index,
        }
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {name: self.plumbing.unary(fn, name) for name, fn in methods.items()},
        )

    # ------------------------------------------------------------------ server

    def _server_live(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        parse(_kpb.ServerLiveRequest, request)
        return _kpb.ServerLiveResponse(live=True).SerializeToString()

    def _server_ready(
        self, request: bytes, deadline: float | None, arrived: int, record: CallRecord
    ) -> bytes:
        # A draining server never gets here: the gate answers UNAVAILABLE first.
        parse(_kpb.ServerReadyRequest, request)
        return _kpb.ServerReadyResponse(ready=True).SerializeToString()

    def _server_metadata(
        self, request: bytes, deadline: float | None, arrived: int, record: CallRecord
    ) -> bytes:
        parse(_kpb.ServerMetadataRequest, request)
        # No extension is served whole (see docs/guides/kserve.md), so none is claimed.
        return _kpb.ServerMetadataResponse(name="fuseport", version=self._version).SerializeToString()

    # ------------------------------------------------------------------ models

    def _key(self, name: str, version: str) -> int:
        key = self.core.resolve(name)
        if version not in ("", _VERSION):
            raise KernelNotFound(
                f"model {_show(name)} has no version {_show(version)}; its one version is 1", key
            )
        return key

    def _model_ready(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        req = parse(_kpb.ModelReadyRequest, request)
        try:
            sig = self.core.signature(self._key(req.name, req.version))
            ready = _unavailable(sig) is None
        except KernelNotFound:
            ready = False
        return _kpb.ModelReadyResponse(ready=ready).SerializeToString()

    def _model_metadata(
        self, request: bytes, deadline: float | None, arrived: int, record: CallRecord
    ) -> bytes:
        req = parse(_kpb.ModelMetadataRequest, request)
        key = self._key(req.name, req.version)
        out = _kpb.ModelMetadataResponse(name=req.name, versions=[_VERSION], platform=_PLATFORM)
        inputs, outputs = self._tensors(key)
        for name, datatype, shape in inputs:
            out.inputs.add(name=name, datatype=datatype, shape=shape)
        for name, datatype, shape in outputs:
            out.outputs.add(name=name, datatype=datatype, shape=shape)
        return out.SerializeToString()

    def _model_config(
        self, request: bytes, deadline: float | None, arrived: int, record: CallRecord
    ) -> bytes:
        # Triton's model configuration, as far as fuseport has one: perf_analyzer reads it
        # before it sends anything. The same tensors as ModelMetadata, with Triton's types.
        req = parse(_kpb.ModelConfigRequest, request)
        key = self._key(req.name, req.version)
        inputs, outputs = self._tensors(key)
        alias = self.core.registry.alias_of(key)
        config = _kpb.ModelConfig(
            # The model's own name, as RepositoryIndex lists it, whichever name the request used.
            name=alias if alias is not None else str(key),
            platform=_PLATFORM,
            backend=_BACKEND,
            # One version ("1"), which "latest" serves.
            version_policy=_kpb.ModelVersionPolicy(latest=_kpb.ModelVersionPolicy.Latest(num_versions=1)),
            # 0: no batch dim is claimed. A kernel's first dim is just a dim (capture may have
            # tied it to other sizes), so dims are the whole shapes and clients send them so.
            max_batch_size=0,
        )
        for name, datatype, shape in inputs:
            config.input.add(name=name, data_type=_data_type(datatype), dims=shape)
        for name, datatype, shape in outputs:
            config.output.add(name=name, data_type=_data_type(datatype), dims=shape)
        return _kpb.ModelConfigResponse(config=config).SerializeToString()

    def _tensors(self, key: int) -> tuple[list[_Tensor], list[_Tensor]]:
        """The model's inputs and outputs as (name, KServe datatype, shape); SignatureMismatch
        for an input or output whose dtype KServe has no name for."""
        sig = self.core.signature(key)
        inputs = [(spec.name, _datatype(spec), _shape(spec)) for spec in sig.inputs]
        planned = self.core.outputs(key)
        outputs: list[_Tensor] = []
        for i in range(sig.num_outputs):
            spec = planned[i] if planned is not None else None
            if spec is None:
                # Planning could not tell (sizes that depend on data): the type shows in ModelInfer.
                outputs.append((f"output{i}", "", [-1]))
            else:
                try:
                    datatype = _datatype(spec)
                except SignatureMismatch:
                    # A dtype KServe has no name for (complex): the model still answers for its
                    # other outputs, so it is described, not refused; asking for this one fails.
                    datatype = ""
                outputs.append((spec.name, datatype, _shape(spec)))
        return inputs, outputs

    def _repository_index(
        self, request: bytes, deadline: float | None, arrived: int, record: CallRecord
    ) -> bytes:
        req = parse(_kpb.RepositoryIndexRequest, request)
        out = _kpb.RepositoryIndexResponse()
        for key, alias, sig in self.core.models():
            reason = _unavailable(sig)
            if req.ready and reason is not None:
                continue
            out.models.add(
                name=alias if alias is not None else str(key),
                version=_VERSION,
                state="READY" if reason is None else "UNAVAILABLE",
                reason=reason or "",
            )
        return out.SerializeToString()

    # ------------------------------------------------------------------ inference

    def _model_infer(self, request: bytes, deadline: float | None, arrived: int, record: CallRecord) -> bytes:
        started = time.perf_counter_ns()
        req = parse(_kpb.ModelInferRequest, request)
        del request
        key = self._key(req.model_name, req.model_version)
        sig = self.core.signature(key)
        stack = _decode_inputs(req, sig)
        wanted = _requested_outputs(req, sig.num_outputs)
        decode_ns = time.perf_counter_ns() - started
        result = self.core.execute(
            key, stack, fused=True, deadline=deadline, answer=record.answer, who=record.identity, transport="kserve"
        )
        encoding = time.perf_counter_ns()
        out = _kpb.ModelInferResponse(model_name=req.model_name, model_version=_VERSION, id=req.id)
        for i in wanted:
            _encode_output(out, f"output{i}", result.stack[i], key)
        timings = _pb.service.Timings(
            decode_us=decode_ns // 1000,
            queue_us=(started - arrived) // 1000,
            run_us=result.run_us,
            encode_us=(time.perf_counter_ns() - encoding) // 1000,
        )
        record.path, record.reason, record.timings = result.path, result.reason, timings
        return out.SerializeToString()


def _unavailable(sig: Signature) -> str | None:
    """Why KServe clients cannot call a kernel with this signature, or None."""
    try:
        for spec in sig.inputs:
            _datatype(spec)
    except InvalidArgument as e:
        return f"input {e}"
    return None


def _parameters_refused(params: Any, where: str) -> None:
    for name in params:
        if name.startswith("shared_memory"):
            raise InvalidArgument(
                f"{where}: parameter {_show(name)}: shared-memory regions are not served here; "
                "send the contents in the request"
            )


def _decode_inputs(req: _kpb.ModelInferRequest, sig: Signature) -> list[Any]:
    """The kernel's inputs, in its order, from the request's named tensors."""
    _parameters_refused(req.parameters, "request")
    names = [spec.name for spec in sig.inputs]
    expected = ", ".join(repr(n) for n in names)
    if len(req.inputs) != len(names):
        raise SignatureMismatch(
            f"model {_show(req.model_name)} takes {len(names)} input{'s' * (len(names) != 1)} ({expected}), "
            f"the request has {len(req.inputs)}"
        )
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise InvalidStack(
            f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs: one per input, in their order"
        )
    position = {name: i for i, name in enumerate(names)}
    values: list[Any] = [None] * len(names)
    seen: set[str] = set()
    for n, tensor in enumerate(req.inputs):
        where = f"input {_show(tensor.name)}"
        i = position.get(tensor.name)
        if i is None:
            raise SignatureMismatch(
                f"{where}: model {_show(req.model_name)} has no such input; its inputs: {expected}"
            )
        if tensor.name in seen:
            raise SignatureMismatch(f"{where}: given twice")
        seen.add(tensor.name)
        _parameters_refused(tensor.parameters, where)
        has_typed = tensor.HasField("contents") and any(getattr(tensor.contents, f) for f in _CONTENT_FIELDS)
        if raw and has_typed:
            raise InvalidStack(
                f"{where}: has typed contents while the request has raw_input_contents; send one or the other"
            )
        value = _tensor(tensor, raw[n] if raw else None, where)
        spec = sig.inputs[i]
        if spec.kind != "tensor":
            if value.dim() > 1 or value.numel() != 1:
                raise SignatureMismatch(
                    f"{where} is a {spec.kind} (a scalar): send one element, shape [1] "
                    f"({_SCALAR_DATATYPE[spec.kind]}), got shape {list(value.shape)}"
                )
            value = value.item()  # bool, int or float, after its dtype; the core checks the kind
            if type(value) is int and not -(2**63) <= value < 2**63:
                # A UINT64 past int64's range: as an int input it would wrap on the way into the kernel.
                raise InvalidStack(f"{where}: {value} does not fit in int64, the type of {spec.name!r}")
        values[i] = value
    return values


def _tensor(tensor: Any, raw: bytes | None, where: str) -> torch.Tensor:
    datatype = tensor.datatype
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        if datatype == "BYTES":
            raise InvalidStack(
                f"{where}: datatype BYTES (strings) is not served: fuseport kernels take numbers"
            )
        raise InvalidStack(f"{where}: unknown datatype {_show(datatype)}; one of {', '.join(DATATYPES)}")
    shape = list(tensor.shape)
    if len(shape) > MAX_RANK:
        raise InvalidStack(f"{where}: rank {len(shape)} is over {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise InvalidStack(f"{where}: shape {shape} has a negative dim")
    code = dtypes.code_for(dtype)
    assert code is not None
    if raw is not None:
        # The codec checks the byte length against the shape (Python integers:
        # no overflow, however large the dims).
        return codec.tensor_from_bytes(code, shape, raw, where)
    field = _TYPED_FIELD.get(datatype)
    contents = tensor.contents
    given = [f for f in _CONTENT_FIELDS if getattr(contents, f)]
    if field is None:
        if not given and math.prod(shape) == 0:  # no element: no bytes to send either way
            return codec.tensor_from_bytes(code, shape, b"", where)
        raise InvalidStack(f"{where}: {datatype} has no typed contents field; send it in raw_input_contents")
    if any(f != field for f in given):
        raise InvalidStack(f"{where}: {datatype} contents go in {field}, got {', '.join(given)}")
    items = getattr(contents, field)
    count = math.prod(shape)
    if len(items) != count:
        raise InvalidStack(f"{where}: shape {shape} has {count} elements, {field} holds {len(items)}")
    if count == 0:  # the codec's checks, shapes such as [0, 2**62, 2**62] included
        return codec.tensor_from_bytes(code, shape, b"", where)
    if dtype == torch.uint64:
        # uint64_contents past 2**63 do not fit int64: read them as the bits they are.
        bits = torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in items], dtype=torch.int64)
        return bits.view(torch.uint64).reshape(shape)
    wide = torch.tensor(list(items), dtype=torch.float64 if dtype.is_floating_point else torch.int64)
    if not dtype.is_floating_point and dtype != torch.bool:
        info = torch.iinfo(dtype)
        if bool((wide < info.min).any()) or bool((wide > info.max).any()):
            raise InvalidStack(f"{where}: {field} holds values outside {datatype}'s range")
    return wide.to(dtype).reshape(shape)


def _requested_outputs(req: _kpb.ModelInferRequest, count: int) -> Sequence[int]:
    if not req.outputs:
        return range(count)
    names = {f"output{i}": i for i in range(count)}
    wanted = []
    for o in req.outputs:
        if o.name not in names:
            raise SignatureMismatch(
                f"requested output {_show(o.name)}: model {_show(req.model_name)} has outputs "
                f"{', '.join(names)}"
            )
        _parameters_refused(o.parameters, f"output {_show(o.name)}")
        wanted.append(names[o.name])
    return wanted


def _encode_output(out: _kpb.ModelInferResponse, name: str, value: Any, key: int) -> None:
    if isinstance(value, (bool, int, float)) and not isinstance(value, torch.Tensor):
        kind = "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "float"
        value = torch.tensor(
            [value], dtype={"bool": torch.bool, "int": torch.int64, "float": torch.float64}[kind]
        )
    if not isinstance(value, torch.Tensor):
        raise ExecutionFailed(
            f"kernel {key}: {name} is a {type(value).__name__}, which KServe v2 cannot carry; "
            "run it through fuseport's own client"
        )
    datatype = _DATATYPE_OF.get(value.dtype)
    if datatype is None:
        raise ExecutionFailed(
            f"kernel {key}: {name} is a {str(value.dtype).removeprefix('torch.')} tensor, which KServe v2 "
            "has no datatype for; run it through fuseport's own client"
        )
    out.outputs.add(name=name, datatype=datatype, shape=list(value.shape))
    flat = value.contiguous().reshape(-1).view(torch.uint8)
    out.raw_output_contents.append(flat.numpy().tobytes())
