from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from ditq.metrics import METRICS, ScoreItem
from ditq.metrics.fidelity import psnr, ssim


def _pair(rng: np.random.Generator, shape=(48, 40, 3)) -> tuple[np.ndarray, np.ndarray]:
    a = rng.integers(0, 256, size=shape, dtype=np.uint8)
    noise = rng.integers(-12, 13, size=shape)
    b = np.clip(a.astype(np.int64) + noise, 0, 255).astype(np.uint8)
    return a, b


def test_psnr_matches_float64_hand_computation(rng):
    a, b = _pair(rng)
    total = 0
    for x, y in zip(a.ravel().tolist(), b.ravel().tolist(), strict=True):
        total += (x - y) ** 2  # exact integer sum
    expected = 10 * math.log10(255.0**2 / (total / a.size))
    assert psnr(a, b) == pytest.approx(expected, rel=1e-12)
    assert psnr(b, a) == psnr(a, b)


def test_psnr_identical_images_is_infinite():
    a = np.full((8, 8, 3), 77, dtype=np.uint8)
    assert psnr(a, a) == float("inf")


def test_psnr_uint8_inputs_do_not_wrap():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = np.full((4, 4, 3), 255, dtype=np.uint8)
    assert psnr(a, b) == pytest.approx(0.0)  # mse = 255^2


def test_ssim_equals_scikit_image_wang_settings(rng):
    a, b = _pair(rng, shape=(64, 64, 3))
    expected = structural_similarity(
        a, b, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(a, b) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < ssim(a, b) < 1.0


def test_ssim_identical_images_is_one(rng):
    a, _ = _pair(rng)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_fidelity_metrics_score_batches(rng):
    a, b = _pair(rng)
    items = [ScoreItem(image=a, reference=b), ScoreItem(image=a, reference=a)]
    assert METRICS.get("psnr").score(items) == [psnr(a, b), float("inf")]
    assert METRICS.get("ssim").score(items) == pytest.approx([ssim(a, b), 1.0])


def test_fidelity_metric_rejects_mismatched_sizes(rng):
    a, _ = _pair(rng)
    with pytest.raises(ValueError, match="one size"):
        METRICS.get("psnr").score([ScoreItem(image=a, reference=a[:-1])])
    with pytest.raises(ValueError, match="reference"):
        METRICS.get("ssim").score([ScoreItem(image=a)])
