"""Side-by-side image grids: one prompt and seed, every variant in a column, one band per caption mode.

Each band is a row of images and, under it, a row of difference maps against the reference variant's image of
the same prompt, seed and caption mode: per pixel the mean over RGB of |image − reference| (0–255), drawn with
the magma colour map on one scale for the whole grid (printed in the row label), with each map's mean and
maximum under it. Images smaller than a tile are enlarged by a whole factor with nearest-neighbour sampling, so
every generated pixel stays a sharp square (the tiny model's 64-pixel images would blur under bilinear
scaling); larger images are reduced with Lanczos.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

_LABEL_H = 28  # column labels
_STAT_H = 20  # the line under a difference map
_PAD = 8
_ROW_LABEL_W = 96
_BACKGROUND = (236, 238, 242)
_INK = (29, 36, 48)
_MUTED = (110, 118, 130)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def read_rgb(path: Path | None) -> np.ndarray | None:
    """uint8 [H, W, 3], or None when the file is missing or unreadable."""
    if path is None or not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError as exc:
        log.warning("cannot read image %s: %s", path, exc)
        return None


def fit_tile(pixels: np.ndarray, size: int) -> Image.Image:
    """An image scaled into a size x size tile: a whole-number nearest-neighbour enlargement when it fits at
    least once, else a Lanczos reduction; centred on a grey tile."""
    im = Image.fromarray(pixels)
    factor = size // max(im.width, im.height)
    if factor >= 1:
        im = im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
    else:
        scale = size / max(im.width, im.height)
        shape = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(shape, Image.Resampling.LANCZOS)
    tile = Image.new("RGB", (size, size), _BACKGROUND)
    tile.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return tile


def _text_tile(size: int, text: str) -> Image.Image:
    tile = Image.new("RGB", (size, size), _BACKGROUND)
    ImageDraw.Draw(tile).text((size // 2, size // 2), text, fill=_MUTED, font=_font(14), anchor="mm")
    return tile


def abs_difference(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mean over RGB of |image − reference|: float64 [H, W] in 0–255 (computed in float64, no uint8 wrap)."""
    return np.abs(image.astype(np.float64) - reference.astype(np.float64)).mean(axis=2)


def difference_scale(diffs: list[np.ndarray]) -> float:
    """The value drawn brightest: the 99th percentile over every map, at least 8, rounded up to a step of 8."""
    if not diffs:
        return 8.0
    top = max(float(np.percentile(d, 99)) for d in diffs)
    return float(min(256, max(8, 8 * math.ceil(top / 8))))


def colorize(diff: np.ndarray, vmax: float) -> np.ndarray:
    """float [H, W] -> uint8 [H, W, 3] through matplotlib's magma colour map, 0 -> black, vmax and above -> top."""
    from matplotlib import colormaps

    lut = (colormaps["magma"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    index = np.clip(np.rint(diff / vmax * 255), 0, 255).astype(np.intp)
    return lut[index]


@dataclass(frozen=True)
class GridBand:
    """One caption mode's row: the label and each column's image path (None where there is none)."""

    label: str
    paths: list[Path | None]


@dataclass(frozen=True)
class GridResult:
    """What `compose_grid` drew: the file, the common difference scale, and mean |Δ| per (band, column)."""

    path: Path
    scale: float
    mean_difference: dict[tuple[int, int], float]


def compose_grid(
    columns: list[str],
    bands: list[GridBand],
    out_path: Path,
    *,
    reference: int | None = 0,
    tile_size: int = 256,
) -> GridResult:
    """Write the grid: a label row, then per band a row of images and a row of difference maps against column
    `reference` (no difference row when `reference` is None)."""
    images = [[read_rgb(p) for p in band.paths] for band in bands]
    diffs: dict[tuple[int, int], np.ndarray] = {}
    for b, row in enumerate(images):
        ref = row[reference] if reference is not None else None
        for c, pixels in enumerate(row):
            if c != reference and ref is not None and pixels is not None and pixels.shape == ref.shape:
                diffs[(b, c)] = abs_difference(pixels, ref)
    scale = difference_scale(list(diffs.values()))
    band_h = tile_size + _PAD + ((tile_size + _STAT_H + _PAD) if reference is not None else 0)
    width = _ROW_LABEL_W + len(columns) * (tile_size + _PAD)
    canvas = Image.new("RGB", (width, _LABEL_H + len(bands) * band_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font, small = _font(15), _font(12)
    for c, label in enumerate(columns):
        x = _ROW_LABEL_W + c * (tile_size + _PAD)
        draw.text((x + tile_size // 2, _LABEL_H // 2), label, fill=_INK, font=font, anchor="mm")
    for b, band in enumerate(bands):
        y = _LABEL_H + b * band_h
        words = band.label.split(" ", 1)  # "JSON caption" on two lines, to fit the margin
        for k, word in enumerate(words):
            draw.text((_PAD, y + tile_size // 2 + 19 * (k - (len(words) - 1) / 2)), word, fill=_INK, font=font,
                      anchor="lm")  # fmt: skip
        dy = y + tile_size + _PAD
        if reference is not None:
            draw.text((_PAD, dy + tile_size // 2 - 9), f"|Δ| vs {columns[reference]}", fill=_INK, font=small)
            draw.text((_PAD, dy + tile_size // 2 + 9), f"0–{scale:g} (magma)", fill=_MUTED, font=small)
        for c, pixels in enumerate(images[b]):
            x = _ROW_LABEL_W + c * (tile_size + _PAD)
            tile = fit_tile(pixels, tile_size) if pixels is not None else _text_tile(tile_size, "missing")
            canvas.paste(tile, (x, y))
            if reference is None:
                continue
            if c == reference:
                canvas.paste(_text_tile(tile_size, "reference"), (x, dy))
                continue
            diff = diffs.get((b, c))
            if diff is None:
                why = "no image" if pixels is None or images[b][reference] is None else "size differs"
                canvas.paste(_text_tile(tile_size, why), (x, dy))
                continue
            canvas.paste(fit_tile(colorize(diff, scale), tile_size), (x, dy))
            stat = "identical" if not diff.any() else f"mean {diff.mean():.2f} · max {diff.max():.0f}"
            draw.text((x + tile_size // 2, dy + tile_size + _STAT_H // 2), stat, fill=_MUTED, font=small,
                      anchor="mm")  # fmt: skip
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(out_path)
    means = {key: float(d.mean()) for key, d in diffs.items()}
    return GridResult(path=out_path, scale=scale, mean_difference=means)
