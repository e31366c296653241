"""Vectorized nonparametric bootstrap for a mean and for a paired mean difference.

Resampling draws whole units (in ditq's benchmark a unit is a prompt, see `ditq.stats.units`) with replacement:
an index matrix of shape (n_resamples, n) is drawn from `numpy.random.Generator(PCG64(seed))` and the mean of
every row is one bootstrap replicate. Two interval methods:

- ``percentile``: the (alpha/2, 1 - alpha/2) quantiles of the replicates;
- ``bca`` (bias-corrected and accelerated, Efron & Tibshirani 1993, ch. 14): the quantile levels are moved by
  the bias z0 = Phi^-1(share of replicates below the estimate, ties counted half) and the acceleration
  a = sum(d^3) / (6 (sum d^2)^(3/2)) with d = x - mean (the jackknife acceleration of the mean in closed form).

Quantiles use linear interpolation, like `numpy.quantile`'s default. A paired difference is the bootstrap of the
per-unit differences, which resamples the pairs together. The seed is recorded in every result, so a report
can be regenerated exactly. A result keeps its replicates, so `BootstrapCI.at_level` gives the interval at another
confidence level from the same resamples (for multiplicity-adjusted intervals, `ditq.stats.multiple`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from scipy.special import ndtr, ndtri

from ditq.errors import ConfigError
from ditq.names import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from ditq.stats.permutation import sign_flip_pvalue

Method = Literal["bca", "percentile"]
DEFAULT_RESAMPLES = BOOTSTRAP_RESAMPLES
DEFAULT_SEED = BOOTSTRAP_SEED
# Index matrices are drawn in chunks of at most this many elements (8 bytes each) to bound memory.
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True, kw_only=True)
class BootstrapCI:
    """A bootstrap confidence interval for a mean.

    `method` is the method actually used: a BCa request on degenerate data (all values equal, or every
    replicate on one side of the estimate) falls back to ``percentile`` and says so here.
    """

    estimate: float
    low: float
    high: float
    confidence_level: float
    method: str
    n: int
    n_resamples: int
    seed: int
    standard_error: float
    requested_method: str = "bca"
    sample: np.ndarray | None = field(default=None, repr=False, compare=False)
    replicates: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies strictly on one side of zero."""
        return bool(self.low > 0 or self.high < 0)

    def at_level(self, confidence_level: float) -> BootstrapCI:
        """The interval at another confidence level from the same replicates (same estimate, seed, method)."""
        if not 0.0 < confidence_level < 1.0:
            raise ConfigError(f"confidence_level must be in (0, 1), got {confidence_level!r}")
        if self.sample is None or self.replicates is None:  # n = 1: no interval at any level
            return replace(self, confidence_level=confidence_level)
        low, high, used = _interval(self.sample, self.replicates, confidence_level, self.requested_method)
        return replace(self, low=low, high=high, confidence_level=confidence_level, method=used)


@dataclass(frozen=True, kw_only=True)
class PairedDifference:
    """Mean of the per-unit differences ``a - b`` with a paired bootstrap CI and a sign-flip p-value."""

    ci: BootstrapCI
    p_value: float

    @property
    def estimate(self) -> float:
        return self.ci.estimate

    @property
    def low(self) -> float:
        return self.ci.low

    @property
    def high(self) -> float:
        return self.ci.high

    @property
    def excludes_zero(self) -> bool:
        return self.ci.excludes_zero

    @property
    def n(self) -> int:
        return self.ci.n

    @property
    def seed(self) -> int:
        return self.ci.seed

    def at_level(self, confidence_level: float) -> PairedDifference:
        """The same difference with its interval at another confidence level (same replicates, same p-value)."""
        return PairedDifference(ci=self.ci.at_level(confidence_level), p_value=self.p_value)


def _check_args(confidence_level: float, n_resamples: int, method: str) -> None:
    if not 0.0 < confidence_level < 1.0:
        raise ConfigError(f"confidence_level must be in (0, 1), got {confidence_level!r}")
    if n_resamples < 1:
        raise ConfigError(f"n_resamples must be at least 1, got {n_resamples!r}")
    if method not in ("bca", "percentile"):
        raise ConfigError(f"method must be 'bca' or 'percentile', got {method!r}")


def _as_sample(values: np.ndarray | list[float], name: str = "values") -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ConfigError(f"{name} must be one-dimensional, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ConfigError(f"{name} must be finite; drop NaN/inf values before bootstrapping")
    return x


def bootstrap_means(values: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `n_resamples` resamples (with replacement) of `values` [n] -> float64 [n_resamples].

    Indices come from ``rng.integers(0, n, size=(rows, n))``, in chunks bounded by memory.
    """
    n = values.shape[0]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    out = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, rows_per_chunk):
        rows = min(rows_per_chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(rows, n))
        out[start : start + rows] = values[idx].mean(axis=1)
    return out


def bca_levels(values: np.ndarray, replicates: np.ndarray, alpha: float) -> tuple[float, float] | None:
    """BCa quantile levels for the mean of `values` given its bootstrap `replicates`, or None if degenerate.

    `alpha` is the two-sided tail mass per side ((1 - confidence) / 2).
    """
    estimate = values.mean()
    share_below = (np.count_nonzero(replicates < estimate) + np.count_nonzero(replicates <= estimate)) / (
        2.0 * replicates.shape[0]
    )
    z0 = float(ndtri(share_below))
    d = values - estimate
    spread = float(np.sum(d * d))
    if not np.isfinite(z0) or spread == 0.0:
        return None
    accel = float(np.sum(d**3)) / (6.0 * spread**1.5)
    levels = []
    for z_alpha in (float(ndtri(alpha)), float(ndtri(1.0 - alpha))):
        shifted = z0 + z_alpha
        levels.append(float(ndtr(z0 + shifted / (1.0 - accel * shifted))))
    return levels[0], levels[1]


def mean_ci(
    values: np.ndarray | list[float],
    *,
    confidence_level: float = 0.95,
    method: Method = "bca",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> BootstrapCI:
    """Bootstrap CI for the mean of `values` (float [n], one value per unit, finite).

    With n = 1 the interval is undefined (low = high = NaN); with all values equal it is the single point.
    """
    _check_args(confidence_level, n_resamples, method)
    x = _as_sample(values)
    n = x.shape[0]
    if n == 0:
        raise ConfigError("cannot bootstrap an empty sample")
    estimate = float(x.mean())
    if n == 1:
        nan = float("nan")
        return BootstrapCI(
            estimate=estimate,
            low=nan,
            high=nan,
            confidence_level=confidence_level,
            method=method,
            n=1,
            n_resamples=n_resamples,
            seed=seed,
            standard_error=nan,
            requested_method=method,
        )
    rng = np.random.default_rng(seed)
    replicates = bootstrap_means(x, n_resamples, rng)
    low, high, used = _interval(x, replicates, confidence_level, method)
    return BootstrapCI(
        estimate=estimate,
        low=low,
        high=high,
        confidence_level=confidence_level,
        method=used,
        n=n,
        n_resamples=n_resamples,
        seed=seed,
        standard_error=float(replicates.std(ddof=1)),
        requested_method=method,
        sample=x,
        replicates=replicates,
    )


def _interval(
    x: np.ndarray, replicates: np.ndarray, confidence_level: float, method: str
) -> tuple[float, float, str]:
    """(low, high, method used) for the mean of `x` from its bootstrap `replicates`."""
    alpha = (1.0 - confidence_level) / 2.0
    used = method
    levels: tuple[float, float] | None = (alpha, 1.0 - alpha)
    if method == "bca":
        levels = bca_levels(x, replicates, alpha)
        if levels is None:
            used = "percentile"
            levels = (alpha, 1.0 - alpha)
    low, high = np.quantile(replicates, levels)
    return float(low), float(high), used


def paired_difference(
    a: np.ndarray | list[float],
    b: np.ndarray | list[float],
    *,
    confidence_level: float = 0.95,
    method: Method = "bca",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> PairedDifference:
    """Mean of ``a - b`` over paired units (a[i] and b[i] belong to the same unit), with CI and p-value.

    The CI resamples units, keeping each pair together; the p-value is the two-sided sign-flip permutation
    test of `ditq.stats.permutation.sign_flip_pvalue` with the same seed and resample count.
    """
    x = _as_sample(a, "a")
    y = _as_sample(b, "b")
    if x.shape != y.shape:
        raise ConfigError(f"paired samples must have the same length, got {x.shape[0]} and {y.shape[0]}")
    diff = x - y
    ci = mean_ci(diff, confidence_level=confidence_level, method=method, n_resamples=n_resamples, seed=seed)
    p = sign_flip_pvalue(diff, n_resamples=n_resamples, seed=seed)
    return PairedDifference(ci=ci, p_value=p)
