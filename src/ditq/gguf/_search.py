"""ggml's per-group scale searches, written "lane-wise": a tile holds many groups side by side.

Every array here is laid out (group_len, lanes): row i holds element i of every group. Each lane runs exactly the
C reference's sequence of float32 operations for its own group (sums in index order, the same comparisons and
the same early-outs, turned into per-lane selects), while the inner loops run across lanes so LLVM can vectorize
them. By what they compute, the functions mirror ggml-quants.c's `make_qkx2_quants` / `make_qkx3_quants`
(affine grid: scale and min), `make_qx_quants` (symmetric grid, 18 nearby scales tried), `make_q3_quants`
(symmetric grid refined one element at a time) and `make_qp_quants` (positive grid for the block scales).

Where C leaves a refinement loop with `break` once a pass changes nothing, the loop here runs its full count: a
pass that changes nothing leaves the state as it found it, so every later pass changes nothing too.
"""

from __future__ import annotations

import numba
import numpy as np

from ditq.gguf._jit import GROUP_MAX_EPS, JIT, f32, nearest_int

_ZERO = f32(0.0)
_ONE = f32(1.0)
_TENTH = f32(0.1)


@numba.njit(**JIT)
def fit_affine(x, w, nmax, rmin, rdelta, nstep, use_mad, clamp_first, L, Laux, scale, neg_min):
    """Affine grid `scale * l + min`, l in 0..nmax, min <= 0 (make_qkx2_quants / make_qkx3_quants): for each of
    nstep + 1 trial scales, round onto the grid, solve weighted least squares for scale and min, and keep the
    trial with the lowest weighted squared (use_mad: absolute) error. An accepted trial's min is the origin of
    the next trial's grid, so a trial's `v = iscale * (x - min)` can be huge, inf or nan when that min lies at or
    near the block's max. clamp_first picks how such a trial level is rounded:

    - False (make_qkx2_quants, and make_qkx3_quants in ggml d99724f): `clamp(nearest_int(v), 0, nmax)`, with
      nearest_int's garbage beyond |v| > 4194303 before the clamp, exactly as C computes it;
    - True (make_qkx3_quants since llama.cpp 01243c58): `v > 0 ? nearest_int(min(v, nmax)) : 0`.

    The first grid (before the trials) is rounded the first way under both rules, as in C.

    x, w: float32 (n, T). Writes L int32 (n, T), scale (T,) and neg_min (T,) = -min; Laux is float32 scratch.
    The levels of the best grid so far are not copied on every acceptance: the grid (its iscale, origin and
    whether it was a trial) is remembered and the levels are recomputed from it once at the end, which gives the
    same integers.
    """
    n, T = x.shape
    nmax = np.int32(nmax)
    zero_i = np.int32(0)
    mn = np.empty(T, np.float32)
    mx = np.empty(T, np.float32)
    sum_w = np.empty(T, np.float32)
    sum_x = np.empty(T, np.float32)
    best = np.zeros(T, np.float32)
    iscale = np.empty(T, np.float32)
    grid_iscale = np.empty(T, np.float32)  # the grid the best levels were rounded on
    grid_origin = np.empty(T, np.float32)
    s_l = np.empty(T, np.float32)
    s_l2 = np.empty(T, np.float32)
    s_xl = np.empty(T, np.float32)
    t_scale = np.empty(T, np.float32)
    t_min = np.empty(T, np.float32)
    err = np.empty(T, np.float32)
    take = np.empty(T, np.bool_)
    flat = np.empty(T, np.bool_)
    grid_trial = np.zeros(T, np.bool_)  # the best grid is a trial's (rounded by the rule), not the first one
    fmax = f32(nmax)

    x0 = x[0]
    w0 = w[0]
    for t in range(T):
        mn[t] = x0[t]
        mx[t] = x0[t]
        sum_w[t] = w0[t]
        sum_x[t] = w0[t] * x0[t]
    for i in range(1, n):
        xi = x[i]
        wi = w[i]
        for t in range(T):
            v = xi[t]
            mn[t] = v if v < mn[t] else mn[t]
            mx[t] = v if v > mx[t] else mx[t]
            sum_w[t] += wi[t]
            sum_x[t] += wi[t] * v
    for t in range(T):
        mn[t] = _ZERO if mn[t] > _ZERO else mn[t]
        flat[t] = mx[t] == mn[t]  # C returns early: all levels 0, scale 0
        iscale[t] = fmax / (mx[t] - mn[t])
        scale[t] = _ONE / iscale[t]
        grid_iscale[t] = iscale[t]
        grid_origin[t] = mn[t]

    for i in range(n):
        xi = x[i]
        wi = w[i]
        for t in range(T):
            q = min(max(nearest_int(iscale[t] * (xi[t] - mn[t])), zero_i), nmax)
            diff = scale[t] * f32(q) + mn[t] - xi[t]
            diff = abs(diff) if use_mad else diff * diff
            best[t] += wi[t] * diff

    for step in range(nstep + 1):
        trial = rmin + rdelta * f32(step) + fmax
        for t in range(T):
            iscale[t] = trial / (mx[t] - mn[t])
            s_l[t] = _ZERO
            s_l2[t] = _ZERO
            s_xl[t] = _ZERO
        for i in range(n):
            xi = x[i]
            wi = w[i]
            Ai = Laux[i]
            for t in range(T):
                v = iscale[t] * (xi[t] - mn[t])
                if clamp_first:
                    fq = f32(nearest_int(v if v < fmax else fmax)) if v > _ZERO else _ZERO
                else:
                    fq = f32(min(max(nearest_int(v), zero_i), nmax))
                Ai[t] = fq
                wq = wi[t] * fq
                s_l[t] += wq
                s_l2[t] += wq * fq
                s_xl[t] += wq * xi[t]
        for t in range(T):
            D = sum_w[t] * s_l2[t] - s_l[t] * s_l[t]
            take[t] = D > _ZERO
            a = (sum_w[t] * s_xl[t] - sum_x[t] * s_l[t]) / D
            b = (s_l2[t] * sum_x[t] - s_l[t] * s_xl[t]) / D
            if b > _ZERO:
                b = _ZERO
                a = s_xl[t] / s_l2[t]
            t_scale[t] = a
            t_min[t] = b
            err[t] = _ZERO
        for i in range(n):
            xi = x[i]
            wi = w[i]
            Ai = Laux[i]
            for t in range(T):
                diff = t_scale[t] * Ai[t] + t_min[t] - xi[t]
                diff = abs(diff) if use_mad else diff * diff
                err[t] += wi[t] * diff
        for t in range(T):
            if take[t] and err[t] < best[t]:
                best[t] = err[t]
                scale[t] = t_scale[t]
                grid_iscale[t] = iscale[t]
                grid_origin[t] = mn[t]
                grid_trial[t] = True
                mn[t] = t_min[t]

    for t in range(T):
        neg_min[t] = -mn[t]
        if flat[t]:
            scale[t] = _ZERO
    for i in range(n):
        xi = x[i]
        Li = L[i]
        for t in range(T):
            v = grid_iscale[t] * (xi[t] - grid_origin[t])
            if clamp_first and grid_trial[t]:
                q = nearest_int(v if v < fmax else fmax) if v > _ZERO else zero_i
            else:
                q = min(max(nearest_int(v), zero_i), nmax)
            Li[t] = zero_i if flat[t] else q


@numba.njit(**JIT)
def _signed_max(x, amax, smax):
    """Per lane: the largest |x| and the signed value that first reached it."""
    n, T = x.shape
    for t in range(T):
        amax[t] = _ZERO
        smax[t] = _ZERO
    for i in range(n):
        xi = x[i]
        for t in range(T):
            a = abs(xi[t])
            if a > amax[t]:
                amax[t] = a
                smax[t] = xi[t]


@numba.njit(**JIT)
def fit_symmetric(x, w, nmax, L, wx, scale):
    """Symmetric grid `scale * l`, l in -nmax..nmax-1, least squares with weights w, trying 18 scales around
    nmax / max|x| (make_qx_quants with rmse_type 1). Writes L = l + nmax (int32 (n, T)) and scale (T,); wx is
    float32 scratch. As in `fit_affine`, the best grid is remembered and its levels computed once at the end."""
    n, T = x.shape
    nmax = np.int32(nmax)
    lo = np.int32(-nmax)
    hi = np.int32(nmax - 1)
    amax = np.empty(T, np.float32)
    smax = np.empty(T, np.float32)
    iscale = np.empty(T, np.float32)
    grid_iscale = np.empty(T, np.float32)
    s_lx = np.empty(T, np.float32)
    s_l2 = np.empty(T, np.float32)
    best = np.empty(T, np.float32)
    _signed_max(x, amax, smax)
    fmax = f32(nmax)
    for i in range(n):
        xi = x[i]
        wi = w[i]
        wxi = wx[i]
        for t in range(T):
            wxi[t] = wi[t] * xi[t]  # C's w*x[i]*l is (w*x[i])*l
    for t in range(T):
        iscale[t] = f32(-nmax) / smax[t]
        grid_iscale[t] = iscale[t]
        s_lx[t] = _ZERO
        s_l2[t] = _ZERO
    for i in range(n):
        xi = x[i]
        wi = w[i]
        wxi = wx[i]
        for t in range(T):
            fq = f32(min(max(nearest_int(iscale[t] * xi[t]), lo), hi))
            s_lx[t] += wxi[t] * fq
            s_l2[t] += wi[t] * fq * fq
    for t in range(T):
        scale[t] = s_lx[t] / s_l2[t] if s_l2[t] != _ZERO else _ZERO
        best[t] = scale[t] * s_lx[t]

    for step in range(-9, 10):
        if step == 0:
            continue
        trial = -(fmax + _TENTH * f32(step))
        for t in range(T):
            iscale[t] = trial / smax[t]
            s_lx[t] = _ZERO
            s_l2[t] = _ZERO
        for i in range(n):
            xi = x[i]
            wi = w[i]
            wxi = wx[i]
            for t in range(T):
                fq = f32(min(max(nearest_int(iscale[t] * xi[t]), lo), hi))
                s_lx[t] += wxi[t] * fq
                s_l2[t] += wi[t] * fq * fq
        for t in range(T):
            if s_l2[t] > _ZERO and s_lx[t] * s_lx[t] > best[t] * s_l2[t]:
                scale[t] = s_lx[t] / s_l2[t]
                best[t] = scale[t] * s_lx[t]
                grid_iscale[t] = iscale[t]

    for t in range(T):
        if amax[t] < GROUP_MAX_EPS:
            scale[t] = _ZERO
    for i in range(n):
        xi = x[i]
        Li = L[i]
        for t in range(T):
            q = min(max(nearest_int(grid_iscale[t] * xi[t]), lo), hi) + nmax
            Li[t] = np.int32(0) if amax[t] < GROUP_MAX_EPS else q


@numba.njit(**JIT)
def fit_symmetric_refined(x, nmax, L, scale):
    """Symmetric grid l in -nmax..nmax-1 weighted by x**2, then up to five passes that move one element at a
    time to the level that best improves the fit (make_q3_quants with do_rmse). Writes L = l + nmax, scale."""
    n, T = x.shape
    nmax = np.int32(nmax)
    lo = np.int32(-nmax)
    hi = np.int32(nmax - 1)
    amax = np.empty(T, np.float32)
    smax = np.empty(T, np.float32)
    iscale = np.empty(T, np.float32)
    s_lx = np.empty(T, np.float32)
    s_l2 = np.empty(T, np.float32)
    _signed_max(x, amax, smax)
    for t in range(T):
        iscale[t] = f32(-nmax) / smax[t]
        s_lx[t] = _ZERO
        s_l2[t] = _ZERO
    for i in range(n):
        xi = x[i]
        Li = L[i]
        for t in range(T):
            q = min(max(nearest_int(iscale[t] * xi[t]), lo), hi)
            Li[t] = q
            v = xi[t]
            w = v * v
            fq = f32(q)
            s_lx[t] += w * v * fq
            s_l2[t] += w * fq * fq
    for _ in range(5):
        for i in range(n):
            xi = x[i]
            Li = L[i]
            for t in range(T):
                v = xi[t]
                w = v * v
                fl = f32(Li[t])
                slx = s_lx[t] - w * v * fl
                sl2 = s_l2[t] - w * fl * fl
                q = min(max(nearest_int(v * sl2 / slx), lo), hi)
                fq = f32(q)
                slx2 = slx + w * v * fq
                sl22 = sl2 + w * fq * fq
                ok = (
                    slx > _ZERO
                    and q != Li[t]
                    and sl22 > _ZERO
                    and slx2 * slx2 * s_l2[t] > s_lx[t] * s_lx[t] * sl22
                )
                if ok:
                    Li[t] = q
                    s_lx[t] = slx2
                    s_l2[t] = sl22
    for t in range(T):
        scale[t] = s_lx[t] / s_l2[t] if s_l2[t] > _ZERO else _ZERO
    for i in range(n):
        Li = L[i]
        for t in range(T):
            Li[t] = np.int32(0) if amax[t] < GROUP_MAX_EPS else Li[t] + nmax
    for t in range(T):
        if amax[t] < GROUP_MAX_EPS:
            scale[t] = _ZERO


@numba.njit(**JIT)
def fit_positive(x, w, nmax, L):
    """Grid `scale * l`, l in 0..nmax, for non-negative values (the block's sub-scales or sub-mins): tries 9
    scales around nmax / max, then refines one element at a time (make_qp_quants). L is uint8 (n, T) and keeps
    C's uint8 storage (a negative level wraps). Returns the scale (T,)."""
    n, T = x.shape
    nmax = np.int32(nmax)
    mx = np.zeros(T, np.float32)
    iscale = np.empty(T, np.float32)
    step_iscale = np.empty(T, np.float32)
    step_scale = np.empty(T, np.float32)
    best = np.zeros(T, np.float32)
    mse = np.empty(T, np.float32)
    s_lx = np.zeros(T, np.float32)
    s_l2 = np.zeros(T, np.float32)
    scale = np.empty(T, np.float32)
    fmax = f32(nmax)
    for i in range(n):
        xi = x[i]
        for t in range(T):
            mx[t] = mx[t] if mx[t] > xi[t] else xi[t]
    for t in range(T):
        iscale[t] = fmax / mx[t]
        scale[t] = _ONE / iscale[t]
    for i in range(n):
        xi = x[i]
        wi = w[i]
        for t in range(T):
            q = np.uint8(nearest_int(iscale[t] * xi[t]) & 0xFF)
            diff = xi[t] - scale[t] * f32(q)
            best[t] += wi[t] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        trial = _TENTH * f32(step) + fmax
        for t in range(T):
            step_iscale[t] = trial / mx[t]
            step_scale[t] = _ONE / step_iscale[t]
            mse[t] = _ZERO
        for i in range(n):
            xi = x[i]
            wi = w[i]
            for t in range(T):
                q = min(nearest_int(step_iscale[t] * xi[t]), nmax)
                diff = xi[t] - step_scale[t] * f32(q)
                mse[t] += wi[t] * diff * diff
        for t in range(T):
            if mse[t] < best[t]:
                best[t] = mse[t]
                iscale[t] = step_iscale[t]
    for i in range(n):
        xi = x[i]
        wi = w[i]
        Li = L[i]
        for t in range(T):
            q = min(nearest_int(iscale[t] * xi[t]), nmax)
            Li[t] = np.uint8(q & 0xFF)
            fq = f32(q)
            s_lx[t] += wi[t] * xi[t] * fq
            s_l2[t] += wi[t] * fq * fq
    for _ in range(5):
        for i in range(n):
            xi = x[i]
            wi = w[i]
            Li = L[i]
            for t in range(T):
                fl = f32(Li[t])
                slx = s_lx[t] - wi[t] * xi[t] * fl
                sl2 = s_l2[t] - wi[t] * fl * fl
                q = min(nearest_int(xi[t] * sl2 / slx), nmax)
                fq = f32(q)
                slx2 = slx + wi[t] * xi[t] * fq
                sl22 = sl2 + wi[t] * fq * fq
                ok = (
                    slx > _ZERO
                    and sl2 > _ZERO
                    and q != np.int32(Li[t])
                    and slx2 * slx2 * s_l2[t] > s_lx[t] * s_lx[t] * sl22
                )
                if ok:
                    Li[t] = np.uint8(q & 0xFF)
                    s_lx[t] = slx2
                    s_l2[t] = sl22
    for t in range(T):
        scale[t] = s_lx[t] / s_l2[t] if s_l2[t] > _ZERO else _ZERO
    for i in range(n):
        Li = L[i]
        for t in range(T):
            Li[t] = 0 if mx[t] < GROUP_MAX_EPS else Li[t]
    for t in range(T):
        if mx[t] < GROUP_MAX_EPS:
            scale[t] = _ZERO
    return scale
