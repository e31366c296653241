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

from collections import defaultdict
from collections.abc import Hashable, Mapping

import numpy as np

# (unit, replicate), e.g. (prompt_id, seed)
ObservationKey = tuple[Hashable, Hashable]


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


def paired_unit_means(
    a: Mapping[ObservationKey, float], b: Mapping[ObservationKey, float]
) -> tuple[list[Hashable], np.ndarray, np.ndarray]:
    """Match `a` and `b` on (unit, replicate), then average each side over replicates within a unit.

    Returns (units, a_means float [k], b_means float [k]) over the k units with at least one matched
    observation, in the order the units first appear in `a`.
    """
    common = {key: float(value) for key, value in a.items() if key in b}
    a_units = unit_means(common)
    b_units = unit_means({key: float(b[key]) for key in common})
    units = list(a_units)
    return (
        units,
        np.array([a_units[u] for u in units], dtype=np.float64),
        np.array([b_units[u] for u in units], dtype=np.float64),
    )
