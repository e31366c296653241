"""Statistics for the paired benchmark: bootstrap intervals, sign-flip tests, multiple-comparison adjustment.

The unit of resampling is the prompt (scores are averaged over seeds within a prompt first; see
`ditq.stats.units`). Every random draw comes from a `numpy.random.Generator` seeded with a recorded seed.
"""

from __future__ import annotations

from ditq.stats.bootstrap import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    BootstrapCI,
    PairedDifference,
    bootstrap_means,
    mean_ci,
    paired_difference,
)
from ditq.stats.multiple import StepDown, bonferroni_confidence_level, holm_adjust, holm_intervals
from ditq.stats.permutation import sign_flip_pvalue
from ditq.stats.units import paired_unit_means, psnr_ceiling_db, psnr_unit_values, unit_means

__all__ = [
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "BootstrapCI",
    "PairedDifference",
    "StepDown",
    "bonferroni_confidence_level",
    "bootstrap_means",
    "holm_adjust",
    "holm_intervals",
    "mean_ci",
    "paired_difference",
    "paired_unit_means",
    "psnr_ceiling_db",
    "psnr_unit_values",
    "sign_flip_pvalue",
    "unit_means",
]
