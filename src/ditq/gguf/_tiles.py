"""Tiles for the k-quant encoders: a few super-blocks of 256 values, transposed so that every sub-block
(16 or 32 values) is one lane.

Lane `j * TB + s` holds sub-block j of super-block s of the tile, so one row of a tile array covers element i
of every sub-block, and the TB super-blocks of one sub-block index are next to each other (which lets per
super-block sums run lane-wise too). `(n_sub, TB)` reshapes of a per-lane vector give [sub-block, super-block].
"""

from __future__ import annotations

import numba
import numpy as np

from ditq.gguf._jit import JIT, f32

QK_K = 256
TB = 16  # super-blocks per tile


@numba.njit(**JIT)
def load_tile(x, base, xt):
    """x float32 (n_superblocks, 256) -> xt (S, n_sub * TB), xt[i, j*TB + s] = x[base + s, j*S + i]; super-blocks
    past the end of x are zeros. Returns how many super-blocks of the tile are real."""
    S, T = xt.shape
    n_sub = QK_K // S
    n = min(TB, x.shape[0] - base)
    for s in range(TB):
        if s < n:
            row = x[base + s]
            for j in range(n_sub):
                for i in range(S):
                    xt[i, j * TB + s] = row[j * S + i]
        else:
            for j in range(n_sub):
                for i in range(S):
                    xt[i, j * TB + s] = f32(0.0)
    return n


@numba.njit(**JIT)
def superblock_sigma2(xt, factor):
    """Per super-block `factor * sum(x**2) / 256`, the sum taken in element order (ggml's sigma2). (TB,)"""
    S, T = xt.shape
    n_sub = QK_K // S
    acc = np.zeros(TB, np.float32)
    for j in range(n_sub):
        for i in range(S):
            row = xt[i]
            for s in range(TB):
                v = row[j * TB + s]
                acc[s] += v * v
    for s in range(TB):
        acc[s] = f32(factor) * acc[s] / f32(QK_K)
    return acc


@numba.njit(**JIT)
def importance_weights(xt, qw, base, sigma2, w):
    """w[i, lane] = imatrix * sqrt(sigma2 + x**2): ggml's per-element weight when an importance matrix is given.
    qw float32 (k, 256): super-block g uses qw[g % k] (one imatrix row broadcast over every row)."""
    S, T = xt.shape
    n_sub = QK_K // S
    k = qw.shape[0]
    for s in range(TB):
        q = qw[(base + s) % k]
        for j in range(n_sub):
            t = j * TB + s
            for i in range(S):
                v = xt[i, t]
                w[i, t] = q[j * S + i] * f32(np.sqrt(sigma2[s] + v * v))


@numba.njit(**JIT)
def lane_sums(w):
    """Per lane sum over the rows, in row order. (T,)"""
    S, T = w.shape
    out = np.zeros(T, np.float32)
    for i in range(S):
        row = w[i]
        for t in range(T):
            out[t] += row[t]
    return out


@numba.njit(**JIT)
def lane_sums_sq(x):
    """Per lane sum of squares over the rows, in row order. (T,)"""
    S, T = x.shape
    out = np.zeros(T, np.float32)
    for i in range(S):
        row = x[i]
        for t in range(T):
            out[t] += row[t] * row[t]
    return out


@numba.njit(**JIT)
def get_scale_min_k4(block, off, j):
    """Sub-block j's 6-bit scale and min from the 12 packed bytes at block[off:] (Q4_K / Q5_K layout)."""
    if j < 4:
        return np.int32(block[off + j] & 63), np.int32(block[off + j + 4] & 63)
    sc = (np.int32(block[off + j + 4]) & 0xF) | ((np.int32(block[off + j - 4]) >> 6) << 4)
    m = (np.int32(block[off + j + 4]) >> 4) | ((np.int32(block[off + j]) >> 6) << 4)
    return sc, m


@numba.njit(**JIT)
def put_scale_min_k4(block, off, j, ls, lm):
    """Pack sub-block j's 6-bit scale and min into block[off:off+12]; j must run 0..7 in order and the 12 bytes
    start zeroed.

        byte 0..3   scale[j] low 6 bits | scale[j+4] bits 4-5 in the top 2 bits
        byte 4..7   min[j]   low 6 bits | min[j+4]   bits 4-5 in the top 2 bits
        byte 8..11  scale[j+4] bits 0-3 | min[j+4] bits 0-3 << 4
    """
    if j < 4:
        block[off + j] = np.uint8(ls)
        block[off + j + 4] = np.uint8(lm)
    else:
        block[off + j + 4] = np.uint8((ls & 0xF) | ((lm & 0xF) << 4))
        block[off + j - 4] |= np.uint8(((ls >> 4) << 6) & 0xFF)
        block[off + j] |= np.uint8(((lm >> 4) << 6) & 0xFF)


@numba.njit(inline="always", **JIT)
def level16(L, s, e):
    """Level of element e (0..255) of super-block s in a tile of 16-value sub-blocks."""
    return L[e % 16, (e // 16) * TB + s]


@numba.njit(inline="always", **JIT)
def pack_2bit(L, s, o, off):
    """o[off:off+64] = the low 2 bits of the 256 levels of super-block s, four a byte: byte 32*h + l holds
    values 128*h + l + 32*k in bits 2k..2k+1 (the Q2_K / Q3_K qs layout)."""
    for h in range(2):
        for i in range(32):
            e = 128 * h + i
            o[off + 32 * h + i] = np.uint8(
                (level16(L, s, e) & 3)
                | ((level16(L, s, e + 32) & 3) << 2)
                | ((level16(L, s, e + 64) & 3) << 4)
                | ((level16(L, s, e + 96) & 3) << 6)
            )
