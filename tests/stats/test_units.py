"""Seed averaging within prompts and pairing on (prompt, seed)."""

from __future__ import annotations

import numpy as np

from ditq.stats import paired_unit_means, unit_means


def test_unit_means_average_over_seeds_within_prompt():
    values = {("p1", 0): 1.0, ("p1", 1): 3.0, ("p2", 0): 5.0}
    assert unit_means(values) == {"p1": 2.0, "p2": 5.0}


def test_paired_unit_means_match_on_prompt_and_seed():
    a = {("p1", 0): 1.0, ("p1", 1): 3.0, ("p2", 0): 5.0, ("p3", 0): 9.0}
    b = {("p1", 0): 0.5, ("p2", 0): 4.0, ("p2", 1): 100.0}
    units, am, bm = paired_unit_means(a, b)
    # p1 keeps only seed 0 (b lacks seed 1), p2 only seed 0 (a lacks seed 1), p3 has no partner.
    assert units == ["p1", "p2"]
    np.testing.assert_array_equal(am, [1.0, 5.0])
    np.testing.assert_array_equal(bm, [0.5, 4.0])
    # The difference of per-prompt means equals the mean of per-image differences.
    np.testing.assert_allclose(am - bm, [1.0 - 0.5, 5.0 - 4.0])
