"""Multiple comparisons: Holm–Bonferroni adjusted p-values, Holm step-down intervals, the Bonferroni level.

A report compares many (variant pair, metric) combinations; at 5% each, about one in twenty null comparisons
would look significant by chance. Holm's step-down procedure controls the family-wise error rate (the chance of
any false rejection) at the chosen level without assumptions on the dependence between tests, and is uniformly
more powerful than plain Bonferroni. Adjusted p-values: sort the m p-values ascending, multiply the i-th
(1-based) by (m - i + 1), take the running maximum, cap at 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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


class HasInterval(Protocol):
    """Anything with an interval at a chosen level (`BootstrapCI`, `PairedDifference`)."""

    def at_level(self, confidence_level: float) -> Any: ...


@dataclass(frozen=True)
class StepDown:
    """The outcome of `holm_intervals` over m comparisons.

    rejected: bool [m], True where the comparison's difference is declared non-zero.
    level: the per-interval confidence level of the last step, 1 - alpha / (m - r_before) with r_before the
    number rejected before that step (1 - alpha / m when nothing is rejected).
    intervals: each comparison at `level` (the objects `at_level` returned); every rejected one excludes 0 there,
    every other one includes it.
    """

    rejected: list[bool]
    level: float
    intervals: list[Any]


def _excludes_zero(interval: Any) -> bool:
    low, high = float(interval.low), float(interval.high)
    return bool(low > 0 or high < 0)


def holm_intervals(items: Sequence[HasInterval], confidence_level: float = 0.95) -> StepDown:
    """Holm's step-down procedure carried out with confidence intervals instead of p-values.

    With alpha = 1 - confidence_level and r comparisons rejected so far, every comparison not yet rejected is
    tested by whether its interval at level 1 - alpha / (m - r) excludes 0; all that do are rejected together,
    r grows, and the step repeats until one rejects nothing. Whatever the dependence between the comparisons, the
    chance of rejecting any true null stays at most alpha (when the first true null is rejected, every earlier
    rejection was a false null, so m - r >= m0, the number of true nulls, and each true null's interval at level
    1 - alpha / m0 excludes 0 with probability at most alpha / m0). With r = 0 the first step is Bonferroni's;
    every later step is more powerful. Intervals of one comparison must be nested in the level (wider at higher
    levels), as bootstrap quantile intervals are.
    """
    if not 0.0 < confidence_level < 1.0:
        raise ConfigError(f"confidence_level must be in (0, 1), got {confidence_level!r}")
    m = len(items)
    alpha = 1.0 - confidence_level
    rejected = [False] * m
    if m == 0:
        return StepDown(rejected, confidence_level, [])
    while True:
        remaining = m - sum(rejected)
        level = 1.0 - alpha / remaining
        intervals = [item.at_level(level) for item in items]
        new = [i for i in range(m) if not rejected[i] and _excludes_zero(intervals[i])]
        for i in new:
            rejected[i] = True
        if not new or all(rejected):
            return StepDown(rejected, level, intervals)
