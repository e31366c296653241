"""GGUF container format: the pieces the writer and the reader share.

File layout (all little-endian), GGUF version 3 (version 2 is the same layout):

    "GGUF" | version:u32 | n_tensors:u64 | n_kv:u64
    n_kv x        key:str | value_type:u32 | value
    n_tensors x   name:str | n_dims:u32 | ne[n_dims]:u64 (innermost first) | ggml_type:u32 | offset:u64
    zero padding to `alignment`
    tensor data: tensor k starts at data_start + offset_k; offsets are multiples of `alignment`

    str   = length:u64 | utf-8 bytes
    ARRAY = element_type:u32 | count:u64 | elements
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ditq.errors import ConfigError

MAGIC = b"GGUF"
VERSION = 3
READABLE_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
MAX_DIMS = 4  # GGML_MAX_DIMS

# Fixed-size value types: struct code.
SCALAR_CODES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_TYPES: dict[np.dtype, GGUFValueType] = {
    np.dtype(np.uint8): GGUFValueType.UINT8,
    np.dtype(np.int8): GGUFValueType.INT8,
    np.dtype(np.uint16): GGUFValueType.UINT16,
    np.dtype(np.int16): GGUFValueType.INT16,
    np.dtype(np.uint32): GGUFValueType.UINT32,
    np.dtype(np.int32): GGUFValueType.INT32,
    np.dtype(np.float32): GGUFValueType.FLOAT32,
    np.dtype(np.bool_): GGUFValueType.BOOL,
    np.dtype(np.uint64): GGUFValueType.UINT64,
    np.dtype(np.int64): GGUFValueType.INT64,
    np.dtype(np.float64): GGUFValueType.FLOAT64,
}


def align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def qtype_sizes(type_id: int) -> tuple[GGMLQuantizationType, int, int] | None:
    """(qtype, block_size, type_size) for a ggml type id gguf-py knows, else None."""
    try:
        q = GGMLQuantizationType(type_id)
    except ValueError:
        return None
    if q not in GGML_QUANT_SIZES:
        return None
    block, size = GGML_QUANT_SIZES[q]
    return q, block, size


def value_type(key: str, value: Any) -> GGUFValueType:
    """The GGUF type a metadata value is written as: numpy scalars and arrays keep their dtype; Python bool ->
    BOOL, int -> INT32 (INT64 / UINT64 when it does not fit), float -> FLOAT32, str -> STRING, list -> ARRAY."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ConfigError(f"metadata {key!r}: arrays must be 1-D, got shape {value.shape}")
        return GGUFValueType.ARRAY
    if isinstance(value, np.generic):
        try:
            return _NUMPY_TYPES[value.dtype]
        except KeyError:
            raise ConfigError(f"metadata {key!r}: numpy type {value.dtype} has no GGUF value type") from None
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return GGUFValueType.INT32
        if -(2**63) <= value < 2**63:
            return GGUFValueType.INT64
        if 0 <= value < 2**64:
            return GGUFValueType.UINT64
        raise ConfigError(f"metadata {key!r}: integer {value} does not fit 64 bits")
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, (list, tuple)):
        return GGUFValueType.ARRAY
    raise ConfigError(f"metadata {key!r}: cannot store a {type(value).__name__} in GGUF")


def encode_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def encode_value(key: str, value: Any, vtype: GGUFValueType) -> bytes:
    """The bytes of `value` as `vtype` (without the leading type id)."""
    if vtype == GGUFValueType.STRING:
        return encode_string(value)
    if vtype == GGUFValueType.ARRAY:
        items = list(value.tolist() if isinstance(value, np.ndarray) else value)
        if isinstance(value, np.ndarray):
            etype = _NUMPY_TYPES.get(value.dtype)
            if etype is None:
                raise ConfigError(f"metadata {key!r}: numpy type {value.dtype} has no GGUF value type")
        elif not items:
            raise ConfigError(
                f"metadata {key!r}: an empty list has no element type; pass a typed numpy array"
            )
        else:
            etypes = {value_type(key, v) for v in items}
            if len(etypes) > 1 and etypes <= {GGUFValueType.INT32, GGUFValueType.INT64}:
                etypes = {GGUFValueType.INT64}
            if len(etypes) != 1:
                raise ConfigError(f"metadata {key!r}: array elements have mixed types {sorted(etypes)}")
            (etype,) = etypes
        body = b"".join(encode_value(key, v, etype) for v in items)
        return struct.pack("<IQ", int(etype), len(items)) + body
    try:
        return struct.pack(SCALAR_CODES[vtype], value)
    except struct.error as err:
        raise ConfigError(f"metadata {key!r}: {value!r} does not fit {vtype.name}: {err}") from None
