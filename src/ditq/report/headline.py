"""The "Headline comparisons" section: the comparisons a reader of an Ideogram 4 quantization paper looks for
first, as named rows, whenever the variants they need are in the run.

- INT8 against FP8 on the preference metrics (CLIP score, PickScore, HPSv2): does the interval include 0?
- LPIPS against the reference for INT8, Q4_K and NF4, and their pairwise differences.
- OCR exact match with JSON captions against raw prompt strings, per variant.

A variant is found by its name: exactly (case-insensitive) `fp8`, `int8`, `q4_k`, `nf4`, else the first whose
name starts with it (`q4_k_m`, `int8-p2`); FP8 is the reference variant when it is named so. The rows form one
family, adjusted with Holm step-down intervals.
"""

from __future__ import annotations

from ditq.report.analysis import Analysis, Comparison, Missing, adjust_family
from ditq.report.document import Cell, Paragraph, Section, Table
from ditq.report.formatting import ci_cell
from ditq.report.inputs import MetricInfo
from ditq.report.sections import comparison_row, diff_header, multiple_comparisons_note

TITLE = "Headline comparisons"
PREFERENCE = ("clip_score", "pickscore", "hpsv2")
LOW_BIT = ("int8", "q4_k", "nf4")


def find_variant(names: list[str], key: str) -> str | None:
    """The run's variant for `key`: an exact name (any case), else the first name starting with it."""
    lowered = {name.lower(): name for name in names}
    if key in lowered:
        return lowered[key]
    return next((name for name in names if name.lower().startswith(key)), None)


def _includes_zero(c: Comparison) -> Cell:
    if isinstance(c.result, Missing) or c.result.n < 2:
        return Cell("")
    return Cell("yes" if not c.result.excludes_zero else "no")


def _missing_metric(metric: str) -> MetricInfo:
    return MetricInfo(
        name=metric, available=False, reason="not scored in this run", higher_is_better=True, reference=None,
        family="other", model=None,
    )  # fmt: skip


def headline_section(analysis: Analysis) -> Section:
    run = analysis.run
    mode = analysis.main_mode
    section = Section(TITLE, "headline")
    names = list(run.variants)
    found = {key: find_variant(names, key) for key in ("fp8", *LOW_BIT)}
    if run.reference_variant in run.variants and (run.reference_variant or "").lower().startswith("fp8"):
        found["fp8"] = run.reference_variant
    rows: list[tuple[str, Comparison, MetricInfo]] = []
    if found["int8"] and found["fp8"]:
        for metric in PREFERENCE:
            info = run.metrics.get(metric) or _missing_metric(metric)
            c = analysis.paired(metric, (found["int8"], mode), (found["fp8"], mode))
            rows.append((f"{found['int8']} − {found['fp8']}: {metric}", c, info))
    low_bit = [found[k] for k in LOW_BIT if found[k]]
    lpips = run.metrics.get("lpips")
    if len(low_bit) >= 2 and lpips is not None:
        for i, b in enumerate(low_bit):
            for a in low_bit[i + 1 :]:
                rows.append((f"{a} − {b}: lpips", analysis.paired("lpips", (a, mode), (b, mode)), lpips))
    ocr = run.metrics.get("ocr_exact")
    if ocr is not None and {"json", "raw"} <= set(run.scores.caption_modes()):
        for name in names:
            c = analysis.paired("ocr_exact", (name, "json"), (name, "raw"))
            rows.append((f"{name}: json − raw, ocr_exact", c, ocr))
    if not rows:
        present = ", ".join(names)
        section.add(
            Paragraph(
                "The headline comparisons need INT8 and FP8 (preference metrics), two of INT8 / Q4_K / NF4 with "
                f"LPIPS, or OCR scores in both caption modes; this run has variants {present} and caption modes "
                f"{', '.join(run.scores.caption_modes()) or 'none scored'}.",
                "note",
            )
        )
        return section
    m, level = adjust_family([c for _label, c, _info in rows], analysis.settings.confidence_level)
    section.add(
        Paragraph(
            f"Δ = first − second on the same prompts and seeds (caption mode `{mode}` unless the row compares "
            "caption modes), blocked images left out. “CI includes 0” reads the unadjusted interval: for INT8 "
            "against FP8 on preference metrics, yes means no measurable loss at this sample size (not proof of "
            "equality); the verdict column uses the Holm intervals over the rows of this table."
        )
    )
    header = diff_header(analysis, level)
    header.insert(3, Cell(f"{100 * analysis.settings.confidence_level:g}% CI includes 0", title="unadjusted"))
    body = []
    for label, c, info in rows:
        row = comparison_row(c, info, label)
        row.insert(3, _includes_zero(c))
        body.append(row)
    section.add(Table(header, body, caption="Headline comparisons"))
    if lpips is not None and low_bit:
        means = [[name, ci_cell(analysis.mean(name, "lpips", mode))] for name in low_bit]
        section.add(
            Table(["Variant", "lpips ↓ vs reference"], means, caption="LPIPS of the low-bit variants")
        )
    section.add(multiple_comparisons_note(analysis, m, level, "headline comparisons"))
    return section
