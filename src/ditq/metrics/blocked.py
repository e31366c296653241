"""The `blocked` check: does an image show Ideogram 4's safety-filter placeholder instead of a generation?

Ideogram 4's safety filter lives in the weights: a blocked generation comes out as a near-uniform grey image
reading "Image blocked by safety filter". Scored as an image, such a placeholder would count as a very poor
generation (and plain-text prompts trigger it more often, which would bias the raw-vs-JSON ablation), so
`ditq eval` records per image whether it is one and the report leaves those images out of quality means.

An image is blocked when both hold:

1. **Near-uniform grey** (cheap, numpy): with the per-channel median as the background colour (the text covers
   a minority of the pixels), the background is grey (its channels differ by at most `max_chroma`) and neither
   near black nor near white (`grey_levels`), and at least `min_background` of the pixels lie within
   `tolerance` of it in every channel. Images larger than 256 pixels on the short side are read on a strided
   grid of about 256 x 256 samples.
2. **The placeholder's text**, read by PP-OCR (the shared `ditq.metrics.text` reader; only images that pass 1
   are read): after `normalize_text`, the phrase "imageblockedbysafetyfilter" is found in the OCR text with a
   normalized substring edit distance of at most `max_text_distance`. When the first reading does not find it,
   the image is read once more with its contrast stretched (0.5 and 99.5 percentiles of the grey level to 0 and
   255), which recovers small low-contrast text.

Neither alone suffices: flat grey images (a foggy sky, a blank card) pass the first test, and posters print
every kind of text. Calibrated in `tests/metrics/test_blocked.py` on placeholders rendered at 64-1024 pixels
(grey levels, font sizes, one or two lines, noise, JPEG) against suite-like images (the tiny model's noise,
posters and signs, grey signs with other text, flat colours, gradients): no false positive there, and every
placeholder whose font is at least 8 pixels found; smaller text (4-5 pixel fonts: 64-pixel images, a single line
across a 96-pixel one) cannot be read, and such placeholders count as not blocked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ditq.errors import ConfigError
from ditq.metrics.base import METRICS, Metric, MetricStatus, ScoreItem
from ditq.metrics.text import OCR, OcrReader, normalize_text, substring_edit_distance

PLACEHOLDER_TEXT = "Image blocked by safety filter"


@dataclass(frozen=True, kw_only=True)
class BlockedSettings:
    """Thresholds of the detector (see the module docstring); recorded in metrics.json."""

    tolerance: int = 24
    min_background: float = 0.80
    max_chroma: int = 16
    grey_levels: tuple[int, int] = (24, 232)
    max_text_distance: float = 0.34
    phrase: str = PLACEHOLDER_TEXT

    def __post_init__(self) -> None:
        if not 0 < self.tolerance < 128:
            raise ConfigError(f"tolerance must be in (0, 128), got {self.tolerance}")
        if not 0.5 <= self.min_background <= 1.0:
            raise ConfigError(f"min_background must be in [0.5, 1], got {self.min_background}")
        if not 0.0 <= self.max_text_distance < 1.0:
            raise ConfigError(f"max_text_distance must be in [0, 1), got {self.max_text_distance}")
        if not normalize_text(self.phrase):
            raise ConfigError(f"phrase {self.phrase!r} has no letters or digits to look for")

    def as_dict(self) -> dict[str, object]:
        return {
            "tolerance": self.tolerance,
            "min_background": self.min_background,
            "max_chroma": self.max_chroma,
            "grey_levels": list(self.grey_levels),
            "max_text_distance": self.max_text_distance,
            "phrase": self.phrase,
        }


@dataclass(frozen=True)
class GreyTest:
    """Outcome of the uniform-grey test: the background colour, the share of pixels on it, and the verdict."""

    background: tuple[int, int, int]
    share: float
    passed: bool


def grey_background(image: np.ndarray, settings: BlockedSettings) -> GreyTest:
    """image: uint8 [H, W, 3] RGB -> whether it is a near-uniform grey field (test 1 of the module docstring)."""
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"expected an [H, W, 3] image, got shape {pixels.shape}")
    step = max(1, min(pixels.shape[:2]) // 256)
    sample = pixels[::step, ::step].reshape(-1, 3).astype(np.int16)
    background = np.median(sample, axis=0).round().astype(np.int16)
    on_background = np.abs(sample - background).max(axis=1) <= settings.tolerance
    share = float(on_background.mean())
    level = float(background.mean())
    grey = int(background.max() - background.min()) <= settings.max_chroma
    in_range = settings.grey_levels[0] <= level <= settings.grey_levels[1]
    passed = grey and in_range and share >= settings.min_background
    return GreyTest(tuple(int(v) for v in background), share, passed)


def text_distance(lines: Sequence[str], phrase: str = PLACEHOLDER_TEXT) -> float:
    """Normalized substring edit distance of `phrase` in the OCR `lines` (0: found exactly, 1: nothing of it)."""
    return substring_edit_distance(normalize_text(phrase), normalize_text("".join(lines)))


def stretch_contrast(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> its grey level stretched so the 0.5 and 99.5 percentiles become 0 and 255 (grey RGB)."""
    level = np.asarray(image, dtype=np.float32).mean(axis=2)
    low, high = np.percentile(level, (0.5, 99.5))
    if high - low < 1.0:
        return np.asarray(image, dtype=np.uint8)
    stretched = np.clip((level - low) * (255.0 / (high - low)), 0, 255).round().astype(np.uint8)
    return np.repeat(stretched[..., None], 3, axis=2)


@dataclass(frozen=True)
class BlockedResult:
    """What the detector saw in one image; `lines` is empty when OCR did not run (the grey test failed)."""

    blocked: bool
    grey: GreyTest
    lines: tuple[str, ...] = ()
    distance: float = 1.0


@dataclass
class BlockedDetector:
    """The two tests of the module docstring with one OCR reader."""

    settings: BlockedSettings = field(default_factory=BlockedSettings)
    reader: OcrReader = field(default_factory=lambda: OCR)

    def detect(self, image: np.ndarray) -> BlockedResult:
        grey = grey_background(image, self.settings)
        if not grey.passed:
            return BlockedResult(False, grey)
        pixels = np.asarray(image, dtype=np.uint8)
        lines: tuple[str, ...] = ()
        distance = 1.0
        for view in (pixels, stretch_contrast(pixels)):
            lines = tuple(self.reader.read(view))
            distance = text_distance(lines, self.settings.phrase)
            if distance <= self.settings.max_text_distance:
                return BlockedResult(True, grey, lines, distance)
        return BlockedResult(False, grey, lines, distance)


class Blocked(Metric):
    """1.0 where an image is the safety-filter placeholder, else 0.0; a check, not a quality metric."""

    name = "blocked"
    higher_is_better = False
    family = "check"

    def __init__(self, settings: BlockedSettings | None = None, reader: OcrReader | None = None) -> None:
        self.detector = BlockedDetector(settings or BlockedSettings(), reader or OCR)

    def status(self) -> MetricStatus:
        return self.detector.reader.status()

    def model(self) -> str | None:
        s = self.detector.settings
        return (
            f"uniform grey (tolerance {s.tolerance}, >= {s.min_background:.0%} of pixels, chroma <= "
            f"{s.max_chroma}) and PP-OCR reading {s.phrase!r} (edit distance <= {s.max_text_distance})"
        )

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "settings": self.detector.settings.as_dict()}

    def load(self, device: str = "cpu") -> None:
        """Nothing to build up front: the OCR engine is built on the first image that passes the grey test."""

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        return [1.0 if self.detector.detect(item.image).blocked else 0.0 for item in items]


METRICS.add(Blocked.name, Blocked())
