"""Numba CPU kernels for the LoRA branch on bf16 activations: h = x Aᵀ, then y += h Bᵀ in place.

Without native bf16 matrix units (AVX2; AVX-512 without BF16), torch's bf16 `mm` / `addmm_` at a rank of 16 runs
far below the machine's float32 speed, and a float32 detour through torch costs conversion passes over x and y.
These kernels read every bf16 tensor as its uint16 bit pattern (a bf16 is the high half of a float32) and convert
in registers, one token after another:

    down:  h[t, r] = Σ_k x[t, k] · A[r, k]          x read once, h [T, R] kept in float32 (never rounded to bf16)
    up:    out[t, n] = bf16(y[t, n] + Σ_r h[t, r] · Bᵀ[r, n])  y read and out written once (in place when out is y),
                                                             rounded once to nearest even

The down-projection's sum is vectorized (`reassoc`), so its order is fixed by the machine's vector width, not
left to right: deterministic on a machine, and float32 throughout.

The kernels are serial on purpose. `parallel=True` put numba's OpenMP pool beside torch's, whose threads keep
spinning after each torch op: on a 2-core AMD EPYC (AVX2, no VNNI) every parallel call then paid 16-24 ms of
barrier waits, whatever its size (0.5 ms serial at the tiny model's 320 x 256 -> 256), and gained nothing at
1024 x 4608 -> 4608 between torch GEMMs (36 ms parallel, 37 ms serial, against 270-330 ms for torch's bf16
`mm` + `addmm_` there).
"""

from __future__ import annotations

import numba
import numpy as np

from ditq.formats._int8_numba import _bits_to_f32, _to_bf16_bits

_SHIFT = np.uint32(16)
_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


@numba.njit(inline="always", cache=True)
def _f32(bits):
    return _bits_to_f32(np.uint32(bits) << _SHIFT)


@numba.njit(**_JIT, fastmath={"reassoc"})
def down_bf16(x, a, h):
    """x [T, K], a [R, K] (uint16 bf16 bits), h [T, R] float32 out: h = x aᵀ."""
    t_all, k_all = x.shape
    rank = a.shape[0]
    xf = np.empty(k_all, np.float32)
    for t in range(t_all):
        xr = x[t]
        for k in range(k_all):
            xf[k] = _f32(xr[k])
        for r in range(rank):
            ar = a[r]
            s = np.float32(0.0)
            for k in range(k_all):
                s += xf[k] * _f32(ar[k])
            h[t, r] = s


@numba.njit(**_JIT)
def up_bf16(h, bt, y, out):
    """h [T, R] float32, bt [R, N] (uint16 bf16 bits, Bᵀ), y [T, N] and out [T, N] (uint16 bf16 bits; `out` may be
    `y`, and `y` may be strided, e.g. a slice of a fused output): out = y + h bt."""
    t_all, n_all = y.shape
    rank = h.shape[1]
    acc = np.empty(n_all, np.float32)
    for t in range(t_all):
        yr = y[t]
        for i in range(n_all):
            acc[i] = _f32(yr[i])
        for r in range(rank):
            hr = h[t, r]
            br = bt[r]
            for i in range(n_all):
                acc[i] += hr * _f32(br[i])
        orow = out[t]
        for i in range(n_all):
            orow[i] = _to_bf16_bits(acc[i])
