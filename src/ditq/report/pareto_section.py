"""The "Quality–memory Pareto plot" section: each variant's mean quality against its memory, the reference
variant included as the point the others are measured from.

Memory is by default the peak device memory of generating one image (`ditq.report.memory`: measured on CUDA, else
planned, each point labelled with its source); "resident" and "disk" are the conditional transformer's bytes.

For a standalone metric (preference, OCR) the reference is scored like any variant. For a fidelity metric
(measured against the reference image) the reference's value is the metric's ideal, exactly, by definition: it is
compared with itself (SSIM 1, LPIPS 0, PSNR of identical images, which the analysis caps at the PSNR of one 8-bit
step, as it does for every prompt whose images are identical). It then enters the frontier and its resampled
shares with that constant value, so a variant that uses more memory than the reference is dominated.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ditq.report.analysis import Analysis
from ditq.report.document import Cell, Figure, Paragraph, Section, Table
from ditq.report.formatting import arrow, ci_cell, memory_of, size_text
from ditq.report.inputs import PSNR_METRICS, MetricInfo
from ditq.report.memory import VariantMemory
from ditq.report.pareto import ParetoPoint, frontier_shares, plot_pareto
from ditq.stats import BootstrapCI

TITLE = "Quality–memory Pareto plot"
# memory kind: (axis label, what the explanation says x is)
MEMORY_KINDS = {
    "peak": ("Peak device memory per image", "peak device memory of generating one image (see Memory)"),
    "resident": ("Resident memory per transformer", "resident memory of the conditional transformer"),
    "disk": ("Bytes on disk per transformer", "bytes on disk of the conditional transformer"),
}
# A fidelity metric's value for an image compared with itself (PSNR's comes from the analysis' ceiling).
FIDELITY_IDEAL = {"ssim": 1.0, "lpips": 0.0}


def reference_ideal(analysis: Analysis, info: MetricInfo) -> tuple[float | None, bool]:
    """(the reference variant's value of fidelity metric `info`, whether it is off the plot's scale)."""
    if info.reference is None:
        return None, False
    if info.name in PSNR_METRICS:
        return analysis.psnr_ceiling, True
    return FIDELITY_IDEAL.get(info.name.lower()), False


def _memory_point(
    name: str, analysis: Analysis, memory: str, memories: dict[str, VariantMemory]
) -> tuple[int | None, str, str]:
    """(x in bytes or None, the source to print beside it, why there is none)."""
    if memory == "peak":
        peak = memories[name].peak
        return peak.bytes, peak.label, "peak device memory unknown: see Memory"
    return memory_of(analysis.run.variants[name], memory), "", "no transformer size in run.json"


def pareto_section(
    analysis: Analysis,
    out_dir: Path,
    info: MetricInfo | None,
    memory: str,
    memories: dict[str, VariantMemory],
) -> tuple[Section, Path | None]:
    run = analysis.run
    section = Section(TITLE, "pareto")
    (out_dir / "pareto.png").unlink(missing_ok=True)  # never leave a plot from an earlier build
    if info is None:
        section.add(Paragraph("No quality metric is available for this run, so there is no plot.", "note"))
        return section, None
    if not info.available:
        section.add(Paragraph(f"{info.name} is unavailable (see Unavailable metrics); no plot.", "note"))
        return section, None
    ideal, off_scale = reference_ideal(analysis, info)
    points: list[ParetoPoint] = []
    cells: list[Cell] = []
    skipped, names, sources = [], [], []
    for name in run.variants:
        mem, source, why = _memory_point(name, analysis, memory, memories)
        is_ref = name == run.reference_variant
        ci = analysis.mean(name, info.name, analysis.main_mode)
        if mem is None:
            skipped.append(f"{name} ({why})")
            continue
        if is_ref and ideal is not None:
            label = f"{name} (reference" + (", ∞)" if off_scale else ")")
            points.append(
                ParetoPoint(label=label, memory_bytes=mem, quality=ideal, low=ideal, high=ideal, reference=True,
                            off_scale=off_scale)
            )  # fmt: skip
            shown = "∞" if off_scale else f"{ideal:g}"
            cells.append(Cell(f"{shown} (reference)", title="compared with itself: the metric's ideal value"))
        elif isinstance(ci, BootstrapCI):
            points.append(
                ParetoPoint(label=name + (" (reference)" if is_ref else ""), memory_bytes=mem,
                            quality=ci.estimate, low=ci.low, high=ci.high, reference=is_ref)
            )  # fmt: skip
            cells.append(ci_cell(ci))
        else:
            skipped.append(f"{name} ({ci.text})")
            continue
        names.append(name)
        sources.append(source)
    if not [p for p in points if not p.reference]:
        section.add(Paragraph(f"No variant has both a size and a {info.name} score; no plot.", "note"))
        return section, None
    constant = {n for n, p in zip(names, points, strict=True) if p.reference and ideal is not None}
    shares, n_common = _frontier_shares(analysis, names, points, info, constant)
    if shares is not None:
        points = [
            ParetoPoint(
                label=f"{p.label} ({share:.0%})", memory_bytes=p.memory_bytes, quality=p.quality, low=p.low,
                high=p.high, reference=p.reference, off_scale=p.off_scale,
            )
            for p, share in zip(points, shares, strict=True)
        ]  # fmt: skip
    path = out_dir / "pareto.png"
    label, meaning = MEMORY_KINDS[memory]
    axis = label
    if memory == "peak" and len(set(sources)) == 1:
        axis = f"{label}, {sources[0]}"  # "..., measured on NVIDIA H100 80GB HBM3" or "..., planned"
    elif memory == "peak":  # mixed sources: each point says its own
        points = [
            replace(p, label=f"{p.label} [{s.split(' on ')[0]}]")
            for p, s in zip(points, sources, strict=True)
        ]
    front = plot_pareto(
        points, path, quality_label=info.name, memory_label=axis, higher_is_better=info.higher_is_better
    )
    section.add(
        Paragraph(_explanation(analysis, info, meaning, shares is not None, n_common, ideal is not None))
    )
    section.add(
        Figure(
            "pareto.png",
            f"{info.name} against {label[0].lower()}{label[1:]}",
            "★ = the reference variant; * = non-dominated; (%) = share of resamples in which it is non-dominated",
        )
    )
    rows = []
    for i, (name, p, cell, on) in enumerate(zip(names, points, cells, front, strict=True)):
        size = Cell(size_text(p.memory_bytes), title=f"{int(p.memory_bytes):,} bytes", css="num bytes")
        share = Cell(f"{shares[i]:.1%}", css="num") if shares is not None else Cell("n/a")
        row = [Cell(name, css="frontier" if on else None), size]
        if memory == "peak":
            row.append(Cell(sources[i], title=memories[name].peak.detail))
        rows.append(row + [cell, "yes" if on else "no", share])
    header: list[str | Cell] = ["Variant", label]
    if memory == "peak":
        header.append(Cell("Source", title="measured on CUDA, or planned by ditq plan (see Memory)"))
    header += [f"{info.name} {arrow(info)}", "On frontier"]
    header.append(Cell("Non-dominated in resamples", title="share of bootstrap resamples of the prompts"))
    section.add(Table(header, rows))
    if skipped:
        section.add(Paragraph("Not plotted: " + "; ".join(skipped) + ".", "note"))
    return section, path


def _explanation(
    analysis: Analysis, info: MetricInfo, meaning: str, resampled: bool, n_common: int, ideal_reference: bool
) -> str:
    direction = "higher" if info.higher_is_better else "lower"
    ref = analysis.run.reference_variant
    text = (
        f"x: {meaning}; y: {info.name} {arrow(info)} ({direction} is "
        f"better), mean over prompts with {100 * analysis.settings.confidence_level:g}% CI error bars. "
    )
    if ideal_reference:
        text += (
            f"{info.name} compares each image with the {ref} image, so {ref} (the star) has the ideal value by "
            "definition; it marks where the other variants start from, and any variant that needs more "
            f"memory than {ref} is dominated by it. "
        )
    elif ref in analysis.run.variants:
        text += f"The star is the reference variant {ref}, scored like the others. "
    text += (
        "A variant is on the frontier when no other variant uses no more memory and scores at least as well "
        "(strictly better in one); pick from the frontier. The means are uncertain, so the frontier is too: the "
        "percentage beside each variant is the share of bootstrap resamples of the prompts in which it is "
        "non-dominated"
    )
    if resampled:
        return text + (
            f" ({analysis.settings.n_resamples:,} resamples of the {n_common} prompts scored for every plotted "
            "variant)."
        )
    return text + "; it needs at least two prompts scored for every plotted variant, which this run lacks."


def _frontier_shares(
    analysis: Analysis, names: list[str], points: list[ParetoPoint], info: MetricInfo, constant: set[str]
) -> tuple[list[float] | None, int]:
    """Per plotted variant, the share of bootstrap resamples of the common prompts in which it is
    non-dominated; a reference at a fidelity metric's ideal enters as that constant on every prompt."""
    scored = [n for n in names if n not in constant]
    units, matrix = analysis.common_units(scored, info.name, analysis.main_mode)
    if len(units) < 2:
        return None, len(units)
    rows = iter(matrix)
    full = np.array(
        [
            next(rows) if n in scored else np.full(len(units), p.quality)
            for n, p in zip(names, points, strict=True)
        ],
        dtype=np.float64,
    )
    st = analysis.settings
    shares = frontier_shares(
        [p.memory_bytes for p in points], full, higher_is_better=info.higher_is_better,
        n_resamples=st.n_resamples, seed=st.seed,
    )  # fmt: skip
    return [float(x) for x in shares], len(units)
