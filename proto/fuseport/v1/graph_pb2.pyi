from fuseport.v1 import values_pb2 as _values_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_KIND_UNSPECIFIED: _ClassVar[InputKind]
    INPUT_KIND_TENSOR: _ClassVar[InputKind]
    INPUT_KIND_INT: _ClassVar[InputKind]
    INPUT_KIND_FLOAT: _ClassVar[InputKind]
    INPUT_KIND_BOOL: _ClassVar[InputKind]

class MemoryFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMORY_FORMAT_UNSPECIFIED: _ClassVar[MemoryFormat]
    MEMORY_FORMAT_CONTIGUOUS: _ClassVar[MemoryFormat]
    MEMORY_FORMAT_PRESERVE: _ClassVar[MemoryFormat]
    MEMORY_FORMAT_CHANNELS_LAST: _ClassVar[MemoryFormat]
    MEMORY_FORMAT_CHANNELS_LAST_3D: _ClassVar[MemoryFormat]

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_UNSPECIFIED: _ClassVar[Layout]
    LAYOUT_STRIDED: _ClassVar[Layout]

class SizeOpKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIZE_OP_UNSPECIFIED: _ClassVar[SizeOpKind]
    SIZE_OP_ADD: _ClassVar[SizeOpKind]
    SIZE_OP_MUL: _ClassVar[SizeOpKind]
    SIZE_OP_FLOORDIV: _ClassVar[SizeOpKind]
    SIZE_OP_MOD: _ClassVar[SizeOpKind]
    SIZE_OP_MIN: _ClassVar[SizeOpKind]
    SIZE_OP_MAX: _ClassVar[SizeOpKind]
    SIZE_OP_EQ: _ClassVar[SizeOpKind]
    SIZE_OP_NE: _ClassVar[SizeOpKind]
    SIZE_OP_LT: _ClassVar[SizeOpKind]
    SIZE_OP_LE: _ClassVar[SizeOpKind]
    SIZE_OP_AND: _ClassVar[SizeOpKind]
    SIZE_OP_OR: _ClassVar[SizeOpKind]
    SIZE_OP_NOT: _ClassVar[SizeOpKind]
INPUT_KIND_UNSPECIFIED: InputKind
INPUT_KIND_TENSOR: InputKind
INPUT_KIND_INT: InputKind
INPUT_KIND_FLOAT: InputKind
INPUT_KIND_BOOL: InputKind
MEMORY_FORMAT_UNSPECIFIED: MemoryFormat
MEMORY_FORMAT_CONTIGUOUS: MemoryFormat
MEMORY_FORMAT_PRESERVE: MemoryFormat
MEMORY_FORMAT_CHANNELS_LAST: MemoryFormat
MEMORY_FORMAT_CHANNELS_LAST_3D: MemoryFormat
LAYOUT_UNSPECIFIED: Layout
LAYOUT_STRIDED: Layout
SIZE_OP_UNSPECIFIED: SizeOpKind
SIZE_OP_ADD: SizeOpKind
SIZE_OP_MUL: SizeOpKind
SIZE_OP_FLOORDIV: SizeOpKind
SIZE_OP_MOD: SizeOpKind
SIZE_OP_MIN: SizeOpKind
SIZE_OP_MAX: SizeOpKind
SIZE_OP_EQ: SizeOpKind
SIZE_OP_NE: SizeOpKind
SIZE_OP_LT: SizeOpKind
SIZE_OP_LE: SizeOpKind
SIZE_OP_AND: SizeOpKind
SIZE_OP_OR: SizeOpKind
SIZE_OP_NOT: SizeOpKind

class SizeExpr(_message.Message):
    __slots__ = ("int_value", "dim", "scalar", "op")
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    SCALAR_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    int_value: int
    dim: SizeRef
    scalar: int
    op: SizeOp
    def __init__(self, int_value: _Optional[int] = ..., dim: _Optional[_Union[SizeRef, _Mapping]] = ..., scalar: _Optional[int] = ..., op: _Optional[_Union[SizeOp, _Mapping]] = ...) -> None: ...

class SizeRef(_message.Message):
    __slots__ = ("input", "dim")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    input: int
    dim: int
    def __init__(self, input: _Optional[int] = ..., dim: _Optional[int] = ...) -> None: ...

class SizeOp(_message.Message):
    __slots__ = ("kind", "args")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    kind: SizeOpKind
    args: _containers.RepeatedCompositeFieldContainer[SizeExpr]
    def __init__(self, kind: _Optional[_Union[SizeOpKind, str]] = ..., args: _Optional[_Iterable[_Union[SizeExpr, _Mapping]]] = ...) -> None: ...

class GraphInput(_message.Message):
    __slots__ = ("name", "kind", "dtype", "shape", "static", "static_value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    STATIC_FIELD_NUMBER: _ClassVar[int]
    STATIC_VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: InputKind
    dtype: _values_pb2.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    static: bool
    static_value: Argument
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[InputKind, str]] = ..., dtype: _Optional[_Union[_values_pb2.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., static: bool = ..., static_value: _Optional[_Union[Argument, _Mapping]] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("type", "index")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    type: str
    index: int
    def __init__(self, type: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class ArgumentList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Argument]
    def __init__(self, items: _Optional[_Iterable[_Union[Argument, _Mapping]]] = ...) -> None: ...

class Argument(_message.Message):
    __slots__ = ("ref", "constant", "int_value", "float_value", "bool_value", "string_value", "none_value", "list_value", "dtype", "device", "memory_format", "layout")
    REF_FIELD_NUMBER: _ClassVar[int]
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    NONE_VALUE_FIELD_NUMBER: _ClassVar[int]
    LIST_VALUE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FORMAT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    ref: str
    constant: int
    int_value: int
    float_value: float
    bool_value: bool
    string_value: str
    none_value: _values_pb2.NoneValue
    list_value: ArgumentList
    dtype: _values_pb2.DType
    device: Device
    memory_format: MemoryFormat
    layout: Layout
    def __init__(self, ref: _Optional[str] = ..., constant: _Optional[int] = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., bool_value: bool = ..., string_value: _Optional[str] = ..., none_value: _Optional[_Union[_values_pb2.NoneValue, _Mapping]] = ..., list_value: _Optional[_Union[ArgumentList, _Mapping]] = ..., dtype: _Optional[_Union[_values_pb2.DType, str]] = ..., device: _Optional[_Union[Device, _Mapping]] = ..., memory_format: _Optional[_Union[MemoryFormat, str]] = ..., layout: _Optional[_Union[Layout, str]] = ...) -> None: ...

class KeywordArgument(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: Argument
    def __init__(self, name: _Optional[str] = ..., value: _Optional[_Union[Argument, _Mapping]] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("op", "args", "kwargs", "outputs")
    OP_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    op: str
    args: _containers.RepeatedCompositeFieldContainer[Argument]
    kwargs: _containers.RepeatedCompositeFieldContainer[KeywordArgument]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, op: _Optional[str] = ..., args: _Optional[_Iterable[_Union[Argument, _Mapping]]] = ..., kwargs: _Optional[_Iterable[_Union[KeywordArgument, _Mapping]]] = ..., outputs: _Optional[_Iterable[str]] = ...) -> None: ...

class Graph(_message.Message):
    __slots__ = ("inputs", "constants", "nodes", "outputs", "conditions")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    CONSTANTS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[GraphInput]
    constants: _containers.RepeatedCompositeFieldContainer[_values_pb2.Tensor]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    outputs: _containers.RepeatedCompositeFieldContainer[Argument]
    conditions: _containers.RepeatedCompositeFieldContainer[SizeExpr]
    def __init__(self, inputs: _Optional[_Iterable[_Union[GraphInput, _Mapping]]] = ..., constants: _Optional[_Iterable[_Union[_values_pb2.Tensor, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[Argument, _Mapping]]] = ..., conditions: _Optional[_Iterable[_Union[SizeExpr, _Mapping]]] = ...) -> None: ...
