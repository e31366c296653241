"""The `blocked` check: calibrated on rendered safety-filter placeholders against suite-like images.

Precision and recall are recorded as test properties and printed in pytest's terminal summary
("blocked-image detector calibration"), so they appear in every test run's output, not only with -s.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from ditq.metrics import evaluate_run
from ditq.metrics.blocked import PLACEHOLDER_TEXT, Blocked, BlockedDetector, BlockedSettings, grey_background

FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansCondensed.ttf")
SIZES = (64, 96, 128, 192, 256, 384, 512, 768, 1024)


def _fit_font(draw: ImageDraw.ImageDraw, text: str, font: str, width: float) -> ImageFont.FreeTypeFont:
    size = 4
    while draw.multiline_textbbox((0, 0), text, font=ImageFont.truetype(font, size + 1))[2] <= width:
        size += 1
    return ImageFont.truetype(font, size)


def _finish(image: Image.Image, rng: np.random.Generator, noise: float, jpeg: int | None) -> np.ndarray:
    pixels = np.asarray(image).astype(np.float64)
    if noise:
        pixels = pixels + rng.normal(0.0, noise, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    if jpeg:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=jpeg)
        image = Image.open(buffer).convert("RGB")
    return np.asarray(image)


def render_sign(size, background, color, text, font, width_share, rng, noise=0.0, jpeg=None, font_px=None):
    """`text` centred on a flat `background`, as wide as `width_share` of the image; `font_px` (a list) receives
    the font size used."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    fitted = _fit_font(draw, text, font, width_share * image.width)
    if font_px is not None:
        font_px.append(fitted.size)
    centre = (image.width / 2, image.height / 2)
    draw.multiline_text(centre, text, font=fitted, fill=color, anchor="mm", align="center")
    return _finish(image, rng, noise, jpeg)


def placeholders(rng: np.random.Generator) -> list[tuple[str, np.ndarray, int]]:
    """The placeholder in the variety one meets: sizes, grey levels, lighter or darker text, one or two lines,
    fonts, a little noise, JPEG artefacts. (name, image, font size in pixels)."""
    out = []
    for size in SIZES:
        for k in range(3):
            grey = int(rng.integers(70, 190))
            ink = int(np.clip(grey + rng.choice([-1, 1]) * rng.integers(50, 110), 0, 255))
            text = PLACEHOLDER_TEXT if rng.random() < 0.5 else "Image blocked\nby safety filter"
            noise, jpeg = float(rng.choice([0.0, 2.0, 5.0])), (None, 90, 70)[k]
            font, share = FONTS[int(rng.integers(len(FONTS)))], float(rng.uniform(0.45, 0.85))
            px: list[int] = []
            image = render_sign(size, (grey,) * 3, (ink,) * 3, text, font, share, rng, noise, jpeg, px)
            name = f"placeholder {size}px, grey {grey}, {text.count(chr(10)) + 1} line(s), font {px[0]} px"
            out.append((name, image, px[0]))
    return out


def ordinary_images(rng: np.random.Generator, tiny_images: list[np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """What a suite run produces otherwise, hard cases included: grey signs with other text, flat greys."""
    out = [(f"tiny model output {i}", image) for i, image in enumerate(tiny_images)]
    posters = [
        ((200, 30, 40), (255, 240, 200), "GRAND OPENING\nSaturday 10 am"),
        ((20, 60, 140), (255, 255, 255), "Café Noir · est. 1998"),
        ((250, 220, 60), (20, 20, 20), "SALE 50%"),
        ((30, 120, 60), (240, 240, 240), "Fresh Produce Market"),
        ((255, 255, 255), (0, 0, 0), "Image gallery\nopen daily"),
        ((10, 10, 10), (240, 200, 60), "NIGHT SHIFT"),
    ]
    for i, (background, ink, text) in enumerate(posters):
        size = (256, 512, 1024)[i % 3]
        out.append(
            (
                f"poster {text.splitlines()[0]!r}",
                render_sign(size, background, ink, text, FONTS[i % 4], 0.7, rng),
            )
        )
    grey_signs = [
        "ROAD BLOCKED", "SAFETY FIRST", "Filter coffee", "Image not available", "No entry\nby order",
        "Blocked drain", "Under construction", "SAFETY FILTER INSIDE",
    ]  # fmt: skip
    for i, text in enumerate(grey_signs):
        grey = int(rng.integers(80, 180))
        size = (256, 384, 512, 768)[i % 4]
        image = render_sign(size, (grey,) * 3, (min(grey + 90, 255),) * 3, text, FONTS[i % 4], 0.6, rng, 3.0)
        out.append((f"grey sign {text.splitlines()[0]!r}", image))
    for grey in (40, 90, 128, 128, 170, 220):  # flat greys: pass the grey test, then OCR finds nothing
        out.append((f"flat grey {grey}", _finish(Image.new("RGB", (512, 512), (grey,) * 3), rng, 2.0, 80)))
    for color in ((200, 40, 40), (40, 90, 200), (250, 250, 250)):
        out.append((f"flat colour {color}", np.full((256, 256, 3), color, dtype=np.uint8)))
    y, x = np.mgrid[0:384, 0:384] / 384.0
    for i in range(6):  # photo-like: smooth gradients with low-frequency texture, two of them grey
        texture = np.kron(rng.normal(0, 18, (12, 12)), np.ones((32, 32)))
        tint = np.array([1.0, 1.0, 1.0]) if i < 2 else rng.uniform(0.3, 1.0, 3)
        base = (60 + 120 * (0.6 * y + 0.4 * x))[..., None] * tint + texture[..., None]
        out.append((f"gradient {i}", np.clip(base, 0, 255).astype(np.uint8)))
    return out


@dataclass
class Outcome:
    name: str
    truth: bool
    blocked: bool
    size: int
    font_px: int = 0


@pytest.fixture(scope="module")
def tiny_images(tiny_pipe, tiny_settings) -> list[np.ndarray]:
    """Two outputs of the tiny random-weight model (its noise images), as a smoke-suite run produces them."""
    from ditq.models.sampling import generate

    return [np.asarray(generate(tiny_pipe, "a red fox in the snow", seed, tiny_settings)) for seed in (0, 1)]


@pytest.fixture(scope="module")
def calibration(tiny_images) -> list[Outcome]:
    rng = np.random.default_rng(20261201)
    detector = BlockedDetector()
    cases = [(n, True, im, px) for n, im, px in placeholders(rng)]
    cases += [(n, False, im, 0) for n, im in ordinary_images(rng, tiny_images)]
    return [
        Outcome(n, truth, detector.detect(im).blocked, min(im.shape[:2]), px) for n, truth, im, px in cases
    ]


def _rates(outcomes: list[Outcome]) -> tuple[float, float, int, int]:
    tp = sum(o.truth and o.blocked for o in outcomes)
    fp = sum(o.blocked and not o.truth for o in outcomes)
    positives = sum(o.truth for o in outcomes)
    precision = tp / (tp + fp) if tp + fp else 1.0
    return precision, tp / positives if positives else 1.0, tp, positives


def test_blocked_detector_calibration(calibration, record_property, calibration_log):
    precision, recall, tp, positives = _rates(calibration)
    readable = [o for o in calibration if not o.truth or o.font_px >= 8]
    _, recall_8px, tp_8px, pos_8px = _rates(readable)
    negatives = sum(not o.truth for o in calibration)
    fp = [o.name for o in calibration if o.blocked and not o.truth]
    missed = [o.name for o in calibration if o.truth and not o.blocked]
    lines = [
        f"{positives} rendered placeholders ({SIZES[0]}-{SIZES[-1]} px), {negatives} ordinary images",
        f"precision {precision:.3f} ({len(fp)} false positive(s)), recall {recall:.3f} ({tp}/{positives})",
        f"recall with text >= 8 px: {recall_8px:.3f} ({tp_8px}/{pos_8px})",
        "missed: " + ("; ".join(missed) or "none"),
    ]
    for size in SIZES:
        at = [o for o in calibration if o.truth and o.size == size]
        lines.append(f"  {size:>4} px: {sum(o.blocked for o in at)}/{len(at)} detected")
    calibration_log.extend(lines)
    record_property("blocked_precision", round(precision, 4))
    record_property("blocked_recall", round(recall, 4))
    record_property("blocked_recall_text_8px", round(recall_8px, 4))
    assert fp == []  # no suite-like image, grey signs and flat greys included, is taken for a placeholder
    assert recall_8px == 1.0, missed
    assert recall >= 0.75, missed  # 4-5 px fonts (64 px images, one line across 96 px) cannot be read


def test_grey_test_alone_is_not_enough(calibration):
    # Flat greys and grey signs pass the uniform-grey test; only the OCR reading tells them apart.
    settings = BlockedSettings()
    rng = np.random.default_rng(3)
    flat = _finish(Image.new("RGB", (256, 256), (128,) * 3), rng, 2.0, None)
    assert grey_background(flat, settings).passed and not BlockedDetector().detect(flat).blocked
    sign = render_sign(256, (120,) * 3, (210,) * 3, "SAFETY FIRST", FONTS[0], 0.6, rng)
    result = BlockedDetector().detect(sign)
    assert result.grey.passed and result.lines and not result.blocked and result.distance > 0.34


def test_grey_test_on_hand_made_images():
    settings = BlockedSettings()
    assert grey_background(np.full((64, 64, 3), 128, np.uint8), settings).passed
    assert not grey_background(np.full((64, 64, 3), (128, 100, 128), np.uint8), settings).passed  # tinted
    assert not grey_background(np.full((64, 64, 3), 250, np.uint8), settings).passed  # white page
    half = np.full((64, 64, 3), 128, np.uint8)
    half[:, :30] = 30  # two fields: the larger one (34 of 64 columns) is the background, too small a share
    test = grey_background(half, settings)
    assert not test.passed and test.background == (128, 128, 128) and test.share == pytest.approx(34 / 64)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        grey_background(np.zeros((4, 4)), settings)


def test_blocked_check_in_eval_flags_the_placeholder(tmp_path, write_jsonl):
    rng = np.random.default_rng(0)
    root = tmp_path / "run"
    prompts = [{"id": p, "prompt": "a sign", "category": "signage", "texts": []} for p in ("p0", "p1")]
    manifest = []
    for variant in ("fp8", "nf4"):
        for pid in ("p0", "p1"):
            blocked = variant == "nf4" and pid == "p1"
            if blocked:
                image = render_sign(
                    256, (128,) * 3, (230,) * 3, "Image blocked\nby safety filter", FONTS[0], 0.7, rng
                )
            else:
                image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            path = f"images/{variant}/raw/{pid}_s0.png"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / path)
            manifest.append(
                {"variant": variant, "prompt_id": pid, "seed": 0, "caption_mode": "raw", "path": path}
            )
    run = {"prompt_ids": ["p0", "p1"], "seeds": [0], "caption_modes": ["raw"], "reference_variant": "fp8"}
    (root / "run.json").write_text(json.dumps(run | {"variants": {"fp8": {}, "nf4": {}}}))
    write_jsonl(root / "prompts.jsonl", prompts)
    write_jsonl(root / "manifest.jsonl", manifest)
    result = evaluate_run(root, ["psnr"], progress=False)
    assert result.new_rows == {"blocked": 4, "psnr": 2}
    info = json.loads((root / "metrics.json").read_text())["metrics"]["blocked"]
    assert info["flagged"] == 1 and info["flagged_images"] == ["images/nf4/raw/p1_s0.png"]
    assert info["settings"] == BlockedSettings().as_dict() and info["higher_is_better"] is False
    rows = (root / "scores.csv").read_text().splitlines()
    assert "nf4,p1,0,raw,signage,blocked,1.0" in rows and "fp8,p1,0,raw,signage,blocked,0.0" in rows
    assert Blocked().score([]) == []
