"""Seconds per denoising step from manifest.jsonl, measured after the warm-up, with their spread.

A manifest record may carry `step_s` (the seconds of each denoising step of that image, the transformer calls of
both guidance branches included) and `warmup` (true for the first image a process generated with a variant,
which pays one-time costs: loading, allocator growth, kernel compilation). The report's speed of a variant is the
median over every step of its non-warm-up images, each image's first step left out (it also pays for caches
the later steps reuse), with the interquartile range as the spread. Records without `step_s` (runs written
before ditq recorded it) fall back to the wall-clock seconds per image, warm-up images left out likewise.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ditq.report.document import Cell
from ditq.report.formatting import fmt_interval, fmt_num


@dataclass(frozen=True, kw_only=True)
class Timing:
    """One variant's speed: `unit` "step" (from step_s) or "image" (from wall_s).

    median, q1, q3: seconds; n: steps (or images) pooled; images: images they came from; warmup_left_out:
    warm-up images not counted; all_warmup: every image was a warm-up, so they are counted after all.
    """

    unit: str
    median: float
    q1: float
    q3: float
    n: int
    images: int
    warmup_left_out: int
    all_warmup: bool = False


def _numbers(value: Any) -> list[float]:
    if not isinstance(value, list):
        return []
    return [float(x) for x in value if isinstance(x, int | float) and not isinstance(x, bool) and x >= 0]


def _summary(values: list[float], unit: str, images: int, left_out: int, all_warmup: bool) -> Timing:
    arr = np.asarray(values, dtype=np.float64)
    q1, median, q3 = np.percentile(arr, [25, 50, 75])
    return Timing(
        unit=unit, median=float(median), q1=float(q1), q3=float(q3), n=arr.size, images=images,
        warmup_left_out=left_out, all_warmup=all_warmup,
    )  # fmt: skip


def variant_timings(manifest: list[dict[str, Any]]) -> dict[str, Timing]:
    """{variant: Timing} for every variant with step_s (else wall_s) in its manifest records."""
    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in manifest:
        by_variant[str(record.get("variant"))].append(record)
    out: dict[str, Timing] = {}
    for variant, records in by_variant.items():
        timed = [r for r in records if _numbers(r.get("step_s"))]
        unit = "step"
        if not timed:
            timed = [r for r in records if _numbers([r.get("wall_s")])]
            unit = "image"
        if not timed:
            continue
        warm = [r for r in timed if r.get("warmup") is True]
        kept = [r for r in timed if r.get("warmup") is not True] or timed
        all_warmup = len(kept) == len(warm) > 0
        values: list[float] = []
        for r in kept:
            if unit == "step":
                steps = _numbers(r.get("step_s"))
                values += steps[1:] if len(steps) > 1 else steps
            else:
                values += _numbers([r.get("wall_s")])
        left_out = 0 if all_warmup else len(warm)
        out[variant] = _summary(values, unit, len(kept), left_out, all_warmup)
    return out


def speed_unit(timings: dict[str, Timing]) -> str | None:
    """ "step" when every timed variant has per-step times, "image" when any falls back to wall-clock."""
    if not timings:
        return None
    return "step" if all(t.unit == "step" for t in timings.values()) else "image"


def speed_header(unit: str, tiny: bool) -> Cell:
    what = "denoising step" if unit == "step" else "image (wall clock)"
    title = (
        f"median seconds per {what} after the warm-up (each process's first image of a variant"
        + (" and each image's first step" if unit == "step" else "")
        + " left out); below it the interquartile range"
    )
    sub = "tiny model: checks the code path, not a speed" if tiny else None
    return Cell(f"s / {'step' if unit == 'step' else 'image'}", title=title, sub=sub)


def speed_cell(timing: Timing | None, unit: str, reference: Timing | None = None) -> Cell:
    """Median on the first line, the IQR below it; the tooltip says what was pooled."""
    if timing is None or timing.unit != unit:
        return Cell("not recorded", title="manifest.jsonl has no timing of this kind for the variant")
    what = "steps" if unit == "step" else "images"
    title = f"median of {timing.n} {what} from {timing.images} image(s)"
    if timing.all_warmup:
        title += "; every image was a process's first of this variant, so warm-up images are included"
    elif timing.warmup_left_out:
        title += f"; {timing.warmup_left_out} warm-up image(s) left out"
    if reference is not None and reference is not timing and reference.median > 0:
        title += f"; {timing.median / reference.median:.2f}× the reference's time"
    sub = f"IQR {fmt_interval(timing.q1, timing.q3)}" if timing.n > 1 else "one value"
    return Cell(fmt_num(timing.median), sub=sub, title=title, css="num")
