"""Side-by-side image grids: one prompt and seed, every variant in a row, labelled (PIL PNGs)."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

log = logging.getLogger(__name__)

_LABEL_H = 28
_PAD = 8


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


def _thumbnail(path: Path | None, size: int) -> Image.Image:
    tile = Image.new("RGB", (size, size), (236, 238, 242))
    if path is None or not path.is_file():
        draw = ImageDraw.Draw(tile)
        draw.text((size // 2, size // 2), "missing", fill=(120, 126, 138), font=_font(14), anchor="mm")
        return tile
    try:
        with Image.open(path) as im:
            im = ImageOps.contain(im.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
            tile.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    except OSError as exc:
        log.warning("cannot read image %s: %s", path, exc)
    return tile


def compose_grid(tiles: list[tuple[str, Path | None]], out_path: Path, *, tile_size: int = 256) -> Path:
    """Write a one-row grid of (label, image path or None) to `out_path`; missing images show a grey tile."""
    n = len(tiles)
    width = _PAD + n * (tile_size + _PAD)
    height = _LABEL_H + tile_size + _PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(15)
    for k, (label, path) in enumerate(tiles):
        x = _PAD + k * (tile_size + _PAD)
        draw.text((x + tile_size // 2, _LABEL_H // 2), label, fill=(29, 36, 48), font=font, anchor="mm")
        canvas.paste(_thumbnail(path, tile_size), (x, _LABEL_H))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path, format="PNG")
    return out_path
