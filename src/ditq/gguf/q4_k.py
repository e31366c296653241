"""Q4_K and Q5_K: super-blocks of 256 values in 8 sub-blocks of 32, each sub-block an affine grid
`d * scale_j * q - dmin * min_j` with 6-bit scale_j and min_j.

Q4_K block (144 bytes):

    byte 0    2      4                16                                        144
         | d | dmin | scales (12 B)  | qs: 128 B, two 4-bit values a byte      |
    qs[32*b + l]: low nibble = q of value 64*b + l, high nibble = q of value 64*b + 32 + l

Q5_K block (176 bytes):

    byte 0    2      4                16              48                        176
         | d | dmin | scales (12 B)  | qh: 32 B       | qs: 128 B (low 4 bits) |
    bit 2*b of qh[l] is bit 4 of value 64*b + l; bit 2*b + 1 is bit 4 of value 64*b + 32 + l

scales: 8 (6-bit scale, 6-bit min) pairs packed as in `_tiles.put_scale_min_k4`.

Without an importance matrix the sub-block grids are fitted with weights `rms(sub-block) + |x|` and the block
scales are rounded from the largest (quantize_row_q4_K_ref / q5_K_ref); with one, the weights are
`imatrix * sqrt(sigma2 + x**2)` and the block scales are fitted too (quantize_row_q4_K_impl / q5_K_impl).
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType

from ditq.gguf._jit import JIT, f32, load_f16, nearest_int, parallel_for, store_f16
from ditq.gguf._search import fit_affine, fit_positive
from ditq.gguf._tiles import (
    TB,
    get_scale_min_k4,
    importance_weights,
    lane_sums,
    lane_sums_sq,
    load_tile,
    put_scale_min_k4,
    superblock_sigma2,
)
from ditq.gguf.codec import DEFAULT_RULE, BlockCodec, check_finite, clamps_first

_S = 32  # values per sub-block
_NSUB = 8
_T = _NSUB * TB
_SCALES = 4  # byte offset of the packed scales


@numba.njit(**JIT)
def _encode_tile(x, qw, base, q5, clamp_first, out):
    """Encode super-blocks base .. base+TB-1 of x (those that exist) into out."""
    nmax = np.int32(31) if q5 else np.int32(15)
    xt = np.empty((_S, _T), np.float32)
    w = np.empty((_S, _T), np.float32)
    L = np.empty((_S, _T), np.int32)
    Laux = np.empty((_S, _T), np.float32)
    scale = np.empty(_T, np.float32)
    neg_min = np.empty(_T, np.float32)
    n = load_tile(x, base, xt)
    imatrix = qw.shape[0] > 0

    if imatrix:
        sigma2 = superblock_sigma2(xt, 2)
        importance_weights(xt, qw, base, sigma2, w)
        rmin, rdelta, nstep = f32(-0.9), f32(0.05), 36
    else:
        sum_x2 = lane_sums_sq(xt)
        for t in range(_T):
            av = f32(np.sqrt(sum_x2[t] / f32(32.0)))
            for i in range(_S):
                w[i, t] = av + abs(xt[i, t])
        if q5:
            rmin, rdelta, nstep = f32(-0.5), f32(0.1), 15
        else:
            rmin, rdelta, nstep = f32(-1.0), f32(0.1), 20
    fit_affine(xt, w, nmax, rmin, rdelta, nstep, False, imatrix and clamp_first, L, Laux, scale, neg_min)

    # block scales: d, dmin and the 8 packed (scale, min) pairs of each super-block
    d = np.empty(TB, np.float32)
    dmin = np.empty(TB, np.float32)
    if imatrix:
        sw = lane_sums(w).reshape(_NSUB, TB)
        Ls = np.empty((_NSUB, TB), np.uint8)
        Lm = np.empty((_NSUB, TB), np.uint8)
        d_block = fit_positive(scale.reshape(_NSUB, TB), sw, 63, Ls)
        m_block = fit_positive(neg_min.reshape(_NSUB, TB), sw, 63, Lm)
        for s in range(n):
            o = out[base + s]
            for k in range(12):
                o[_SCALES + k] = 0
            for j in range(_NSUB):
                ls = np.int32(Ls[j, s])
                lm = np.int32(Lm[j, s])
                if q5:
                    ls = min(63, ls)
                    lm = min(63, lm)
                put_scale_min_k4(o, _SCALES, j, ls, lm)
            d[s] = store_f16(out, base + s, 0, d_block[s])
            dmin[s] = store_f16(out, base + s, 2, m_block[s])
    else:
        for s in range(n):
            o = out[base + s]
            max_scale = f32(0.0)
            max_min = f32(0.0)
            for j in range(_NSUB):
                if scale[j * TB + s] > max_scale:
                    max_scale = scale[j * TB + s]
                if neg_min[j * TB + s] > max_min:
                    max_min = neg_min[j * TB + s]
            inv_scale = f32(63.0) / max_scale if max_scale > f32(0.0) else f32(0.0)
            inv_min = f32(63.0) / max_min if max_min > f32(0.0) else f32(0.0)
            for k in range(12):
                o[_SCALES + k] = 0
            for j in range(_NSUB):
                ls = min(63, nearest_int(inv_scale * scale[j * TB + s]) & 0xFF)
                lm = min(63, nearest_int(inv_min * neg_min[j * TB + s]) & 0xFF)
                put_scale_min_k4(o, _SCALES, j, ls, lm)
            d[s] = store_f16(out, base + s, 0, max_scale / f32(63.0))
            dmin[s] = store_f16(out, base + s, 2, max_min / f32(63.0))

    # requantize every value on the rounded grid
    dl = np.zeros(_T, np.float32)
    ml = np.zeros(_T, np.float32)
    for s in range(n):
        o = out[base + s]
        for j in range(_NSUB):
            sc, m = get_scale_min_k4(o, _SCALES, j)
            dl[j * TB + s] = d[s] * f32(sc)
            ml[j * TB + s] = dmin[s] * f32(m)
    for i in range(_S):
        xi = xt[i]
        Li = L[i]
        for t in range(_T):
            if dl[t] != f32(0.0):
                Li[t] = min(max(nearest_int((xi[t] + ml[t]) / dl[t]), np.int32(0)), nmax)

    for s in range(n):
        o = out[base + s]
        for b in range(4):
            lo = (2 * b) * TB + s
            hi = (2 * b + 1) * TB + s
            if q5:
                for i in range(32):
                    q_lo = L[i, lo]
                    q_hi = L[i, hi]
                    if b == 0:
                        o[16 + i] = 0
                    o[16 + i] |= np.uint8(((q_lo >> 4) << (2 * b)) | ((q_hi >> 4) << (2 * b + 1)))
                    o[48 + 32 * b + i] = np.uint8((q_lo & 0xF) | ((q_hi & 0xF) << 4))
            else:
                for i in range(32):
                    o[16 + 32 * b + i] = np.uint8(L[i, lo] | (L[i, hi] << 4))


@numba.njit(**JIT)
def _encode(lo, hi, x, qw, q5, clamp_first, out):
    """Tiles [lo, hi) of x float32 (n, 256); qw float32 (k, 256), or (0, 256) for none -> out uint8 (n, 144|176).
    clamp_first: the make_qkx3_quants rule of the imatrix path (see `_search.fit_affine`)."""
    for tile in range(lo, hi):
        _encode_tile(x, qw, tile * TB, q5, clamp_first, out)


@numba.njit(**JIT)
def _decode(lo, hi, blocks, q5, out):
    for b in range(lo, hi):
        blk = blocks[b]
        y = out[b]
        d = load_f16(blocks, b, 0)
        dmin = load_f16(blocks, b, 2)
        for j in range(_NSUB):
            sc, m = get_scale_min_k4(blk, _SCALES, j)
            d1 = d * f32(sc)
            m1 = dmin * f32(m)
            half = j // 2
            shift = 4 * (j % 2)
            for i in range(32):
                if q5:
                    q = (np.int32(blk[48 + 32 * half + i]) >> shift) & 0xF
                    q += 16 * ((np.int32(blk[16 + i]) >> j) & 1)
                else:
                    q = (np.int32(blk[16 + 32 * half + i]) >> shift) & 0xF
                y[32 * j + i] = d1 * f32(q) - m1


def _weights_or_none(weights: np.ndarray | None) -> np.ndarray:
    return np.zeros((0, 256), np.float32) if weights is None else weights


class Q4_K(BlockCodec, qtype=GGMLQuantizationType.Q4_K):
    uses_imatrix = True
    _q5 = False

    @classmethod
    def quantize_blocks(
        cls, blocks: np.ndarray, weights: np.ndarray | None = None, rule: str = DEFAULT_RULE
    ) -> np.ndarray:
        check_finite(blocks)
        out = np.empty((blocks.shape[0], cls.type_size), np.uint8)
        n_tiles = (blocks.shape[0] + TB - 1) // TB
        parallel_for(_encode, n_tiles, blocks, _weights_or_none(weights), cls._q5, clamps_first(rule), out)
        return out

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        out = np.empty((blocks.shape[0], cls.block_size), np.float32)
        parallel_for(_decode, blocks.shape[0], blocks, cls._q5, out)
        return out


class Q5_K(Q4_K, qtype=GGMLQuantizationType.Q5_K):
    _q5 = True
