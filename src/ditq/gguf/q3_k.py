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
x**2 (quantize_row_q3_K_ref, see `_refine`); with one, with weights imatrix * sqrt(sigma2 + x**2) and the block
scale fitted too (quantize_row_q3_K_impl).
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType

from ditq.gguf._jit import GROUP_MAX_EPS, JIT, f32, load_f16, nearest_int, parallel_for, store_f16
from ditq.gguf._refine import fit_symmetric_refined
from ditq.gguf._search import fit_symmetric
from ditq.gguf._tiles import TB, importance_weights, lane_sums, load_tile, superblock_sigma2
from ditq.gguf.codec import DEFAULT_RULE, BlockCodec, check_finite

_S = 16
_NSUB = 16
_T = _NSUB * TB
_SCALES = 96
_PACKED = 96  # hmask (32) + qs (64) bytes per super-block


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
def _round_scales(scale, n, base, out):
    """No importance matrix: each super-block's 16 sub-block scales on a 6-bit grid around the largest, d = its
    step (quantize_row_q3_K_ref)."""
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


@numba.njit(**JIT)
def _fit_imatrix(xf, qw, base, n, Lf, w, wx, scale, out):
    """With an importance matrix: sub-block grids and the block scale fitted with weights imatrix * sqrt(sigma2 +
    x**2) (quantize_row_q3_K_impl). Leaves the levels offset by 4 in Lf."""
    xt = xf[: _S * _T].reshape(_S, _T)
    L = Lf[: _S * _T].reshape(_S, _T)
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


@numba.njit(**JIT)
def _requantize(xf, Lf, dl, amax, plain):
    """Level of every value on its rounded sub-block scale dl (levels 0..7); where dl is 0 the fit's level stays
    (plain: the refined fit's l + 4, or 0 for an all-zero sub-block)."""
    for i in range(_S):
        x = xf[i * _T :]
        L = Lf[i * _T :]
        for t in range(_T):
            d = dl[t]
            if plain:
                fit = np.int32(0) if amax[t] < GROUP_MAX_EPS else L[t] + np.int32(4)
            else:
                fit = L[t]
            q = min(max(nearest_int(x[t] / d), np.int32(-4)), np.int32(3)) + np.int32(4)
            L[t] = q if d != f32(0.0) else fit


@numba.njit(**JIT)
def _pack(Lf, n, base, out, packed):
    """Bit-pack the levels of the tile's super-blocks, lane-wise into packed (96 rows, TB), then into out. Value
    e of a super-block is element e % 16 of its sub-block e // 16, i.e. tile row e % 16, lane (e // 16) * TB + s.

        hmask byte m, bit k (k 0..7):     bit 2 of value 32k + m
        qs byte 32h + b, bits 2k..2k+1:   low 2 bits of value 128h + 32k + b
    """
    for p in range(2):  # hmask bytes 16p + i: sub-blocks 2k + p
        for i in range(16):
            for s in range(TB):
                acc = np.int32(0)
                for k in range(8):
                    acc |= np.int32(Lf[i * _T + (2 * k + p) * TB + s] > 3) << k
                packed[(16 * p + i) * TB + s] = np.uint8(acc)
    for h in range(2):  # qs bytes 32h + 16p + i: sub-blocks 8h + 2k + p
        for p in range(2):
            for i in range(16):
                for s in range(TB):
                    acc = np.int32(0)
                    for k in range(4):
                        acc |= (Lf[i * _T + (8 * h + 2 * k + p) * TB + s] & 3) << (2 * k)
                    packed[(32 + 32 * h + 16 * p + i) * TB + s] = np.uint8(acc)
    for s in range(n):
        o = out[base + s]
        for r in range(_PACKED):
            o[r] = packed[r * TB + s]


@numba.njit(**JIT)
def _encode(lo, hi, x, qw, out):
    """Tiles [lo, hi) of x float32 (n, 256); qw float32 (k, 256) importance, or (0, 256) for none."""
    xf = np.empty(3 * _S * _T, np.float32)
    Lf = np.empty((_S + 1) * _T, np.int32)
    st = np.empty(2 * _T, np.float32)
    amax = np.zeros(_T, np.float32)
    scale = np.empty(_T, np.float32)
    dl = np.empty(_T, np.float32)
    packed = np.empty(_PACKED * TB, np.uint8)
    w = np.empty((_S, _T), np.float32)
    wx = np.empty((_S, _T), np.float32)
    plain = qw.shape[0] == 0
    for tile in range(lo, hi):
        base = tile * TB
        n = load_tile(x, base, xf[: _S * _T].reshape(_S, _T))
        for s in range(n):
            for k in range(12):
                out[base + s, _SCALES + k] = 0
        if plain:
            fit_symmetric_refined(xf, 4, Lf, st, amax, scale)
            _round_scales(scale, n, base, out)
        else:
            _fit_imatrix(xf, qw, base, n, Lf, w, wx, scale, out)
        for s in range(TB):
            d = load_f16(out, base + s, 108) if s < n else f32(0.0)
            for j in range(_NSUB):
                dl[j * TB + s] = d * f32(_get_scale(out[base + s], j)) if s < n else f32(0.0)
        _requantize(xf, Lf, dl, amax, plain)
        _pack(Lf, n, base, out, packed)


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
