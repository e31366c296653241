"""Sign-flip p-values against scipy.stats.permutation_test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ditq.stats import sign_flip_pvalue


def _scipy_sign_flip(d, n_resamples, rng):
    res = stats.permutation_test(
        (d,),
        lambda x, axis=-1: np.mean(x, axis=axis),
        permutation_type="samples",
        n_resamples=n_resamples,
        rng=rng,
    )
    return res.pvalue


def test_sign_flip_exact_equals_scipy():
    d = np.random.default_rng(1).normal(0.2, 0.5, size=12)
    # 2^12 = 4096 <= 10,000: both enumerate every sign vector.
    assert sign_flip_pvalue(d) == pytest.approx(_scipy_sign_flip(d, 10_000, 0), rel=1e-12)


def test_sign_flip_monte_carlo_close_to_scipy():
    d = np.random.default_rng(2).normal(0.1, 0.5, size=40)
    ours = sign_flip_pvalue(d, n_resamples=20_000, seed=1)
    ref = _scipy_sign_flip(d, 20_000, 2)
    # Each is a binomial share over 20,000 draws: sd <= sqrt(p(1-p)/20000); allow 5 sd of the difference.
    sd = np.sqrt(2 * ref * (1 - ref) / 20_000)
    assert 0.01 < ref < 0.99
    assert abs(ours - ref) < 5 * sd


def test_sign_flip_extremes():
    assert sign_flip_pvalue(np.zeros(8)) == 1.0
    p = sign_flip_pvalue(np.full(30, 0.3), n_resamples=5000, seed=0)
    assert p == pytest.approx(1 / 5001)  # the add-one estimate never reports 0
