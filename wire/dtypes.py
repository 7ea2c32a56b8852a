"""The dtype table of the wire contract: DType enum number <-> torch dtype."""

from __future__ import annotations

import torch

__all__ = ["DTYPE_NAMES", "code_for", "dtype_for", "itemsize_for", "name_for"]

# Enum number -> torch attribute name, as in values.proto. Quantized dtypes
# (which need scale and zero point) and the sub-byte "shell" dtypes (uint1..7,
# int1..7, which torch stores one per byte with no fixed meaning) are left out.
DTYPE_NAMES: dict[int, str] = {
    1: "bool",
    2: "uint8",
    3: "int8",
    4: "int16",
    5: "int32",
    6: "int64",
    7: "float16",
    8: "bfloat16",
    9: "float32",
    10: "float64",
    11: "complex64",
    12: "complex128",
    13: "uint16",
    14: "uint32",
    15: "uint64",
    16: "float8_e4m3fn",
    17: "float8_e5m2",
    18: "float8_e4m3fnuz",
    19: "float8_e5m2fnuz",
    20: "float8_e8m0fnu",
    21: "complex32",
    22: "float4_e2m1fn_x2",
    23: "bits8",
    24: "bits16",
}

# Only the dtypes this torch has: an older torch on a server simply rejects
# the newer codes with a clear error.
_TORCH: dict[int, torch.dtype] = {
    code: getattr(torch, name) for code, name in DTYPE_NAMES.items() if hasattr(torch, name)
}
_CODE: dict[torch.dtype, int] = {dt: code for code, dt in _TORCH.items()}
_ITEMSIZE: dict[int, int] = {code: dt.itemsize for code, dt in _TORCH.items()}


def dtype_for(code: int) -> torch.dtype | None:
    """The torch dtype for an enum number, or None if unknown here."""
    return _TORCH.get(code)


def code_for(dtype: torch.dtype) -> int | None:
    """The enum number for a torch dtype, or None if it cannot travel."""
    return _CODE.get(dtype)


def itemsize_for(code: int) -> int:
    return _ITEMSIZE[code]


def name_for(code: int) -> str:
    """Short name for messages: "float32", or "dtype 99" for an unknown number."""
    return DTYPE_NAMES.get(code, f"dtype {code}")
