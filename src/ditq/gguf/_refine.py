"""make_q3_quants with do_rmse (Q3_K without an importance matrix), vectorized across sub-blocks.

A tile of Q3_K holds S = 16 values of T = 256 sub-blocks ("lanes", see `_tiles`). The C reference fits each
sub-block on the symmetric grid l in -nmax..nmax-1 with weights x**2, then makes up to five passes that move one
element at a time to the level that best improves the weighted fit, leaving the loop after a pass that changed
nothing. Here the passes run over chunks of CH lanes at once and a chunk leaves its loop after a pass that changed
none of its lanes: a lane whose pass changed nothing is left exactly as it was, so every further pass would change
nothing either and the result is C's, lane for lane.

The arrays are flat (row i of the tile at offset i * T) and each chunk gets views that start at its first lane:
with constant strides and indices LLVM can prove non-negative, the chunk loop vectorizes across its CH lanes (with
2-D views, a runtime chunk offset, or more than three arrays it falls back to scalar code, about 5x slower).
"""

from __future__ import annotations

import numba
import numpy as np

from ditq.gguf._jit import GROUP_MAX_EPS, JIT, f32, nearest_int

S = 16  # values per sub-block
T = 256  # sub-blocks (lanes) per tile
CH = 16  # lanes refined together; a chunk stops after a pass that changed none of them
_ZERO = f32(0.0)


@numba.njit(**JIT)
def _step(x, L, st, i, lo, hi):
    """Element i of every lane of a chunk: move it to the level that best improves the lane's fit, if any does.
    Views starting at the chunk's first lane: x[i*T + u] the values, x[S*T + ...] their squares w and
    x[2*S*T + ...] w*x; L[i*T + u] int32 levels, row S the per-lane "changed" flags; st[u] = sum w*x*l and
    st[T + u] = sum w*l*l, updated in place."""
    for u in range(CH):
        k = i * T + u
        v = x[k]
        w = x[S * T + k]
        wv = x[2 * S * T + k]
        lv = L[k]
        s_lx = st[u]
        s_l2 = st[T + u]
        fl = f32(lv)
        slx = s_lx - wv * fl
        sl2 = s_l2 - w * fl * fl
        q = min(max(nearest_int(v * sl2 / slx), lo), hi)
        fq = f32(q)
        slx2 = slx + wv * fq
        sl22 = sl2 + w * fq * fq
        ok = (slx > _ZERO) & (q != lv) & (sl22 > _ZERO) & (slx2 * slx2 * s_l2 > s_lx * s_lx * sl22)
        L[S * T + u] |= np.int32(ok)
        L[k] = q if ok else lv
        st[u] = slx2 if ok else s_lx
        st[T + u] = sl22 if ok else s_l2


@numba.njit(inline="always", **JIT)
def _changed(L):
    """Whether the last pass changed any lane of the chunk (and clear the flags for the next one)."""
    c = np.int32(0)
    for u in range(CH):
        c |= L[S * T + u]
        L[S * T + u] = 0
    return c != 0


@numba.njit(**JIT)
def _refine(x, L, st, lo, hi):
    """The refinement passes of every chunk of a tile. Two chunks are refined side by side, one element step of
    each in turn, so the CPU overlaps their dependency chains (each step waits on the lane's sums from the step
    before); a chunk that is done (5 passes, or a pass that changed nothing) hands its slot to the next one."""
    n_chunks = T // CH
    for c in range(n_chunks):
        for u in range(CH):
            L[S * T + c * CH + u] = 0
    a, b = 0, 1  # the chunks in the two slots (n_chunks when empty)
    pa = pb = 0  # passes done
    nxt = 2
    while a < n_chunks or b < n_chunks:
        ca = a * CH
        cb = b * CH
        if a < n_chunks and b < n_chunks:
            xa, La, sa = x[ca:], L[ca:], st[ca:]
            xb, Lb, sb = x[cb:], L[cb:], st[cb:]
            for i in range(S):
                _step(xa, La, sa, i, lo, hi)
                _step(xb, Lb, sb, i, lo, hi)
        elif a < n_chunks:
            xa, La, sa = x[ca:], L[ca:], st[ca:]
            for i in range(S):
                _step(xa, La, sa, i, lo, hi)
        else:
            xb, Lb, sb = x[cb:], L[cb:], st[cb:]
            for i in range(S):
                _step(xb, Lb, sb, i, lo, hi)
        if a < n_chunks:
            pa += 1
            if not _changed(L[ca:]) or pa == 5:
                a, pa, nxt = nxt, 0, min(nxt + 1, n_chunks)
        if b < n_chunks:
            pb += 1
            if not _changed(L[cb:]) or pb == 5:
                b, pb, nxt = nxt, 0, min(nxt + 1, n_chunks)


@numba.njit(**JIT)
def fit_symmetric_refined(x, nmax, L, st, amax, scale):
    """Fit every lane of a tile. x: float32 (3*S*T,), the tile's values row-major in the first S*T (the fit writes
    their squares and cubes after them). Writes L int32 ((S+1)*T,): the levels l in
    -nmax..nmax-1 (not yet offset by nmax; row S is scratch), scale (T,) and amax (T,) = max |x| of the lane. A
    lane with amax < GROUP_MAX_EPS is all zero: its scale is 0 and C stores level 0 for it, which the caller
    applies when it offsets the levels. st: float32 (2*T,) scratch."""
    nmax = np.int32(nmax)
    lo = np.int32(-nmax)
    hi = np.int32(nmax - 1)
    smax = np.empty(T, np.float32)
    iscale = np.empty(T, np.float32)
    for t in range(T):
        amax[t] = _ZERO
        smax[t] = _ZERO
        st[t] = _ZERO
        st[T + t] = _ZERO
    for i in range(S):
        for t in range(T):  # the largest |x| and the signed value that first reached it
            v = x[i * T + t]
            a = abs(v)
            first = a > amax[t]
            amax[t] = a if first else amax[t]
            smax[t] = v if first else smax[t]
    for t in range(T):
        iscale[t] = f32(-nmax) / smax[t]
    for i in range(S):
        for t in range(T):
            v = x[i * T + t]
            q = min(max(nearest_int(iscale[t] * v), lo), hi)
            L[i * T + t] = q
            w = v * v
            x[S * T + i * T + t] = w
            x[2 * S * T + i * T + t] = w * v
            fq = f32(q)
            st[t] += w * v * fq
            st[T + t] += w * fq * fq
    _refine(x, L, st, lo, hi)
    for t in range(T):
        s_lx = st[t]
        s_l2 = st[T + t]
        scale[t] = _ZERO if amax[t] < GROUP_MAX_EPS or not s_l2 > _ZERO else s_lx / s_l2
