"""Pixel fidelity against the reference variant's image: PSNR and SSIM (LPIPS lives in `lpips.py`).

Both compare an image with the FP8 reference image of the same prompt, seed and caption mode, on the full
RGB image at its generated size, with a data range of 255.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ditq.metrics.base import METRICS, Metric, ScoreItem, check_pair


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels, computed in float64.

    image, reference: uint8 (or float) arrays of one shape. Identical images give `inf`.
    """
    diff = np.asarray(image, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    mse = float(np.mean(diff * diff))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range * data_range / mse))


# Wang et al. (2004)'s settings, as scikit-image documents them: an 11x11 Gaussian window with sigma 1.5 and
# population covariances. The mean over the three channels is the colour SSIM.
SSIM_SETTINGS = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}


def ssim(image: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> float:
    """Structural similarity of two [H, W, 3] images (scikit-image, Wang et al. settings); 1.0 when equal."""
    from skimage.metrics import structural_similarity

    return float(
        structural_similarity(
            np.asarray(image), np.asarray(reference), channel_axis=-1, data_range=data_range, **SSIM_SETTINGS
        )
    )


class PSNR(Metric):
    name = "psnr"
    higher_is_better = True
    family = "fidelity"
    reference = "fp8"

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        return [psnr(*check_pair(item, self.name)) for item in items]


class SSIM(Metric):
    name = "ssim"
    higher_is_better = True
    family = "fidelity"
    reference = "fp8"

    def model(self) -> str | None:
        return "skimage.metrics.structural_similarity (gaussian 11x11, sigma 1.5, population covariance)"

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        return [ssim(*check_pair(item, self.name)) for item in items]


METRICS.add(PSNR.name, PSNR())
METRICS.add(SSIM.name, SSIM())
