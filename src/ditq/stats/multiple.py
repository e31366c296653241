"""Multiple comparisons: Holm–Bonferroni adjusted p-values and the Bonferroni confidence level.

A report compares many (variant pair, metric) combinations; at 5% each, about one in twenty null comparisons
would look significant by chance. Holm's step-down procedure controls the family-wise error rate (the chance of
any false rejection) at the chosen level without assumptions on the dependence between tests, and is uniformly
more powerful than plain Bonferroni. Adjusted p-values: sort the m p-values ascending, multiply the i-th
(1-based) by (m - i + 1), take the running maximum, cap at 1.
"""

from __future__ import annotations

import numpy as np

from ditq.errors import ConfigError


def holm_adjust(pvalues: np.ndarray | list[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values, float [m] in the input order; NaN entries stay NaN and do not count."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ConfigError(f"pvalues must be one-dimensional, got shape {p.shape}")
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    if valid.size == 0:
        return out
    if np.any((p[valid] < 0) | (p[valid] > 1)):
        raise ConfigError("p-values must lie in [0, 1]")
    m = valid.size
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = p[order] * (m - np.arange(m))
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out


def bonferroni_confidence_level(confidence_level: float, n_comparisons: int) -> float:
    """Per-interval level that makes `n_comparisons` intervals hold simultaneously at `confidence_level`."""
    if n_comparisons < 1:
        raise ConfigError(f"n_comparisons must be at least 1, got {n_comparisons!r}")
    return 1.0 - (1.0 - confidence_level) / n_comparisons
