"""Paired permutation (sign-flip) test for a mean difference.

Under the null hypothesis that the two variants are exchangeable within each unit, every per-unit difference
is as likely to have the opposite sign. The test statistic is the mean difference; its null distribution is
that of ``mean(s * d)`` over random signs s in {-1, +1}^n. The two-sided p-value is the share of sign vectors
with ``|mean(s * d)| >= |mean(d)|``: exact (all 2^n vectors) when 2^n <= n_resamples, otherwise Monte Carlo
with the add-one estimate ``(1 + hits) / (1 + n_resamples)``, which is never zero.
"""

from __future__ import annotations

import numpy as np

from ditq.errors import ConfigError

# Relative tolerance for counting null statistics equal to the observed one despite rounding.
_TIE_RTOL = 1e-12
_CHUNK_ELEMENTS = 4_000_000


def _all_signs(n: int) -> np.ndarray:
    """Every sign vector of length n: int8 [2^n, n]."""
    codes = np.arange(2**n, dtype=np.int64)[:, None]
    bits = (codes >> np.arange(n, dtype=np.int64)) & 1
    return (1 - 2 * bits).astype(np.int8)


def sign_flip_pvalue(diff: np.ndarray | list[float], *, n_resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided sign-flip p-value for mean(diff) == 0; `diff` is float [n], one difference per unit."""
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim != 1 or d.shape[0] == 0:
        raise ConfigError(f"diff must be a non-empty 1-D array, got shape {d.shape}")
    if n_resamples < 1:
        raise ConfigError(f"n_resamples must be at least 1, got {n_resamples!r}")
    n = d.shape[0]
    observed = abs(float(d.mean()))
    threshold = observed * (1.0 - _TIE_RTOL)
    if n < 63 and 2**n <= n_resamples:
        null = np.abs(_all_signs(n) @ d) / n
        return float(np.count_nonzero(null >= threshold) / null.shape[0])
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // n)
    hits = 0
    for start in range(0, n_resamples, rows_per_chunk):
        rows = min(rows_per_chunk, n_resamples - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(rows, n))
        hits += int(np.count_nonzero(np.abs(signs @ d) / n >= threshold))
    return float((1 + hits) / (1 + n_resamples))
