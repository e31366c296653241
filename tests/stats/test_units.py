"""Seed averaging within prompts, pairing on (prompt, seed), and PSNR per prompt from the mean MSE."""

from __future__ import annotations

import numpy as np
import pytest

from ditq.stats import paired_unit_means, psnr_ceiling_db, psnr_unit_values, unit_means


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


def _psnr64(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_psnr_unit_values_from_mean_mse_with_identical_images():
    from ditq.metrics.fidelity import psnr

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, size=(2, 3, 16, 16, 3)).astype(np.uint8)  # [prompt, seed, H, W, C]
    img = ref.copy()
    img[0, 0] = np.clip(ref[0, 0].astype(int) + rng.integers(-9, 10, (16, 16, 3)), 0, 255)  # p0 s0 differs
    img[0, 2, 3, 4, 1] ^= 1  # p0 s2: one code value in one channel of one pixel; p0 s1 identical
    values = {(f"p{p}", s): psnr(img[p, s], ref[p, s]) for p in range(2) for s in range(3)}
    assert values[("p0", 1)] == float("inf") and values[("p1", 0)] == float("inf")
    ceiling = psnr_ceiling_db(16, 16)
    out = psnr_unit_values(values, ceiling)
    # Reference in float64 from the pixels: PSNR of the mean squared error over every pixel of the prompt's seeds.
    mse_p0 = np.mean([np.mean((img[0, s].astype(float) - ref[0, s]) ** 2) for s in range(3)])
    assert out["p0"] == pytest.approx(10 * np.log10(255.0**2 / mse_p0), rel=1e-12)
    assert out["p1"] == ceiling  # every image of p1 identical: the ceiling, not dropped and not inf
    # The ceiling is the PSNR of the smallest possible difference, so an identical prompt is never below one that
    # differs by a single step.
    assert _psnr64(img[0, 2], ref[0, 2]) == pytest.approx(ceiling, rel=1e-12)
    assert psnr_ceiling_db(1024, 1024) == pytest.approx(113.108, abs=1e-3)
    # The mean of decibels would differ (and be inf here): the aggregation is over MSE.
    assert out["p0"] < np.mean([v for k, v in values.items() if k[0] == "p0" and np.isfinite(v)])


def test_paired_unit_means_with_the_psnr_aggregate():
    a = {("p0", 0): 20.0, ("p0", 1): float("inf"), ("p1", 0): 30.0}
    b = {("p0", 0): 30.0, ("p0", 1): 40.0, ("p1", 0): 30.0}
    units, am, bm = paired_unit_means(a, b, lambda v: psnr_unit_values(v, 100.0))
    assert units == ["p0", "p1"]
    # p0: mean MSE (0.01 + 0) / 2 -> 10 log10(200); (0.001 + 0.0001) / 2 -> 10 log10(1 / 0.00055).
    np.testing.assert_allclose(am, [10 * np.log10(200.0), 30.0], rtol=1e-12)
    np.testing.assert_allclose(bm, [10 * np.log10(1 / 0.00055), 30.0], rtol=1e-12)
