"""The report's statistical sections: variant table, paired differences, text per category, caption ablation."""

from __future__ import annotations

import statistics
from collections import defaultdict

from ditq.report.analysis import Analysis, Comparison, Missing, adjust_family
from ditq.report.document import Cell, Paragraph, Section, Table
from ditq.report.formatting import (
    arrow,
    bytes_cell,
    ci_cell,
    fmt_interval,
    fmt_num,
    fmt_p,
    metric_header,
    missing_cell,
)
from ditq.report.inputs import MetricInfo
from ditq.stats import PairedDifference, bonferroni_confidence_level

VARIANTS = "Variant table"
PAIRED = "Paired differences"
TEXT = "Per-category text rendering"
ABLATION = "Raw-string vs JSON-caption ablation"


def _level(analysis: Analysis) -> str:
    return f"{100 * analysis.settings.confidence_level:g}%"


def variant_section(analysis: Analysis) -> Section:
    run = analysis.run
    mode = analysis.main_mode
    section = Section(VARIANTS, "variants")
    wall: dict[str, list[float]] = defaultdict(list)
    for record in run.manifest:
        if isinstance(record.get("wall_s"), int | float):
            wall[str(record.get("variant"))].append(float(record["wall_s"]))
    metrics = ordered_metrics(analysis)
    header: list[str | Cell] = [
        Cell("Variant", title="name, then format"),
        Cell("Disk / transformer", title="bytes on disk of the conditional transformer (GB = 10^9 bytes)"),
        Cell("Resident / transformer", title="resident memory of the conditional transformer once loaded"),
    ]
    if wall:
        header.append(Cell("s / image", title="median wall-clock seconds per image, from manifest.jsonl"))
    header += [metric_header(m) for m in metrics]
    rows = []
    shared: dict[tuple[str, str], Cell] = {}  # one cell per (metric, reason), drawn once down the column
    for name, variant in run.variants.items():
        notes = [variant.format or "format unknown"] + (
            ["reference"] if name == run.reference_variant else []
        )
        row: list[str | Cell] = [Cell(name, sub=f"({', '.join(notes)})"), bytes_cell(variant.bytes_on_disk)]
        row.append(bytes_cell(variant.resident_bytes))
        if wall:
            row.append(Cell(fmt_num(statistics.median(wall[name])), css="num") if wall[name] else "")
        for m in metrics:
            value = analysis.mean(name, m.name, mode)
            if isinstance(value, Missing):
                row.append(shared.setdefault((m.name, value.text), missing_cell(value, span=True)))
            else:
                row.append(ci_cell(value))
        rows.append(row)
    caption = f"Means over prompts with {_level(analysis)} bootstrap CIs, caption mode `{mode}`"
    section.add(Table(header, rows, caption=caption))
    section.add(
        Paragraph(
            "↑ higher is better, ↓ lower is better. Sizes are per transformer (the conditional one; the "
            "unconditional transformer has the same layout); hover a size for exact bytes of every component. "
            "Fidelity metrics compare each variant's image with the reference variant's image for the same "
            "prompt and seed, so the reference row has no value."
        )
    )
    if not metrics:
        section.add(
            Paragraph("metrics.json lists no metrics: run `ditq eval RUN` to score the images.", "note")
        )
    return section


def ordered_metrics(analysis: Analysis) -> list[MetricInfo]:
    """Metrics grouped by family (preference, fidelity, text, others), in metrics.json order within one."""
    rank = {"preference": 0, "fidelity": 1, "text": 2}
    return sorted(analysis.run.metrics.values(), key=lambda m: rank.get(m.family, 3))


def _verdict(result: PairedDifference, info: MetricInfo) -> Cell:
    if not result.excludes_zero:
        return Cell("no")
    better = (result.estimate > 0) == info.higher_is_better
    return Cell("yes — better" if better else "yes — worse", css="sig" if better else "worse")


def _comparison_row(c: Comparison, info: MetricInfo, label: str) -> list[str | Cell]:
    if isinstance(c.result, Missing):
        return [label, missing_cell(c.result), "", "", "", "", ""]
    r = c.result
    ci = fmt_interval(r.low, r.high) if r.n > 1 else "n=1, no CI"
    return [
        label,
        Cell(fmt_num(r.estimate), css="num"),
        Cell(ci, css="num", title=f"{r.ci.method} paired bootstrap over prompts, seed {r.seed}"),
        _verdict(r, info),
        Cell(fmt_p(r.p_value), css="num"),
        Cell(fmt_p(c.holm_p), css="num"),
        Cell(str(r.n), css="num"),
    ]


def _diff_header(analysis: Analysis) -> list[str | Cell]:
    return [
        "Comparison",
        Cell("Δ", title="mean over prompts of the per-prompt difference first − second"),
        f"{_level(analysis)} CI",
        Cell("CI excludes 0", title="better/worse for the first-named side, given the metric's direction"),
        Cell("p", title="two-sided paired sign-flip permutation test"),
        Cell("Holm p", title="Holm–Bonferroni adjusted over every comparison in this section"),
        Cell("prompts", title="number of prompts scored for both sides"),
    ]


def _multiple_comparisons_note(analysis: Analysis, m: int, what: str) -> Paragraph:
    if m == 0:
        return Paragraph(f"No {what} could be tested.", "note")
    level = analysis.settings.confidence_level
    return Paragraph(
        f"Multiple comparisons: this section makes {m} {what}. Each interval is a marginal "
        f"{_level(analysis)} interval, so about {100 * (1 - level):g}% of null comparisons would exclude 0 by "
        f"chance. The Holm–Bonferroni adjusted p-values control the family-wise error rate over all {m}: "
        f"treat a difference as established when Holm p < {1 - level:g}. Simultaneous Bonferroni intervals "
        f"would use the {100 * bonferroni_confidence_level(level, m):.3g}% level per interval."
    )


def paired_section(analysis: Analysis) -> Section:
    run = analysis.run
    mode = analysis.main_mode
    section = Section(PAIRED, "paired")
    ref = run.reference_variant
    names = list(run.variants)
    others = [v for v in names if v != ref]
    if ref is None or ref not in run.variants:
        section.add(
            Paragraph(
                f"The run has no reference variant ({ref!r}): fidelity vs reference unavailable, and no variant "
                "is compared with a reference; only comparisons between variants follow.",
                "note",
            )
        )
    per_metric: list[tuple[MetricInfo, list[tuple[str, Comparison]]]] = []
    for info in ordered_metrics(analysis):
        if not info.available:
            continue
        rows = []
        pairs = [] if info.reference else [(v, ref) for v in others if ref in run.variants]
        pairs += [(a, b) for i, b in enumerate(others) for a in others[i + 1 :]]
        for a, b in pairs:
            rows.append((f"{a} − {b}", analysis.paired(info.name, (a, mode), (b, mode))))
        per_metric.append((info, rows))
    m = adjust_family([c for _info, rows in per_metric for _label, c in rows])
    section.add(
        Paragraph(
            f"Δ = first − second on the same prompts and seeds (caption mode `{mode}`), averaged over seeds "
            "within each prompt; the interval resamples prompts. Fidelity metrics are already measured against "
            "the reference, so for them only variants other than the reference are compared with each other."
        )
    )
    for info, rows in per_metric:
        if not rows:
            continue
        body = [_comparison_row(c, info, label) for label, c in rows]
        section.add(Table(_diff_header(analysis), body, caption=f"{info.name} {arrow(info)}"))
    unavailable = [f"{i.name} (unavailable: {i.reason})" for i in run.metrics.values() if not i.available]
    if unavailable:
        section.add(Paragraph("Not compared: " + "; ".join(unavailable) + ".", "note"))
    section.add(_multiple_comparisons_note(analysis, m, "paired comparisons"))
    return section


def text_section(analysis: Analysis) -> Section:
    run = analysis.run
    mode = analysis.main_mode
    section = Section(TEXT, "text")
    text_metrics = [m for m in ordered_metrics(analysis) if m.family == "text"]
    if not text_metrics:
        section.add(Paragraph("metrics.json lists no text-rendering (OCR) metrics for this run.", "note"))
        return section
    section.add(
        Paragraph(
            f"OCR scores of the text the prompts ask for, per prompt category (caption mode `{mode}`), as means "
            f"over prompts with {_level(analysis)} bootstrap CIs."
        )
    )
    for info in text_metrics:
        if not info.available:
            section.add(Paragraph(f"{info.name}: unavailable: {info.reason}", "note"))
            continue
        categories = run.scores.categories(info.name)
        header: list[str | Cell] = ["Variant", *categories, "all"]
        rows = []
        for name in run.variants:
            cells = [ci_cell(analysis.mean(name, info.name, mode, c)) for c in categories]
            rows.append([name, *cells, ci_cell(analysis.mean(name, info.name, mode))])
        section.add(Table(header, rows, caption=f"{info.name} {arrow(info)}"))
    return section


def ablation_section(analysis: Analysis) -> Section:
    run = analysis.run
    section = Section(ABLATION, "ablation")
    modes = run.scores.caption_modes()
    if not {"json", "raw"} <= set(modes):
        have = ", ".join(modes or run.caption_modes) or "none scored"
        section.add(
            Paragraph(
                f"This run has no raw caption mode (caption modes: {have}), so there is no ablation. To get "
                'it, generate the run with both caption modes (run.json `caption_modes: ["json", "raw"]`; '
                "see `ditq run --help`), then score it with `ditq eval` and rebuild this report."
            )
        )
        return section
    section.add(
        Paragraph(
            "The same prompts rendered from the structured JSON caption and from the raw prompt string. "
            "Δ = raw − json, paired on prompt and seed within each variant, averaged over seeds per prompt."
        )
    )
    family: list[tuple[MetricInfo, list[tuple[str, Comparison]]]] = []
    for info in (m for m in ordered_metrics(analysis) if m.available):
        family.append(
            (info, [(v, analysis.paired(info.name, (v, "raw"), (v, "json"))) for v in run.variants])
        )
    m = adjust_family([c for _info, rows in family for _v, c in rows])
    for info, rows in family:
        header = ["Variant", "json", "raw", *_diff_header(analysis)[1:]]
        body = []
        for variant, c in rows:
            means = [ci_cell(analysis.mean(variant, info.name, mode)) for mode in ("json", "raw")]
            body.append([variant, *means, *_comparison_row(c, info, variant)[1:]])
        section.add(Table(header, body, caption=f"{info.name} {arrow(info)}"))
    section.add(_multiple_comparisons_note(analysis, m, "raw-vs-json comparisons"))
    return section
