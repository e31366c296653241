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

from ditq.gguf._jit import JIT, bits_f32, f32, f32_bits, load_f16, parallel_for, round_away, store_f16
from ditq.gguf.codec import DEFAULT_RULE, BlockCodec, NonFiniteInput

_127 = f32(127.0)


@numba.njit(**JIT)
def _encode(lo, hi, x, out, bad):
    """Blocks [lo, hi) of x float32 (n, 32) -> out uint8 (n, 34); bad[0] = a block holding NaN/Inf."""
    for b in range(lo, hi):
        row = x[b]
        # max |x| through the bit patterns: same order as the floats, and vectorizes as an integer max
        m = np.int32(0)
        for j in range(32):
            m = max(m, f32_bits(row[j]) & 0x7FFFFFFF)
        if m >= 0x7F800000:
            bad[0] = b
            continue
        d = bits_f32(m) / _127
        inv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        store_f16(out, b, 0, d)
        dst = out[b]
        for j in range(32):
            dst[2 + j] = np.uint8(np.int32(round_away(row[j] * inv)) & 0xFF)


@numba.njit(**JIT)
def _decode(lo, hi, blocks, out):
    for b in range(lo, hi):
        d = load_f16(blocks, b, 0)
        src = blocks[b]
        dst = out[b]
        for j in range(32):
            dst[j] = f32(np.int8(src[2 + j])) * d


class Q8_0(BlockCodec, qtype=GGMLQuantizationType.Q8_0):
    @classmethod
    def quantize_blocks(
        cls, blocks: np.ndarray, weights: np.ndarray | None = None, rule: str = DEFAULT_RULE
    ) -> np.ndarray:
        out = np.empty((blocks.shape[0], cls.type_size), np.uint8)
        bad = np.full(1, -1, np.int64)
        parallel_for(_encode, blocks.shape[0], blocks, out, bad)
        if bad[0] >= 0:
            raise NonFiniteInput(int(bad[0]))
        return out

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        out = np.empty((blocks.shape[0], cls.block_size), np.float32)
        parallel_for(_decode, blocks.shape[0], blocks, out)
        return out
