"""Numba CPU kernels for the two memory-bound halves of a W8A8 linear: per-token activation quantization and the
int32 -> float rescale. Each is a single pass over its matrix (the row is re-read from cache for the second half
of the quantization), parallel over rows.

The arithmetic is the same as the torch path in `linear.py`, operation for operation, in float32 and without
fast-math (no reassociation, no fused multiply-add), so both produce bit-identical results:

    quantize:  v = (x * inv_smooth[k]) * (1 / scale[m]),  scale[m] = max_k |x * inv_smooth[k]| / 127
               q = clamp(rint(v), -127, 127) + offset          (offset 0 for int8, 128 for the uint8 variant)
    rescale:   y = ((float(acc - comp[n]) * x_scale[m]) * w_scale[n]) + bias[n]

bfloat16 tensors are handed over as their uint16 bit patterns (numpy has no bfloat16): a bfloat16 is the high half
of a float32, and float32 -> bfloat16 rounds to nearest even like `torch.Tensor.to(torch.bfloat16)`.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_JIT = {"cache": True, "nogil": True, "parallel": True, "error_model": "numpy"}
_F127 = np.float32(127.0)
_ONE = np.float32(1.0)


@intrinsic
def _bits_to_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if bits.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif bits.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _f32_to_bits(typingctx, value):
    """The IEEE-754 bit pattern of a float32 as a uint32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(value), codegen


@numba.njit(inline="always", cache=True)
def _bf16_at(x, m, k):
    return _bits_to_f32(np.uint32(x[m, k]) << np.uint32(16))


@numba.njit(inline="always", cache=True)
def _f32_at(x, m, k):
    return x[m, k]


@numba.njit(inline="always", cache=True)
def _to_bf16_bits(v):
    b = _f32_to_bits(v)
    b = b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
    return np.uint16(b >> np.uint32(16))


@numba.njit(inline="always", cache=True, fastmath={"nnan", "ninf", "nsz", "reassoc"})
def _row_absmax(x, load, m, col_scale):
    # max is exact in any order: these flags only let LLVM vectorize the reduction
    amax = np.float32(0.0)
    for k in range(x.shape[1]):
        amax = max(amax, abs(load(x, m, k) * col_scale[k]))
    return amax


@numba.njit(inline="always", cache=True)
def _quantize_row(x, load, m, col_scale, q, scale, offset):
    s = _row_absmax(x, load, m, col_scale) / _F127
    if s == np.float32(0.0):
        s = _ONE
    scale[m] = s
    inv = _ONE / s
    for k in range(x.shape[1]):
        r = np.rint(load(x, m, k) * col_scale[k] * inv)
        r = min(max(r, -_F127), _F127)
        q[m, k] = np.int32(r) + offset


@numba.njit(**_JIT)
def quantize_rows_bf16(x, inv_smooth, q, scale, offset):
    for m in numba.prange(x.shape[0]):
        _quantize_row(x, _bf16_at, m, inv_smooth, q, scale, offset)


@numba.njit(**_JIT)
def quantize_rows_f32(x, inv_smooth, q, scale, offset):
    for m in numba.prange(x.shape[0]):
        _quantize_row(x, _f32_at, m, inv_smooth, q, scale, offset)


@numba.njit(**_JIT)
def rescale_to_bf16(acc, comp, x_scale, w_scale, bias, out):
    rows, cols = acc.shape
    for m in numba.prange(rows):
        a = x_scale[m]
        for n in range(cols):
            v = np.float32(acc[m, n] - comp[n]) * a * w_scale[n] + bias[n]
            out[m, n] = _to_bf16_bits(v)


@numba.njit(**_JIT)
def rescale_to_f32(acc, comp, x_scale, w_scale, bias, out):
    rows, cols = acc.shape
    for m in numba.prange(rows):
        a = x_scale[m]
        for n in range(cols):
            out[m, n] = np.float32(acc[m, n] - comp[n]) * a * w_scale[n] + bias[n]
