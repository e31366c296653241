"""Q8_0: blocks of 32 values as int8 with one half-precision scale.

Block layout (34 bytes):

    byte 0    2                                   34
         | d | qs[0] qs[1] ...           qs[31] |
           f16  int8, value = d * qs[i]

d = max|x| / 127 and qs = roundf(x / d) (half away from zero), as quantize_row_q8_0_ref.
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType

from ditq.gguf._jit import JIT, bits_f32, chunks, f32, f32_bits, load_f16, round_away, store_f16
from ditq.gguf.codec import BlockCodec, NonFiniteInput

_127 = f32(127.0)


@numba.njit(parallel=True, **JIT)
def _encode(x, out, n_chunks):
    """x float32 (n, 32) -> out uint8 (n, 34). Returns the first block holding NaN/Inf, or -1."""
    n = x.shape[0]
    bad = np.full(n_chunks, -1, np.int64)
    for c in numba.prange(n_chunks):
        for b in range(n * c // n_chunks, n * (c + 1) // n_chunks):
            row = x[b]
            # max |x| through the bit patterns: same order as the floats, and vectorizes as an integer max
            m = np.int32(0)
            for j in range(32):
                m = max(m, f32_bits(row[j]) & 0x7FFFFFFF)
            if m >= 0x7F800000:
                if bad[c] < 0:
                    bad[c] = b
                continue
            d = bits_f32(m) / _127
            inv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
            store_f16(out, b, 0, d)
            dst = out[b]
            for j in range(32):
                dst[2 + j] = np.uint8(np.int32(round_away(row[j] * inv)) & 0xFF)
    for c in range(n_chunks):
        if bad[c] >= 0:
            return bad[c]
    return -1


@numba.njit(parallel=True, **JIT)
def _decode(blocks, out):
    n = blocks.shape[0]
    for b in numba.prange(n):
        d = load_f16(blocks, b, 0)
        src = blocks[b]
        dst = out[b]
        for j in range(32):
            dst[j] = f32(np.int8(src[2 + j])) * d


class Q8_0(BlockCodec, qtype=GGMLQuantizationType.Q8_0):
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        out = np.empty((blocks.shape[0], cls.type_size), np.uint8)
        bad = _encode(blocks, out, chunks(blocks.shape[0]))
        if bad >= 0:
            raise NonFiniteInput(bad)
        return out

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        out = np.empty((blocks.shape[0], cls.block_size), np.float32)
        _decode(blocks, out)
        return out
