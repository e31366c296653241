"""Q6_K: super-blocks of 256 values in 16 sub-blocks of 16, each `d * scale_j * (q - 32)` with q 6 bits and an
int8 scale_j.

Block layout (210 bytes):

    byte 0                  128              192           208   210
         | ql: 128 B (low 4)  | qh: 64 B (2 hi) | scales: 16 x int8 | d |
    value 128*h + 32*k + l (h 0..1, k 0..3, l 0..31):
        low 4 bits  in ql[64*h + 32*(k % 2) + l], nibble k // 2
        high 2 bits in qh[32*h + l], bits 2k..2k+1

Sub-block grids are fitted symmetric with weights x**2, or with the imatrix as weights when one is given
(quantize_row_q6_K_ref / quantize_row_q6_K_impl); the block scale maps the largest sub-scale to -128.
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType

from ditq.gguf._jit import GROUP_MAX_EPS, JIT, f32, load_f16, nearest_int, parallel_for, store_f16
from ditq.gguf._search import fit_symmetric
from ditq.gguf._tiles import TB, level16, load_tile
from ditq.gguf.codec import DEFAULT_RULE, BlockCodec, check_finite

_S = 16
_NSUB = 16
_T = _NSUB * TB


@numba.njit(**JIT)
def _encode_tile(x, qw, base, out):
    """Encode super-blocks base .. base+TB-1 of x (those that exist) into out."""
    xt = np.empty((_S, _T), np.float32)
    w = np.empty((_S, _T), np.float32)
    L = np.empty((_S, _T), np.int32)
    wx = np.empty((_S, _T), np.float32)
    scale = np.empty(_T, np.float32)
    n = load_tile(x, base, xt)
    if qw.shape[0] > 0:
        k = qw.shape[0]
        for s in range(TB):
            q = qw[(base + s) % k]
            for j in range(_NSUB):
                for i in range(_S):
                    w[i, j * TB + s] = q[j * _S + i]
    else:
        for i in range(_S):
            for t in range(_T):
                w[i, t] = xt[i, t] * xt[i, t]
    fit_symmetric(xt, w, 32, L, wx, scale)

    dl = np.zeros(_T, np.float32)
    live = np.zeros(TB, np.bool_)
    for s in range(n):
        o = out[base + s]
        max_scale = f32(0.0)
        max_abs = f32(0.0)
        for j in range(_NSUB):
            a = abs(scale[j * TB + s])
            if a > max_abs:
                max_abs = a
                max_scale = scale[j * TB + s]
        if max_abs < GROUP_MAX_EPS:
            for k in range(210):
                o[k] = 0
            continue
        live[s] = True
        iscale = f32(-128.0) / max_scale
        d = store_f16(out, base + s, 208, f32(1.0) / iscale)
        for j in range(_NSUB):
            sc = np.int8(min(127, nearest_int(iscale * scale[j * TB + s])))
            o[192 + j] = np.uint8(sc)
            dl[j * TB + s] = d * f32(sc)

    for i in range(_S):
        xi = xt[i]
        Li = L[i]
        for t in range(_T):
            if dl[t] != f32(0.0):
                Li[t] = min(max(nearest_int(xi[t] / dl[t]), np.int32(-32)), np.int32(31)) + np.int32(32)

    for s in range(n):
        if not live[s]:
            continue
        o = out[base + s]
        for h in range(2):
            for i in range(32):
                e = 128 * h + i
                q1 = level16(L, s, e)
                q2 = level16(L, s, e + 32)
                q3 = level16(L, s, e + 64)
                q4 = level16(L, s, e + 96)
                o[64 * h + i] = np.uint8((q1 & 0xF) | ((q3 & 0xF) << 4))
                o[64 * h + 32 + i] = np.uint8((q2 & 0xF) | ((q4 & 0xF) << 4))
                o[128 + 32 * h + i] = np.uint8(
                    (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
                )


@numba.njit(**JIT)
def _encode(lo, hi, x, qw, out):
    for tile in range(lo, hi):
        _encode_tile(x, qw, tile * TB, out)


@numba.njit(**JIT)
def _decode(lo, hi, blocks, out):
    for b in range(lo, hi):
        blk = blocks[b]
        y = out[b]
        d = load_f16(blocks, b, 208)
        for h in range(2):
            for k in range(4):
                for i in range(32):
                    e = 128 * h + 32 * k + i
                    low = (np.int32(blk[64 * h + 32 * (k % 2) + i]) >> (4 * (k // 2))) & 0xF
                    high = (np.int32(blk[128 + 32 * h + i]) >> (2 * k)) & 3
                    q = (low | (high << 4)) - 32
                    y[e] = d * f32(np.int8(blk[192 + e // 16])) * f32(q)


class Q6_K(BlockCodec, qtype=GGMLQuantizationType.Q6_K):
    uses_imatrix = True

    @classmethod
    def quantize_blocks(
        cls, blocks: np.ndarray, weights: np.ndarray | None = None, rule: str = DEFAULT_RULE
    ) -> np.ndarray:
        check_finite(blocks)
        out = np.empty((blocks.shape[0], cls.type_size), np.uint8)
        qw = np.zeros((0, 256), np.float32) if weights is None else weights
        parallel_for(_encode, (blocks.shape[0] + TB - 1) // TB, blocks, qw, out)
        return out

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        out = np.empty((blocks.shape[0], cls.block_size), np.float32)
        parallel_for(_decode, blocks.shape[0], blocks, out)
        return out
