"""Holm–Bonferroni adjustment against its definition and a published worked example."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ditq.stats import bonferroni_confidence_level, holm_adjust


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
