"""From per-image scores to per-unit values: the unit of resampling is the prompt.

A benchmark image is identified by (prompt, seed). Images of the same prompt under different seeds are not
independent (same text, same layout demands), so the bootstrap resamples prompts, not images: the scores of a
prompt are first averaged over its seeds, giving one value per prompt.

For a paired comparison of variants A and B, images are first matched on (prompt, seed) — the same seed gives
the same initial noise in both variants — and only observations present in both are kept. Averaging the kept
scores over seeds within each prompt then gives per-prompt means a_p and b_p whose difference a_p - b_p equals
the mean over seeds of the per-image differences.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping

import numpy as np

# (unit, replicate), e.g. (prompt_id, seed)
ObservationKey = tuple[Hashable, Hashable]
# How the replicates of a unit combine into the unit's value: {(unit, replicate): v} -> {unit: value}.
Aggregate = Callable[[Mapping[ObservationKey, float]], dict[Hashable, float]]


def unit_means(values: Mapping[ObservationKey, float]) -> dict[Hashable, float]:
    """Average the values of each unit over its replicates: {(unit, replicate): v} -> {unit: mean}.

    Units keep the order of their first appearance.
    """
    sums: dict[Hashable, float] = defaultdict(float)
    counts: dict[Hashable, int] = defaultdict(int)
    for (unit, _replicate), value in values.items():
        sums[unit] += float(value)
        counts[unit] += 1
    return {unit: sums[unit] / counts[unit] for unit in sums}


def psnr_ceiling_db(height: int, width: int, channels: int = 3, peak: float = 255.0) -> float:
    """The PSNR of the smallest possible difference between two 8-bit images of this size: one code value in
    one channel of one pixel, MSE = 1 / (channels * H * W).

    10 * log10(peak^2 * channels * H * W): 113.1 dB at 1024 x 1024 RGB, 89.0 dB at 64 x 64.
    """
    return 10.0 * math.log10(peak * peak * channels * height * width)


def psnr_unit_values(values: Mapping[ObservationKey, float], ceiling_db: float) -> dict[Hashable, float]:
    """Per-unit PSNR from the mean MSE over the unit's replicates: -10 log10(mean over r of 10^(-PSNR_r / 10)).

    A PSNR is 10 log10(peak^2 / MSE), so 10^(-PSNR / 10) is the MSE in units of peak^2 and the mean runs over
    MSEs, not decibels; identical images (PSNR = inf, MSE = 0) enter with MSE 0 and are never dropped. A unit
    whose mean MSE is 0 (all of its images identical to the reference) gets `ceiling_db`, and no unit exceeds it.
    """
    sums: dict[Hashable, float] = defaultdict(float)
    counts: dict[Hashable, int] = defaultdict(int)
    for (unit, _replicate), value in values.items():
        sums[unit] += 10.0 ** (-float(value) / 10.0) if value != math.inf else 0.0
        counts[unit] += 1
    out = {}
    for unit, total in sums.items():
        mse = total / counts[unit]
        out[unit] = ceiling_db if mse <= 0.0 else min(-10.0 * math.log10(mse), ceiling_db)
    return out


def paired_unit_means(
    a: Mapping[ObservationKey, float],
    b: Mapping[ObservationKey, float],
    aggregate: Aggregate = unit_means,
) -> tuple[list[Hashable], np.ndarray, np.ndarray]:
    """Match `a` and `b` on (unit, replicate), then combine each side over replicates within a unit with
    `aggregate` (default: the mean).

    Returns (units, a_values float [k], b_values float [k]) over the k units with at least one matched
    observation, in the order the units first appear in `a`.
    """
    common = {key: float(value) for key, value in a.items() if key in b}
    a_units = aggregate(common)
    b_units = aggregate({key: float(b[key]) for key in common})
    units = list(a_units)
    return (
        units,
        np.array([a_units[u] for u in units], dtype=np.float64),
        np.array([b_units[u] for u in units], dtype=np.float64),
    )
