"""Holm–Bonferroni adjustment against its definition and a worked example; Holm step-down intervals by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import norm

from ditq.stats import bonferroni_confidence_level, holm_adjust, holm_intervals, mean_ci, paired_difference


def _holm_by_definition(p):
    # Adjusted p_i = max over j with p_(j) <= p_i in sorted order of min(1, (m - rank_j + 1) p_(j)).
    m = len(p)
    ranked = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    for pos, i in enumerate(ranked):
        out[i] = min(1.0, max((m - k) * p[ranked[k]] for k in range(pos + 1)))
    return out


def test_holm_adjust_matches_definition():
    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 13):
        p = rng.uniform(0, 0.2, size=m)
        np.testing.assert_allclose(holm_adjust(p), _holm_by_definition(list(p)), rtol=1e-12)


def test_holm_adjust_worked_example():
    # Four tests p = 0.01, 0.04, 0.03, 0.005: sorted 0.005*4, 0.01*3, 0.03*2, 0.04*1 -> 0.02, 0.03, 0.06, 0.06.
    np.testing.assert_allclose(holm_adjust([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])


def test_holm_adjust_ignores_nan_and_caps_at_one():
    out = holm_adjust([0.5, np.nan, 0.6])
    assert np.isnan(out[1])
    assert out[0] == pytest.approx(1.0) and out[2] == pytest.approx(1.0)


def test_holm_adjusted_values_are_monotone_in_raw_order():
    p = np.array([0.001, 0.2, 0.01, 0.04, 0.03])
    adj = holm_adjust(p)
    for i, j in itertools.permutations(range(len(p)), 2):
        if p[i] <= p[j]:
            assert adj[i] <= adj[j]
    assert np.all(adj >= p)


def test_bonferroni_confidence_level():
    assert bonferroni_confidence_level(0.95, 10) == pytest.approx(0.995)


class NormalInterval:
    """estimate ± z(level) * se: an interval whose width at every level is known in closed form."""

    def __init__(self, estimate: float, se: float, level: float = 0.95) -> None:
        self.estimate, self.se, self.level = estimate, se, level
        z = float(norm.ppf(0.5 + level / 2))
        self.low, self.high = estimate - z * se, estimate + z * se

    def at_level(self, level: float) -> NormalInterval:
        return NormalInterval(self.estimate, self.se, level)


def test_holm_intervals_hand_checked_example():
    # z-scores 3.0, 2.3, 2.1, 1.0 in a family of m = 4 at 95%:
    #   step 1, level 1 - 0.05/4: |z| must exceed Phi^-1(1 - 0.00625) = 2.498 -> only 3.0;
    #   step 2, level 1 - 0.05/3: 2.394 -> none of 2.3, 2.1, 1.0; the procedure stops at level 98.33%.
    items = [
        NormalInterval(3.0, 1.0),
        NormalInterval(-2.3, 1.0),
        NormalInterval(2.1, 1.0),
        NormalInterval(1.0, 1.0),
    ]
    assert norm.ppf(1 - 0.05 / 8) == pytest.approx(2.498, abs=1e-3)
    assert norm.ppf(1 - 0.05 / 6) == pytest.approx(2.394, abs=1e-3)
    result = holm_intervals(items, 0.95)
    assert result.rejected == [True, False, False, False]
    assert result.level == pytest.approx(1 - 0.05 / 3)
    # Every unadjusted 95% interval but the last excludes 0 (|z| > 1.96): the adjustment changes three verdicts.
    assert [i.low > 0 or i.high < 0 for i in items] == [True, True, True, False]
    # With 2.45 instead of 2.3: step 2 rejects it (2.45 > 2.394), step 3 at 1 - 0.05/2 needs 2.241 -> 2.1 fails.
    items[1] = NormalInterval(-2.45, 1.0)
    result = holm_intervals(items, 0.95)
    assert result.rejected == [True, True, False, False]
    assert result.level == pytest.approx(1 - 0.05 / 2)
    for interval, rejected in zip(result.intervals, result.rejected, strict=True):
        assert (
            interval.low > 0 or interval.high < 0
        ) == rejected  # the shown intervals agree with the verdicts
    # Bonferroni (every interval at 1 - 0.05/4) would have rejected only the first: Holm is more powerful.
    assert [abs(i.estimate) > norm.ppf(1 - 0.05 / 8) for i in items] == [True, False, False, False]


def test_holm_intervals_rejects_everything_step_by_step():
    # z = 5, 2.45, 2.0: thresholds 2.394 (m = 3), 2.241 (2 left), 1.960 (1 left): all three, one per step.
    result = holm_intervals([NormalInterval(5, 1), NormalInterval(2.45, 1), NormalInterval(2.0, 1)], 0.95)
    assert result.rejected == [True, True, True]
    assert result.level == pytest.approx(0.95)
    assert holm_intervals([], 0.95).rejected == []


def test_holm_intervals_over_bootstrap_replicates():
    rng = np.random.default_rng(4)
    shifts = (0.0, 0.05, 0.5)
    diffs = [paired_difference(rng.normal(s, 1.0, 40) + 3, np.full(40, 3.0), seed=1) for s in shifts]
    result = holm_intervals(diffs, 0.95)
    # `at_level` reuses the replicates: the same as a fresh bootstrap at that level with the same seed.
    level = result.level
    for d, shown in zip(diffs, result.intervals, strict=True):
        again = mean_ci(d.ci.sample, confidence_level=level, seed=1)
        assert (shown.low, shown.high) == (again.low, again.high)
        assert shown.p_value == d.p_value and shown.estimate == d.estimate
    assert result.rejected[2] and not result.rejected[0]
