"""Q3_K: super-blocks of 256 values in 16 sub-blocks of 16, each `d * (scale_j - 32) * (q - 4)` with q 3 bits
and scale_j 6 bits.

Block layout (110 bytes):

    byte 0              32                 96                108   110
         | hmask: 32 B    | qs: 64 B (low 2) | scales: 12 B     | d |
    value 128*h + 32*k + l (h 0..1, k 0..3, l 0..31):
        low 2 bits in qs[32*h + l], bits 2k..2k+1;  bit 2 in hmask[l], bit 4*h + k
    scales: 16 x 6 bits; scale j's low nibble in byte j % 8 (high nibble when j >= 8), its top 2 bits in byte
        8 + j % 4 at bits 2*(j // 4)

Without an importance matrix each sub-block is fitted symmetric and refined element by element with weights
x**2 (quantize_row_q3_K_ref); with one, with weights imatrix * sqrt(sigma2 + x**2) and the block scale fitted
too (quantize_row_q3_K_impl).
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType

from ditq.gguf._jit import JIT, f32, load_f16, nearest_int, parallel_for, store_f16
from ditq.gguf._search import fit_symmetric, fit_symmetric_refined
from ditq.gguf._tiles import (
    TB,
    importance_weights,
    lane_sums,
    level16,
    load_tile,
    pack_2bit,
    superblock_sigma2,
)
from ditq.gguf.codec import BlockCodec, check_finite

_S = 16
_NSUB = 16
_T = _NSUB * TB
_SCALES = 96


@numba.njit(inline="always", **JIT)
def _put_scale(o, j, lv):
    """Store 6-bit level lv (0..63) of sub-block j into the 12 scale bytes (zeroed first, j in order)."""
    if j < 8:
        o[_SCALES + j] = np.uint8(lv & 0xF)
    else:
        o[_SCALES + j - 8] |= np.uint8((lv & 0xF) << 4)
    o[_SCALES + 8 + j % 4] |= np.uint8(((lv >> 4) << (2 * (j // 4))) & 0xFF)


@numba.njit(inline="always", **JIT)
def _get_scale(o, j):
    """Sub-block j's signed scale, -32..31."""
    lo = (np.int32(o[_SCALES + j]) & 0xF) if j < 8 else (np.int32(o[_SCALES + j - 8]) >> 4)
    hi = (np.int32(o[_SCALES + 8 + j % 4]) >> (2 * (j // 4))) & 3
    return (lo | (hi << 4)) - 32


@numba.njit(**JIT)
def _encode_tile(x, qw, base, out):
    """Encode super-blocks base .. base+TB-1 of x (those that exist) into out."""
    xt = np.empty((_S, _T), np.float32)
    L = np.empty((_S, _T), np.int32)
    scale = np.empty(_T, np.float32)
    n = load_tile(x, base, xt)
    for s in range(n):
        o = out[base + s]
        for k in range(12):
            o[_SCALES + k] = 0

    if qw.shape[0] > 0:
        w = np.empty((_S, _T), np.float32)
        wx = np.empty((_S, _T), np.float32)
        importance_weights(xt, qw, base, superblock_sigma2(xt, 2), w)
        fit_symmetric(xt, w, 4, L, wx, scale)
        sw = lane_sums(w).reshape(_NSUB, TB)
        Ls = np.empty((_NSUB, TB), np.int32)
        swx = np.empty((_NSUB, TB), np.float32)
        d_block = np.empty(TB, np.float32)
        fit_symmetric(scale.reshape(_NSUB, TB), sw, 32, Ls, swx, d_block)
        for s in range(n):
            o = out[base + s]
            for j in range(_NSUB):
                _put_scale(o, j, Ls[j, s])
            store_f16(out, base + s, 108, d_block[s])
    else:
        fit_symmetric_refined(xt, 4, L, scale)
        for s in range(n):
            o = out[base + s]
            max_scale = f32(0.0)
            amax = f32(0.0)
            for j in range(_NSUB):
                a = abs(scale[j * TB + s])
                if a > amax:
                    amax = a
                    max_scale = scale[j * TB + s]
            if max_scale != f32(0.0):
                iscale = f32(-32.0) / max_scale
                for j in range(_NSUB):
                    lv = np.int32(np.int8(nearest_int(iscale * scale[j * TB + s])))
                    _put_scale(o, j, min(max(lv, np.int32(-32)), np.int32(31)) + 32)
                store_f16(out, base + s, 108, f32(1.0) / iscale)
            else:
                store_f16(out, base + s, 108, f32(0.0))

    dl = np.zeros(_T, np.float32)
    for s in range(n):
        o = out[base + s]
        d = load_f16(out, base + s, 108)
        for j in range(_NSUB):
            dl[j * TB + s] = d * f32(_get_scale(o, j))
    for i in range(_S):
        xi = xt[i]
        Li = L[i]
        for t in range(_T):
            if dl[t] != f32(0.0):
                Li[t] = min(max(nearest_int(xi[t] / dl[t]), np.int32(-4)), np.int32(3)) + np.int32(4)

    for s in range(n):
        o = out[base + s]
        for i in range(32):
            o[i] = 0
        for e in range(256):
            if level16(L, s, e) > 3:
                o[e % 32] |= np.uint8(1 << (e // 32))
        pack_2bit(L, s, o, 32)  # the low 2 bits: levels above 3 lose their bit 2 here


@numba.njit(**JIT)
def _encode(lo, hi, x, qw, out):
    for tile in range(lo, hi):
        _encode_tile(x, qw, tile * TB, out)


@numba.njit(**JIT)
def _decode(lo, hi, blocks, out):
    for b in range(lo, hi):
        blk = blocks[b]
        y = out[b]
        d = load_f16(blocks, b, 108)
        for j in range(_NSUB):
            dl = d * f32(_get_scale(blk, j))
            for i in range(16):
                e = 16 * j + i
                h, r = e // 128, e % 128
                low = (np.int32(blk[32 + 32 * h + r % 32]) >> (2 * (r // 32))) & 3
                high = (np.int32(blk[e % 32]) >> (e // 32)) & 1
                y[e] = dl * f32(low - (0 if high else 4))


class Q3_K(BlockCodec, qtype=GGMLQuantizationType.Q3_K):
    uses_imatrix = True

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
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
