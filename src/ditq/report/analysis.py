"""Statistics over a loaded run: per-variant means and paired differences, or the reason there are none.

Every number comes from `ditq.stats` with one recorded `StatsSettings` (seed, resamples, level, method). The
unit of resampling is the prompt: scores are averaged over seeds within a prompt, after matching (prompt, seed)
between the two sides of a paired comparison; PSNR is combined over seeds through its MSE
(`ditq.stats.psnr_unit_values`), so identical images count instead of being dropped. Images the blocked check
flagged (and, for fidelity metrics, images whose reference image it flagged) are left out of every quality
number; the block rate itself is analysed on all images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ditq.errors import ConfigError
from ditq.report.inputs import BLOCKED, PSNR_METRICS, RunData
from ditq.stats import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    BootstrapCI,
    PairedDifference,
    holm_adjust,
    holm_intervals,
    mean_ci,
    paired_difference,
    paired_unit_means,
    psnr_ceiling_db,
    psnr_unit_values,
    unit_means,
)
from ditq.stats.units import Aggregate

# Image size assumed for the PSNR ceiling when neither run.json nor an image says.
DEFAULT_SIZE = (1024, 1024)


@dataclass(frozen=True, kw_only=True)
class StatsSettings:
    """How every interval in a report is computed; recorded in the methods paragraph."""

    n_resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    confidence_level: float = 0.95
    method: str = "bca"

    def __post_init__(self) -> None:
        if self.n_resamples < 100:
            raise ConfigError(f"n_resamples must be at least 100, got {self.n_resamples}")
        if not 0.5 <= self.confidence_level < 1.0:
            raise ConfigError(f"confidence_level must be in [0.5, 1), got {self.confidence_level}")
        if self.method not in ("bca", "percentile"):
            raise ConfigError(f"method must be 'bca' or 'percentile', got {self.method!r}")


@dataclass(frozen=True)
class Missing:
    """Why a cell has no number. kind: "unavailable" (metric or reference missing), "reference", "empty"."""

    reason: str
    kind: str = "unavailable"

    @property
    def text(self) -> str:
        if self.kind == "unavailable":
            return f"unavailable: {self.reason}"
        return self.reason


Side = tuple[str, str]  # (variant, caption_mode)


@dataclass(kw_only=True)
class Comparison:
    """Δ = first − second for one metric. Once the whole family is known (`adjust_family`): `holm_p`, the
    Holm step-down interval `adjusted` and `significant` (the verdict: the adjusted interval excludes 0)."""

    metric: str
    first: Side
    second: Side
    result: PairedDifference | Missing
    holm_p: float = math.nan
    adjusted: PairedDifference | None = None
    significant: bool = False


class Analysis:
    """Cached statistics for one run under one `StatsSettings`."""

    def __init__(self, run: RunData, settings: StatsSettings) -> None:
        self.run = run
        self.settings = settings
        self._means: dict[tuple[str, str, str, str | None], BootstrapCI | Missing] = {}

    @property
    def main_mode(self) -> str:
        """The caption mode of the main tables: json when scored, else the first mode with scores."""
        modes = self.run.scores.caption_modes() or self.run.caption_modes or ["json"]
        return "json" if "json" in modes else modes[0]

    def metric_issue(self, metric: str, variant: str) -> Missing | None:
        info = self.run.metrics.get(metric)
        if info is None:
            return Missing("not listed in metrics.json")
        if not info.available:
            return Missing(info.reason or "no reason recorded in metrics.json")
        if info.reference is not None:
            if info.reference not in self.run.variants:
                return Missing(
                    f"fidelity vs reference unavailable: the run has no reference variant {info.reference!r}"
                )
            if variant == info.reference:
                return Missing("reference", kind="reference")
        return None

    @property
    def psnr_ceiling(self) -> float:
        """The PSNR given to a prompt whose images are all identical to the reference (one-step difference)."""
        return psnr_ceiling_db(*(self.run.image_size or DEFAULT_SIZE))

    @property
    def block_checked(self) -> bool:
        """True when the run was scored with the blocked check (metrics.json lists it as available)."""
        info = self.run.metrics.get(BLOCKED)
        return info is not None and info.available

    def aggregate(self, metric: str) -> Aggregate:
        """How a prompt's seeds combine: the mean, or for PSNR the PSNR of the mean MSE."""
        if metric in PSNR_METRICS:
            ceiling = self.psnr_ceiling
            return lambda values: psnr_unit_values(values, ceiling)
        return unit_means

    def observations(self, variant: str, mode: str, metric: str, category: str | None = None) -> dict:
        """The metric's scores that enter the analysis: blocked images (and blocked references) left out."""
        info = self.run.metrics.get(metric)
        reference = info.reference if info is not None else None
        unblocked = metric != BLOCKED
        return self.run.scores.observations(
            variant, mode, metric, category, unblocked=unblocked, reference=reference
        )

    def unit_values(self, variant: str, metric: str, mode: str, category: str | None = None) -> dict:
        """{prompt_id: value} after blocked images are left out and seeds are combined."""
        return self.aggregate(metric)(self.observations(variant, mode, metric, category))

    def mean(
        self, variant: str, metric: str, mode: str, category: str | None = None
    ) -> BootstrapCI | Missing:
        key = (variant, metric, mode, category)
        if key not in self._means:
            issue = self.metric_issue(metric, variant)
            if issue is not None:
                self._means[key] = issue
            else:
                per_prompt = self.unit_values(variant, metric, mode, category)
                if not per_prompt:
                    self._means[key] = Missing("no scores", kind="empty")
                else:
                    self._means[key] = mean_ci(np.fromiter(per_prompt.values(), float), **self._kw())
        return self._means[key]

    def common_units(self, variants: list[str], metric: str, mode: str) -> tuple[list[str], np.ndarray]:
        """Prompts scored for every variant, and the [len(variants), n] matrix of their per-prompt values."""
        values = [self.unit_values(v, metric, mode) for v in variants]
        units = [u for u in values[0] if all(u in other for other in values[1:])] if values else []
        return units, np.array([[row[u] for u in units] for row in values], dtype=np.float64)

    def paired(self, metric: str, first: Side, second: Side, category: str | None = None) -> Comparison:
        for variant, _mode in (first, second):
            issue = self.metric_issue(metric, variant)
            if issue is not None:
                return Comparison(metric=metric, first=first, second=second, result=issue)
        a = self.observations(first[0], first[1], metric, category)
        b = self.observations(second[0], second[1], metric, category)
        _units, am, bm = paired_unit_means(a, b, self.aggregate(metric))
        if am.size == 0:
            result: PairedDifference | Missing = Missing("no prompt scored for both", kind="empty")
        else:
            result = paired_difference(am, bm, **self._kw())
        return Comparison(metric=metric, first=first, second=second, result=result)

    def _kw(self) -> dict:
        s = self.settings
        return {
            "n_resamples": s.n_resamples,
            "seed": s.seed,
            "confidence_level": s.confidence_level,
            "method": s.method,
        }


def adjust_family(comparisons: list[Comparison], confidence_level: float) -> tuple[int, float]:
    """Holm over the family of comparisons that have a result: the adjusted p-values, and the verdicts from Holm
    step-down intervals (`ditq.stats.holm_intervals`). Returns (family size m, the adjusted intervals' level)."""
    tested = [c for c in comparisons if isinstance(c.result, PairedDifference)]
    adjusted = holm_adjust([c.result.p_value for c in tested]) if tested else []
    for c, p in zip(tested, adjusted, strict=True):
        c.holm_p = float(p)
    steps = holm_intervals([c.result for c in tested], confidence_level)
    for c, interval, rejected in zip(tested, steps.intervals, steps.rejected, strict=True):
        c.adjusted = interval
        c.significant = rejected
    return len(tested), steps.level
