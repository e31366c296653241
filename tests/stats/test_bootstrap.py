"""Bootstrap intervals against scipy.stats.bootstrap, detection of known effects and reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.stats import norm

from ditq.errors import ConfigError
from ditq.stats import mean_ci, paired_difference

B = 10_000


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def _mean_diff(x, y, axis=-1):
    return np.mean(x - y, axis=axis)


def monte_carlo_tolerance(standard_error: float, level: float, n_resamples: int, bca: bool) -> float:
    """Allowed gap between two CI endpoints computed from independent bootstrap streams.

    An endpoint is the `level` quantile of n_resamples replicates. For a roughly normal bootstrap distribution
    with sd `standard_error`, the quantile estimate has sd se * sqrt(q (1 - q) / B) / phi(Phi^-1(q)). BCa also
    estimates z0 from the share of replicates below the estimate (sd sqrt(0.25 / B) / phi(0) on the z scale),
    which enters the adjusted level about twice. Two independent runs: sqrt(2) times that; allow 5 sd.
    """
    q = min(level, 1 - level)
    quantile_sd = standard_error * math.sqrt(q * (1 - q) / n_resamples) / norm.pdf(norm.ppf(q))
    z0_sd = 2 * standard_error * math.sqrt(0.25 / n_resamples) / norm.pdf(0.0) if bca else 0.0
    return 5 * math.sqrt(2) * math.hypot(quantile_sd, z0_sd)


@pytest.fixture(scope="module")
def skewed() -> np.ndarray:
    # Skewed on purpose: BCa and percentile intervals differ visibly, so each is checked against its own peer.
    return np.random.default_rng(123).exponential(scale=1.0, size=40)


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_mean_ci_matches_scipy_within_monte_carlo_error(skewed, method):
    ours = mean_ci(skewed, method=method, n_resamples=B, seed=1)
    ref = stats.bootstrap(
        (skewed,), _mean, n_resamples=B, method="BCa" if method == "bca" else "percentile", rng=2
    )
    tol = monte_carlo_tolerance(ref.standard_error, 0.025, B, bca=method == "bca")
    assert ours.method == method
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=tol)
    assert ours.standard_error == pytest.approx(ref.standard_error, rel=0.05)
    # The two methods really differ on skewed data by more than the tolerance: the check above can tell them apart.
    other = stats.bootstrap(
        (skewed,), _mean, n_resamples=B, method="percentile" if method == "bca" else "BCa", rng=2
    )
    gap = abs(other.confidence_interval.high - ref.confidence_interval.high)
    assert gap > tol


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_mean_ci_identical_to_scipy_on_the_same_random_stream(skewed, method):
    # Both draw the index matrix with Generator.integers(0, n, (B, n)) from the same seed: equal to rounding.
    ours = mean_ci(skewed, method=method, n_resamples=B, seed=7)
    ref = stats.bootstrap(
        (skewed,), _mean, n_resamples=B, method="BCa" if method == "bca" else "percentile", rng=7
    )
    assert ours.low == pytest.approx(ref.confidence_interval.low, rel=1e-10)
    assert ours.high == pytest.approx(ref.confidence_interval.high, rel=1e-10)


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_paired_difference_matches_scipy_paired_bootstrap(method):
    rng = np.random.default_rng(5)
    a = rng.gamma(2.0, 1.0, size=30)
    b = a - 0.3 + rng.normal(0, 0.2, size=30) ** 2  # correlated pairs, skewed differences
    ours = paired_difference(a, b, method=method, n_resamples=B, seed=11)
    kind = "BCa" if method == "bca" else "percentile"
    ref = stats.bootstrap((a, b), _mean_diff, paired=True, n_resamples=B, method=kind, rng=12)
    tol = monte_carlo_tolerance(ref.standard_error, 0.025, B, bca=method == "bca")
    assert ours.estimate == pytest.approx(np.mean(a - b), rel=1e-12)
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=tol)
    same = stats.bootstrap((a, b), _mean_diff, paired=True, n_resamples=B, method=kind, rng=11)
    assert ours.low == pytest.approx(same.confidence_interval.low, rel=1e-10)
    assert ours.high == pytest.approx(same.confidence_interval.high, rel=1e-10)


def test_paired_difference_detects_known_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(0.6, 0.15, size=24)  # prompt-level scores vary a lot between prompts
    b = a - 0.3 + rng.normal(0, 0.05, size=24)
    res = paired_difference(b, a, seed=3)
    assert res.excludes_zero
    assert res.high < 0
    assert res.low < -0.3 < res.high
    assert res.p_value < 0.001
    assert res.n == 24 and res.seed == 3


def test_paired_difference_rarely_excludes_zero_under_the_null():
    # 60 null data sets: the 95% CI should exclude 0 about 5% of the time; binomial(60, 0.05) exceeds 9 with
    # probability < 0.2%, so this loose bound catches a broken interval (e.g. an unpaired or too-narrow one)
    # without flaking.
    excluded = rejected = 0
    for k in range(60):
        rng = np.random.default_rng(1000 + k)
        base = rng.normal(0, 1.0, size=20)
        a = base + rng.normal(0, 0.1, size=20)
        b = base + rng.normal(0, 0.1, size=20)
        res = paired_difference(a, b, n_resamples=2000, seed=k)
        excluded += res.excludes_zero
        rejected += res.p_value < 0.05
    assert excluded <= 9
    assert rejected <= 9


def test_mean_ci_covers_the_true_mean_most_of_the_time():
    hits = 0
    for k in range(60):
        x = np.random.default_rng(2000 + k).normal(1.5, 1.0, size=25)
        ci = mean_ci(x, n_resamples=2000, seed=k)
        hits += ci.low <= 1.5 <= ci.high
    assert hits >= 51  # nominal 57 of 60


def test_seed_makes_results_reproducible(skewed):
    first = mean_ci(skewed, seed=42)
    again = mean_ci(skewed, seed=42)
    other = mean_ci(skewed, seed=43)
    assert first == again
    assert (first.low, first.high) != (other.low, other.high)
    assert first.seed == 42 and first.n_resamples == 10_000
    p1 = paired_difference(skewed, skewed[::-1], seed=9)
    p2 = paired_difference(skewed, skewed[::-1], seed=9)
    assert p1 == p2


def test_mean_ci_degenerate_samples():
    flat = mean_ci([2.0, 2.0, 2.0, 2.0])
    assert (flat.low, flat.estimate, flat.high) == (2.0, 2.0, 2.0)
    assert flat.method == "percentile"  # BCa undefined on constant data: says which method was used
    single = mean_ci([3.0])
    assert single.estimate == 3.0 and math.isnan(single.low) and math.isnan(single.high)


def test_mean_ci_rejects_bad_input():
    with pytest.raises(ConfigError, match="finite"):
        mean_ci([1.0, float("nan")])
    with pytest.raises(ConfigError, match="empty"):
        mean_ci([])
    with pytest.raises(ConfigError, match="confidence_level"):
        mean_ci([1.0, 2.0], confidence_level=95)
    with pytest.raises(ConfigError, match="same length"):
        paired_difference([1.0, 2.0], [1.0])
