"""The metric contract every registered metric follows, and the `METRICS` registry.

A metric is a small object with a few class attributes and a batched `score`:

- `name`: the registry key and the `metric` column of scores.csv.
- `higher_is_better`: how to read a difference between variants.
- `reference`: `"fp8"` for a metric that compares an image with the reference variant's image of the same
  prompt, seed and caption mode (fidelity), `None` for a standalone metric.
- `family`: `"fidelity"`, `"text"` or `"preference"`; or `"check"` for a per-image check that is not a quality
  score (`blocked`: the image is the safety-filter placeholder), which `ditq eval` runs with every metric set.
- `needs_texts`: the metric scores the ground-truth strings of a prompt; prompts with none get no score.

`status()` says whether the metric can run here (weights found, packages importable) and why not, without
loading anything heavy. `load(device)` builds the models once; `score(items)` returns one float per item, or
`None` where the item has nothing to score. A metric that is unavailable never produces a number.
`weight_files()` lists the files `load` reads (model weights), so `ditq eval` can record their sha256 and refuse
unexpected ones (`--expect-hash`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ditq.registry import Registry

FAMILIES = ("fidelity", "text", "preference", "check")


@dataclass(frozen=True)
class MetricStatus:
    """Whether a metric can run; `reason` says what is missing when it cannot."""

    available: bool
    reason: str | None = None

    @classmethod
    def ok(cls) -> MetricStatus:
        return cls(True, None)

    @classmethod
    def missing(cls, reason: str) -> MetricStatus:
        return cls(False, reason)


@dataclass(frozen=True)
class ScoreItem:
    """One image to score and what it is scored against.

    image: uint8 [H, W, 3] RGB.
    reference: uint8 [H, W, 3] RGB, the reference variant's image (fidelity metrics only).
    prompt: the prompt text (preference metrics).
    texts: the strings the image should render (text metrics).
    """

    image: np.ndarray
    prompt: str = ""
    texts: tuple[str, ...] = ()
    reference: np.ndarray | None = field(default=None, repr=False)


class Metric:
    """Base class: subclasses set the class attributes and implement `score`."""

    name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    family: ClassVar[str]
    reference: ClassVar[str | None] = None
    needs_texts: ClassVar[bool] = False

    def status(self) -> MetricStatus:
        return MetricStatus.ok()

    def model(self) -> str | None:
        """What the metric runs on (a model id, a weights file), for metrics.json; None for pure formulas."""
        return None

    def weight_files(self) -> list[Path]:
        """The weight files `load` would read, as found now ([] for formulas or when nothing is found)."""
        return []

    def load(self, device: str = "cpu") -> None:
        """Build whatever `score` needs; raises `CheckpointError` when weights cannot be read."""

    def unload(self) -> None:
        """Drop loaded models so the next metric has the memory."""

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        """The metrics.json entry of this metric (without availability)."""
        return {
            "higher_is_better": self.higher_is_better,
            "reference": self.reference,
            "family": self.family,
            "model": self.model(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


METRICS: Registry[Metric] = Registry("metric")


def check_pair(item: ScoreItem, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The image and reference of a fidelity item as uint8 [H, W, 3] arrays of one shape."""
    if item.reference is None:
        raise ValueError(f"{name} compares against a reference image; the item has none")
    a, b = np.asarray(item.image), np.asarray(item.reference)
    if a.shape != b.shape or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(
            f"{name}: image {a.shape} and reference {b.shape} must both be [H, W, 3] of one size"
        )
    return a, b
