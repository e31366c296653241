"""Text rendering: does the image show the strings the prompt asked for? PP-OCR through rapidocr.

One OCR pass per image (PP-OCRv6 detection + recognition models that ship inside the rapidocr wheel, on the
CPU through onnxruntime); its lines, in the engine's reading order (top to bottom, then left to right), are
normalized and concatenated into one string T. Each ground-truth string g of the prompt is normalized the
same way and scored against T:

- `ocr_exact`: 1.0 if g occurs in T as a substring, else 0.0.
- `ocr_ned` (normalized edit distance): min over substrings s of T of  lev(g, s) / max(len(g), len(s)),
  with lev the Levenshtein distance (unit cost insert / delete / substitute). 0 means g is rendered exactly,
  1.0 that nothing of it was found (the empty substring always gives 1.0, so the value lies in [0, 1]).
  A substring, not the whole OCR text, because an image holds other text than g.

An image's value is the mean over its strings. Prompts without strings get no score (no row), not zero.

Normalization, applied to both sides:
1. Unicode NFKC: compatibility forms (full-width letters, ligatures "ﬁ", superscripts) become plain ones,
   and composed / decomposed accents compare equal.
2. casefold: stylized renderings (small caps, all caps titles) are common and OCR often confuses case; we
   score whether the right characters are legible, not their case.
3. Drop every whitespace, control / format character and punctuation (Unicode category P*) except
   `% & # @`; keep letters (with their accents: "Cafe" for "Café" is a rendering error), marks, digits,
   symbols (S*: $ € + ©) and those four, which are content on signs ("SALE 50%", "R&D", "#1").
   PP-OCR's space and punctuation output depends on letter spacing and on the recognizer's vocabulary more
   than on the rendering (it often merges words, or reads "·" as "."), so counting those characters would
   measure the OCR model, not the diffusion model.
Because whitespace is dropped, a string rendered across two lines is still found in T.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from ditq.errors import DitqError
from ditq.metrics.base import METRICS, Metric, MetricStatus, ScoreItem

logger = logging.getLogger(__name__)


# Punctuation that is content rather than layout, kept by `normalize_text`.
KEPT_PUNCTUATION = frozenset("%&#@")


def normalize_text(text: str) -> str:
    """NFKC, casefold, then keep letters, marks, digits, symbols and `% & # @` (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LMNS" or ch in KEPT_PUNCTUATION)


def substring_edit_distance(needle: str, haystack: str) -> float:
    """min over substrings s of `haystack` of lev(needle, s) / max(len(needle), len(s)); 0.0 for an empty needle.

    All start positions are advanced together: row i of the table is the Levenshtein column of `needle`
    against haystack[i:j] as j grows, so the cost is len(haystack) vectorized steps of [n, m + 1].
    """
    m, n = len(needle), len(haystack)
    if m == 0:
        return 0.0
    best = 1.0  # the empty substring
    if n == 0:
        return best
    codes = np.array([ord(c) for c in needle], dtype=np.int64)
    ks = np.arange(m + 1, dtype=np.int64)
    # dist[i, k] = lev(needle[:k], haystack[i:j]) for the current end j (rows i > j not started yet).
    dist = np.tile(ks, (n, 1))
    for j, ch in enumerate(haystack):
        rows = dist[: j + 1]
        cost = (codes != ord(ch)).astype(np.int64)
        step = np.empty_like(rows)
        step[:, 0] = rows[:, 0] + 1
        step[:, 1:] = np.minimum(rows[:, 1:] + 1, rows[:, :-1] + cost)
        # Insertions within the column: new[k] = min over l <= k of step[l] + (k - l).
        rows = np.minimum.accumulate(step - ks, axis=1) + ks
        dist[: j + 1] = rows
        lengths = j + 1 - np.arange(j + 1)
        ratio = rows[:, m] / np.maximum(lengths, m)
        best = min(best, float(ratio.min()))
        if best == 0.0:
            break
    return best


class OcrReader:
    """One lazily built rapidocr engine shared by the text metrics.

    Results are cached by image content (a few short strings each), so `ocr_exact` and `ocr_ned` read an image
    once between them.
    """

    def __init__(self, cache_size: int = 100_000) -> None:
        self._engine = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, list[str]] = OrderedDict()
        self._cache_size = cache_size

    @staticmethod
    def status() -> MetricStatus:
        import importlib.util

        for module in ("rapidocr", "onnxruntime"):
            if importlib.util.find_spec(module) is None:
                return MetricStatus.missing(f"{module} is not installed (pip install rapidocr onnxruntime)")
        return MetricStatus.ok()

    def engine(self):
        with self._lock:
            if self._engine is None:
                try:
                    from rapidocr import RapidOCR
                except ImportError as exc:
                    raise DitqError(f"OCR needs rapidocr and onnxruntime: {exc}") from None
                self._engine = RapidOCR(params={"Global.log_level": "error"})
            return self._engine

    def read(self, image: np.ndarray) -> list[str]:
        """image: uint8 [H, W, 3] RGB -> the recognized lines in reading order."""
        image = np.ascontiguousarray(image, dtype=np.uint8)
        key = hashlib.blake2b(image.tobytes(), digest_size=16, person=str(image.shape).encode()[:16]).digest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        # rapidocr takes numpy input as OpenCV's BGR.
        result = self.engine()(np.ascontiguousarray(image[..., ::-1]))
        lines = [str(t) for t in (result.txts or ())]
        self._cache[key] = lines
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return lines


OCR = OcrReader()


def text_scores(texts: Sequence[str], lines: Sequence[str]) -> tuple[float, float] | None:
    """Mean exact match and mean normalized edit distance of `texts` against OCR `lines`; None if no texts.

    Strings that normalize to nothing (punctuation only) are skipped.
    """
    found = normalize_text("".join(lines))
    wanted = [g for g in (normalize_text(t) for t in texts) if g]
    if not wanted:
        return None
    exact = [1.0 if g in found else 0.0 for g in wanted]
    ned = [0.0 if e else substring_edit_distance(g, found) for g, e in zip(wanted, exact, strict=True)]
    return float(np.mean(exact)), float(np.mean(ned))


class _OcrMetric(Metric):
    family = "text"
    needs_texts = True
    _index: int

    def __init__(self, reader: OcrReader | None = None) -> None:
        self.reader = reader or OCR

    def status(self) -> MetricStatus:
        return self.reader.status()

    def model(self) -> str | None:
        try:
            from importlib.metadata import version

            return f"rapidocr {version('rapidocr')} (PP-OCRv6 small det + rec, onnxruntime CPU)"
        except Exception:
            return "rapidocr (PP-OCR)"

    def load(self, device: str = "cpu") -> None:
        self.reader.engine()

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        out: list[float | None] = []
        for item in items:
            if not item.texts:
                out.append(None)
                continue
            pair = text_scores(item.texts, self.reader.read(item.image))
            out.append(None if pair is None else pair[self._index])
        return out


class OcrExact(_OcrMetric):
    """Fraction of the prompt's strings found verbatim (after normalization) in the OCR text."""

    name = "ocr_exact"
    higher_is_better = True
    _index = 0


class OcrEditDistance(_OcrMetric):
    """Mean normalized edit distance between the prompt's strings and their best-matching OCR substring."""

    name = "ocr_ned"
    higher_is_better = False
    _index = 1


METRICS.add(OcrExact.name, OcrExact())
METRICS.add(OcrEditDistance.name, OcrEditDistance())
