"""The "Blocked images" section: how often each variant and caption mode returned the safety-filter placeholder,
and paired tests of the difference in block rate.

A variant's block rate is the mean over prompts of the share of its seeds that were blocked (the unit is the
prompt, as everywhere in the report); two variants are compared on the same prompts and seeds, and raw against
JSON captions within each variant. The comparisons form one family, adjusted with Holm step-down intervals.
"""

from __future__ import annotations

from ditq.report.analysis import Analysis, Comparison, adjust_family
from ditq.report.document import Cell, Paragraph, Section, Table
from ditq.report.formatting import ci_cell
from ditq.report.inputs import BLOCKED, MetricInfo
from ditq.report.sections import comparison_row, diff_header, multiple_comparisons_note

TITLE = "Blocked images"


def _counts(analysis: Analysis, variant: str, mode: str) -> tuple[int, int]:
    checked = analysis.observations(variant, mode, BLOCKED)
    return sum(1 for v in checked.values() if v >= 0.5), len(checked)


def blocked_section(analysis: Analysis) -> Section:
    run = analysis.run
    section = Section(TITLE, "blocked")
    info = run.metrics.get(BLOCKED)
    if info is None or not info.available:
        why = "it is not in metrics.json" if info is None else "unavailable: see Unavailable metrics"
        section.add(
            Paragraph(
                f"The blocked check did not run ({why}), so safety-filter placeholders cannot be told from "
                "generations and every image counts in the quality means. `ditq eval RUN` runs it.",
                "note",
            )
        )
        return section
    modes = [
        m
        for m in run.scores.caption_modes()
        if any(run.scores.observations(v, m, BLOCKED) for v in run.variants)
    ]
    section.add(
        Paragraph(
            "Images the blocked check flagged as Ideogram 4's safety-filter placeholder (a near-uniform grey image "
            "reading “Image blocked by safety filter”, found by a grey-field test and PP-OCR). They are left out "
            "of every quality mean and comparison above; the block rate is the mean over prompts of the share of "
            "a prompt's seeds that were blocked."
        )
    )
    header: list[str | Cell] = ["Variant"]
    for mode in modes:
        header += [Cell(f"{mode}: blocked", title="blocked images of all checked"), f"{mode}: block rate"]
    rows = []
    total = 0
    for name in run.variants:
        row: list[str | Cell] = [name]
        for mode in modes:
            flagged, checked = _counts(analysis, name, mode)
            total += flagged
            row += [Cell(f"{flagged} of {checked}", css="num"), ci_cell(analysis.mean(name, BLOCKED, mode))]
        rows.append(row)
    section.add(Table(header, rows, caption="Blocked images per variant and caption mode"))
    if total == 0:
        section.add(
            Paragraph("No image was blocked, so there is no difference in block rate to test.", "note")
        )
        return section
    names = list(run.variants)
    blocked_in = {(name, mode) for name in names for mode in modes if _counts(analysis, name, mode)[0]}
    pairs = [
        ((a, mode), (b, mode), f"{a} − {b} ({mode})")
        for mode in modes
        for i, b in enumerate(names)
        for a in names[i + 1 :]
    ]
    if {"json", "raw"} <= set(modes):
        pairs += [((name, "raw"), (name, "json"), f"{name}: raw − json") for name in names]
    comparisons: list[tuple[str, Comparison]] = [
        (label, analysis.paired(BLOCKED, first, second))
        for first, second, label in pairs
        if first in blocked_in or second in blocked_in  # two sides without a blocked image: Δ is 0 exactly
    ]
    m, level = adjust_family([c for _label, c in comparisons], analysis.settings.confidence_level)
    as_rate = MetricInfo(
        name="block rate", available=True, reason=None, higher_is_better=False, reference=None,
        family="check", model=None,
    )  # fmt: skip
    body = [comparison_row(c, as_rate, label) for label, c in comparisons]
    section.add(Table(diff_header(analysis, level), body, caption="Paired differences in block rate ↓"))
    section.add(
        Paragraph(
            "Block rates are compared between every two variants within a caption mode, and raw against JSON "
            "captions within each variant, on the same prompts and seeds; pairs in which neither side had a "
            "blocked image (Δ = 0 exactly) are not listed and not counted in the family.",
        )
    )
    section.add(multiple_comparisons_note(analysis, m, level, "block-rate comparisons"))
    return section
