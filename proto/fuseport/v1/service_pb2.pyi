from fuseport.v1 import graph_pb2 as _graph_pb2
from fuseport.v1 import values_pb2 as _values_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Path(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PATH_UNSPECIFIED: _ClassVar[Path]
    PATH_FUSED: _ClassVar[Path]
    PATH_FALLBACK: _ClassVar[Path]

class FallbackReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FALLBACK_REASON_UNSPECIFIED: _ClassVar[FallbackReason]
    FALLBACK_REASON_REQUESTED: _ClassVar[FallbackReason]
    FALLBACK_REASON_COMPILING: _ClassVar[FallbackReason]
    FALLBACK_REASON_COMPILE_FAILED: _ClassVar[FallbackReason]
    FALLBACK_REASON_UNSUPPORTED: _ClassVar[FallbackReason]
    FALLBACK_REASON_MIXED_DEVICES: _ClassVar[FallbackReason]
    FALLBACK_REASON_RUNTIME_ERROR: _ClassVar[FallbackReason]
    FALLBACK_REASON_RECOMPILE_LIMIT: _ClassVar[FallbackReason]
    FALLBACK_REASON_DISABLED: _ClassVar[FallbackReason]

class CompileState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPILE_STATE_UNSPECIFIED: _ClassVar[CompileState]
    COMPILE_STATE_COMPILING: _ClassVar[CompileState]
    COMPILE_STATE_READY: _ClassVar[CompileState]
    COMPILE_STATE_FAILED: _ClassVar[CompileState]
PATH_UNSPECIFIED: Path
PATH_FUSED: Path
PATH_FALLBACK: Path
FALLBACK_REASON_UNSPECIFIED: FallbackReason
FALLBACK_REASON_REQUESTED: FallbackReason
FALLBACK_REASON_COMPILING: FallbackReason
FALLBACK_REASON_COMPILE_FAILED: FallbackReason
FALLBACK_REASON_UNSUPPORTED: FallbackReason
FALLBACK_REASON_MIXED_DEVICES: FallbackReason
FALLBACK_REASON_RUNTIME_ERROR: FallbackReason
FALLBACK_REASON_RECOMPILE_LIMIT: FallbackReason
FALLBACK_REASON_DISABLED: FallbackReason
COMPILE_STATE_UNSPECIFIED: CompileState
COMPILE_STATE_COMPILING: CompileState
COMPILE_STATE_READY: CompileState
COMPILE_STATE_FAILED: CompileState

class RegisterRequest(_message.Message):
    __slots__ = ("graph", "variant_of", "alias", "batching")
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    VARIANT_OF_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    variant_of: int
    alias: str
    batching: bool
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., variant_of: _Optional[int] = ..., alias: _Optional[str] = ..., batching: bool = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("key", "created", "variant")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    key: int
    created: bool
    variant: int
    def __init__(self, key: _Optional[int] = ..., created: bool = ..., variant: _Optional[int] = ...) -> None: ...

class ExecuteOptions(_message.Message):
    __slots__ = ("wait_for_compile", "variants", "keep_outputs", "free_handles", "no_batching", "shared_memory_session", "shared_memory_slot", "shared_memory_fresh_output", "shared_memory_cuda_outputs")
    WAIT_FOR_COMPILE_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    KEEP_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    FREE_HANDLES_FIELD_NUMBER: _ClassVar[int]
    NO_BATCHING_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_SESSION_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_SLOT_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FRESH_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_CUDA_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    wait_for_compile: bool
    variants: _containers.RepeatedScalarFieldContainer[int]
    keep_outputs: bool
    free_handles: _containers.RepeatedScalarFieldContainer[str]
    no_batching: bool
    shared_memory_session: str
    shared_memory_slot: int
    shared_memory_fresh_output: bool
    shared_memory_cuda_outputs: bool
    def __init__(self, wait_for_compile: bool = ..., variants: _Optional[_Iterable[int]] = ..., keep_outputs: bool = ..., free_handles: _Optional[_Iterable[str]] = ..., no_batching: bool = ..., shared_memory_session: _Optional[str] = ..., shared_memory_slot: _Optional[int] = ..., shared_memory_fresh_output: bool = ..., shared_memory_cuda_outputs: bool = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("key", "options", "stack", "graphs", "alias")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STACK_FIELD_NUMBER: _ClassVar[int]
    GRAPHS_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    key: int
    options: ExecuteOptions
    stack: _containers.RepeatedCompositeFieldContainer[_values_pb2.Value]
    graphs: _containers.RepeatedCompositeFieldContainer[_graph_pb2.Graph]
    alias: str
    def __init__(self, key: _Optional[int] = ..., options: _Optional[_Union[ExecuteOptions, _Mapping]] = ..., stack: _Optional[_Iterable[_Union[_values_pb2.Value, _Mapping]]] = ..., graphs: _Optional[_Iterable[_Union[_graph_pb2.Graph, _Mapping]]] = ..., alias: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_us", "queue_us", "run_us", "encode_us")
    DECODE_US_FIELD_NUMBER: _ClassVar[int]
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    RUN_US_FIELD_NUMBER: _ClassVar[int]
    ENCODE_US_FIELD_NUMBER: _ClassVar[int]
    decode_us: int
    queue_us: int
    run_us: int
    encode_us: int
    def __init__(self, decode_us: _Optional[int] = ..., queue_us: _Optional[int] = ..., run_us: _Optional[int] = ..., encode_us: _Optional[int] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("path", "reason", "detail", "stack", "timings", "variant", "registered")
    PATH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    STACK_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    path: Path
    reason: FallbackReason
    detail: str
    stack: _containers.RepeatedCompositeFieldContainer[_values_pb2.Value]
    timings: Timings
    variant: int
    registered: int
    def __init__(self, path: _Optional[_Union[Path, str]] = ..., reason: _Optional[_Union[FallbackReason, str]] = ..., detail: _Optional[str] = ..., stack: _Optional[_Iterable[_Union[_values_pb2.Value, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., variant: _Optional[int] = ..., registered: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("key", "include_source")
    KEY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    key: int
    include_source: bool
    def __init__(self, key: _Optional[int] = ..., include_source: bool = ...) -> None: ...

class ArgSpecInfo(_message.Message):
    __slots__ = ("arg_spec", "state", "error", "compile_seconds", "fused_runs", "fallback_runs", "source", "variant", "compiled_by", "from_cache")
    ARG_SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    COMPILE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FUSED_RUNS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_RUNS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    COMPILED_BY_FIELD_NUMBER: _ClassVar[int]
    FROM_CACHE_FIELD_NUMBER: _ClassVar[int]
    arg_spec: str
    state: CompileState
    error: str
    compile_seconds: float
    fused_runs: int
    fallback_runs: int
    source: str
    variant: int
    compiled_by: str
    from_cache: bool
    def __init__(self, arg_spec: _Optional[str] = ..., state: _Optional[_Union[CompileState, str]] = ..., error: _Optional[str] = ..., compile_seconds: _Optional[float] = ..., fused_runs: _Optional[int] = ..., fallback_runs: _Optional[int] = ..., source: _Optional[str] = ..., variant: _Optional[int] = ..., compiled_by: _Optional[str] = ..., from_cache: bool = ...) -> None: ...

class VariantInfo(_message.Message):
    __slots__ = ("variant", "inputs", "conditions", "num_nodes")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    variant: int
    inputs: _containers.RepeatedCompositeFieldContainer[_graph_pb2.GraphInput]
    conditions: _containers.RepeatedScalarFieldContainer[str]
    num_nodes: int
    def __init__(self, variant: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[_graph_pb2.GraphInput, _Mapping]]] = ..., conditions: _Optional[_Iterable[str]] = ..., num_nodes: _Optional[int] = ...) -> None: ...

class KernelInfo(_message.Message):
    __slots__ = ("key", "inputs", "num_outputs", "num_nodes", "ops", "fused_runs", "fallback_runs", "arg_specs", "device", "variants", "random_ops", "alias", "batching_off", "batching", "overruns")
    KEY_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    FUSED_RUNS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_RUNS_FIELD_NUMBER: _ClassVar[int]
    ARG_SPECS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    RANDOM_OPS_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_OFF_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    OVERRUNS_FIELD_NUMBER: _ClassVar[int]
    key: int
    inputs: _containers.RepeatedCompositeFieldContainer[_graph_pb2.GraphInput]
    num_outputs: int
    num_nodes: int
    ops: _containers.RepeatedScalarFieldContainer[str]
    fused_runs: int
    fallback_runs: int
    arg_specs: _containers.RepeatedCompositeFieldContainer[ArgSpecInfo]
    device: str
    variants: _containers.RepeatedCompositeFieldContainer[VariantInfo]
    random_ops: _containers.RepeatedScalarFieldContainer[str]
    alias: str
    batching_off: str
    batching: _containers.RepeatedCompositeFieldContainer[BatchingVerdict]
    overruns: int
    def __init__(self, key: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[_graph_pb2.GraphInput, _Mapping]]] = ..., num_outputs: _Optional[int] = ..., num_nodes: _Optional[int] = ..., ops: _Optional[_Iterable[str]] = ..., fused_runs: _Optional[int] = ..., fallback_runs: _Optional[int] = ..., arg_specs: _Optional[_Iterable[_Union[ArgSpecInfo, _Mapping]]] = ..., device: _Optional[str] = ..., variants: _Optional[_Iterable[_Union[VariantInfo, _Mapping]]] = ..., random_ops: _Optional[_Iterable[str]] = ..., alias: _Optional[str] = ..., batching_off: _Optional[str] = ..., batching: _Optional[_Iterable[_Union[BatchingVerdict, _Mapping]]] = ..., overruns: _Optional[int] = ...) -> None: ...

class BatchingVerdict(_message.Message):
    __slots__ = ("variant", "sizes", "batchable", "reason", "batched_variants", "dynamic")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    BATCHABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BATCHED_VARIANTS_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_FIELD_NUMBER: _ClassVar[int]
    variant: int
    sizes: str
    batchable: bool
    reason: str
    batched_variants: _containers.RepeatedScalarFieldContainer[int]
    dynamic: bool
    def __init__(self, variant: _Optional[int] = ..., sizes: _Optional[str] = ..., batchable: bool = ..., reason: _Optional[str] = ..., batched_variants: _Optional[_Iterable[int]] = ..., dynamic: bool = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("kernel",)
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    kernel: KernelInfo
    def __init__(self, kernel: _Optional[_Union[KernelInfo, _Mapping]] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("kernels", "resident")
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    kernels: _containers.RepeatedCompositeFieldContainer[KernelInfo]
    resident: ResidentInfo
    def __init__(self, kernels: _Optional[_Iterable[_Union[KernelInfo, _Mapping]]] = ..., resident: _Optional[_Union[ResidentInfo, _Mapping]] = ...) -> None: ...

class UnregisterRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: int
    def __init__(self, key: _Optional[int] = ...) -> None: ...

class UnregisterResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: bool = ...) -> None: ...

class StreamRequestHeader(_message.Message):
    __slots__ = ("key", "options", "stack", "sizes")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STACK_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    key: int
    options: ExecuteOptions
    stack: _containers.RepeatedCompositeFieldContainer[_values_pb2.Value]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, key: _Optional[int] = ..., options: _Optional[_Union[ExecuteOptions, _Mapping]] = ..., stack: _Optional[_Iterable[_Union[_values_pb2.Value, _Mapping]]] = ..., sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class StreamResponseHeader(_message.Message):
    __slots__ = ("path", "reason", "detail", "variant", "stack", "sizes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    STACK_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    path: Path
    reason: FallbackReason
    detail: str
    variant: int
    stack: _containers.RepeatedCompositeFieldContainer[_values_pb2.Value]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, path: _Optional[_Union[Path, str]] = ..., reason: _Optional[_Union[FallbackReason, str]] = ..., detail: _Optional[str] = ..., variant: _Optional[int] = ..., stack: _Optional[_Iterable[_Union[_values_pb2.Value, _Mapping]]] = ..., sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class StreamData(_message.Message):
    __slots__ = ("tensor", "offset", "crc32c", "data")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    tensor: int
    offset: int
    crc32c: int
    data: bytes
    def __init__(self, tensor: _Optional[int] = ..., offset: _Optional[int] = ..., crc32c: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ("chunks", "bytes", "timings")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    bytes: int
    timings: Timings
    def __init__(self, chunks: _Optional[int] = ..., bytes: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class StackChunk(_message.Message):
    __slots__ = ("request", "response", "data", "end", "register")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    request: StreamRequestHeader
    response: StreamResponseHeader
    data: StreamData
    end: StreamEnd
    register: StreamRegisterHeader
    def __init__(self, request: _Optional[_Union[StreamRequestHeader, _Mapping]] = ..., response: _Optional[_Union[StreamResponseHeader, _Mapping]] = ..., data: _Optional[_Union[StreamData, _Mapping]] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ..., register: _Optional[_Union[StreamRegisterHeader, _Mapping]] = ...) -> None: ...

class StreamRegisterHeader(_message.Message):
    __slots__ = ("request", "sizes")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    request: RegisterRequest
    sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request: _Optional[_Union[RegisterRequest, _Mapping]] = ..., sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class FetchHandlesRequest(_message.Message):
    __slots__ = ("ids", "free")
    IDS_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    free: bool
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., free: bool = ...) -> None: ...

class FetchHandlesResponse(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[_values_pb2.Value]
    def __init__(self, values: _Optional[_Iterable[_Union[_values_pb2.Value, _Mapping]]] = ...) -> None: ...

class FreeHandlesRequest(_message.Message):
    __slots__ = ("ids", "all")
    IDS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    all: bool
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., all: bool = ...) -> None: ...

class FreeHandlesResponse(_message.Message):
    __slots__ = ("freed", "freed_bytes")
    FREED_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed: int
    freed_bytes: int
    def __init__(self, freed: _Optional[int] = ..., freed_bytes: _Optional[int] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResidentUsage(_message.Message):
    __slots__ = ("handles", "bytes", "lease_seconds", "quota_bytes", "max_handles", "frees_with_calls")
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_HANDLES_FIELD_NUMBER: _ClassVar[int]
    FREES_WITH_CALLS_FIELD_NUMBER: _ClassVar[int]
    handles: int
    bytes: int
    lease_seconds: float
    quota_bytes: int
    max_handles: int
    frees_with_calls: bool
    def __init__(self, handles: _Optional[int] = ..., bytes: _Optional[int] = ..., lease_seconds: _Optional[float] = ..., quota_bytes: _Optional[int] = ..., max_handles: _Optional[int] = ..., frees_with_calls: bool = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ("usage",)
    USAGE_FIELD_NUMBER: _ClassVar[int]
    usage: ResidentUsage
    def __init__(self, usage: _Optional[_Union[ResidentUsage, _Mapping]] = ...) -> None: ...

class ResidentInfo(_message.Message):
    __slots__ = ("server", "handles", "bytes", "clients", "budget_bytes", "caller")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    server: str
    handles: int
    bytes: int
    clients: int
    budget_bytes: int
    caller: ResidentUsage
    def __init__(self, server: _Optional[str] = ..., handles: _Optional[int] = ..., bytes: _Optional[int] = ..., clients: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., caller: _Optional[_Union[ResidentUsage, _Mapping]] = ...) -> None: ...

class OpenSharedMemoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenSharedMemoryResponse(_message.Message):
    __slots__ = ("socket", "ticket", "session", "max_bytes", "max_slots", "cuda_devices", "fresh_outputs", "cuda_outputs")
    SOCKET_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SLOTS_FIELD_NUMBER: _ClassVar[int]
    CUDA_DEVICES_FIELD_NUMBER: _ClassVar[int]
    FRESH_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    CUDA_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    socket: str
    ticket: str
    session: str
    max_bytes: int
    max_slots: int
    cuda_devices: _containers.RepeatedScalarFieldContainer[bytes]
    fresh_outputs: bool
    cuda_outputs: bool
    def __init__(self, socket: _Optional[str] = ..., ticket: _Optional[str] = ..., session: _Optional[str] = ..., max_bytes: _Optional[int] = ..., max_slots: _Optional[int] = ..., cuda_devices: _Optional[_Iterable[bytes]] = ..., fresh_outputs: bool = ..., cuda_outputs: bool = ...) -> None: ...
