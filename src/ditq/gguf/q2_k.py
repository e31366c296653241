"""Q2_K: super-blocks of 256 values in 16 sub-blocks of 16, each `d * scale_j * q - dmin * min_j` with q 2 bits
and 4-bit scale_j, min_j.

Block layout (84 bytes):

    byte 0                    16                 80    82      84
         | scales: 16 B         | qs: 64 B          | d   | dmin |
           scale_j | min_j << 4   value 128*h + 32*k + l in qs[32*h + l], bits 2k..2k+1

Without an importance matrix the sub-block grids are fitted on absolute error weighted by |x| and the block
scales are rounded from the largest (quantize_row_q2_K_ref); with one, on squared error weighted by
imatrix * sqrt(sigma2 + x**2), with the block scales fitted too (quantize_row_q2_K_impl).
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType

from ditq.gguf._jit import JIT, f32, load_f16, nearest_int, parallel_for, store_f16
from ditq.gguf._search import fit_affine, fit_positive
from ditq.gguf._tiles import TB, importance_weights, lane_sums, load_tile, pack_2bit, superblock_sigma2
from ditq.gguf.codec import DEFAULT_RULE, BlockCodec, check_finite, clamps_first

_S = 16
_NSUB = 16
_T = _NSUB * TB
_15 = f32(15.0)


@numba.njit(**JIT)
def _encode_tile(x, qw, base, clamp_first, out):
    """Encode super-blocks base .. base+TB-1 of x (those that exist) into out."""
    xt = np.empty((_S, _T), np.float32)
    w = np.empty((_S, _T), np.float32)
    L = np.empty((_S, _T), np.int32)
    Laux = np.empty((_S, _T), np.float32)
    scale = np.empty(_T, np.float32)
    neg_min = np.empty(_T, np.float32)
    n = load_tile(x, base, xt)
    imatrix = qw.shape[0] > 0
    if imatrix:
        importance_weights(xt, qw, base, superblock_sigma2(xt, 1), w)
        rmin, rdelta, nstep, use_mad = f32(-0.9), f32(0.05), 36, False
    else:
        for i in range(_S):
            for t in range(_T):
                w[i, t] = abs(xt[i, t])
        rmin, rdelta, nstep, use_mad = f32(-0.5), f32(0.1), 15, True
    fit_affine(xt, w, 3, rmin, rdelta, nstep, use_mad, imatrix and clamp_first, L, Laux, scale, neg_min)

    if imatrix:
        sw = lane_sums(w).reshape(_NSUB, TB)
        Ls = np.empty((_NSUB, TB), np.uint8)
        Lm = np.empty((_NSUB, TB), np.uint8)
        dm = fit_positive(scale.reshape(_NSUB, TB), sw, 15, Ls)
        mm = fit_positive(neg_min.reshape(_NSUB, TB), sw, 15, Lm)
        for s in range(n):
            o = out[base + s]
            store_f16(out, base + s, 80, dm[s])
            store_f16(out, base + s, 82, mm[s])
            for j in range(_NSUB):
                o[j] = np.uint8((np.int32(Ls[j, s]) | (np.int32(Lm[j, s]) << 4)) & 0xFF)
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
            if max_scale > f32(0.0):
                iscale = _15 / max_scale
                for j in range(_NSUB):
                    o[j] = np.uint8(nearest_int(iscale * scale[j * TB + s]) & 0xFF)
                store_f16(out, base + s, 80, max_scale / _15)
            else:
                for j in range(_NSUB):
                    o[j] = 0
                store_f16(out, base + s, 80, f32(0.0))
            if max_min > f32(0.0):
                iscale = _15 / max_min
                for j in range(_NSUB):
                    o[j] |= np.uint8((nearest_int(iscale * neg_min[j * TB + s]) << 4) & 0xFF)
                store_f16(out, base + s, 82, max_min / _15)
            else:
                store_f16(out, base + s, 82, f32(0.0))

    dl = np.zeros(_T, np.float32)
    ml = np.zeros(_T, np.float32)
    for s in range(n):
        o = out[base + s]
        d = load_f16(out, base + s, 80)
        dmin = load_f16(out, base + s, 82)
        for j in range(_NSUB):
            dl[j * TB + s] = d * f32(np.int32(o[j]) & 0xF)
            ml[j * TB + s] = dmin * f32(np.int32(o[j]) >> 4)
    for i in range(_S):
        xi = xt[i]
        Li = L[i]
        for t in range(_T):
            if dl[t] != f32(0.0):
                Li[t] = min(max(nearest_int((xi[t] + ml[t]) / dl[t]), np.int32(0)), np.int32(3))

    for s in range(n):
        pack_2bit(L, s, out[base + s], 16)


@numba.njit(**JIT)
def _encode(lo, hi, x, qw, clamp_first, out):
    for tile in range(lo, hi):
        _encode_tile(x, qw, tile * TB, clamp_first, out)


@numba.njit(**JIT)
def _decode(lo, hi, blocks, out):
    for b in range(lo, hi):
        blk = blocks[b]
        y = out[b]
        d = load_f16(blocks, b, 80)
        dmin = load_f16(blocks, b, 82)
        for j in range(_NSUB):
            dl = d * f32(np.int32(blk[j]) & 0xF)
            ml = dmin * f32(np.int32(blk[j]) >> 4)
            for i in range(16):
                e = 16 * j + i
                h, r = e // 128, e % 128
                q = (np.int32(blk[16 + 32 * h + r % 32]) >> (2 * (r // 32))) & 3
                y[e] = dl * f32(q) - ml


class Q2_K(BlockCodec, qtype=GGMLQuantizationType.Q2_K):
    uses_imatrix = True

    @classmethod
    def quantize_blocks(
        cls, blocks: np.ndarray, weights: np.ndarray | None = None, rule: str = DEFAULT_RULE
    ) -> np.ndarray:
        check_finite(blocks)
        out = np.empty((blocks.shape[0], cls.type_size), np.uint8)
        qw = np.zeros((0, 256), np.float32) if weights is None else weights
        parallel_for(_encode, (blocks.shape[0] + TB - 1) // TB, blocks, qw, clamps_first(rule), out)
        return out

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        out = np.empty((blocks.shape[0], cls.block_size), np.float32)
        parallel_for(_decode, blocks.shape[0], blocks, out)
        return out
