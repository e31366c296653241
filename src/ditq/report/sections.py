"""The report's statistical sections: variant table, paired differences, text per category, caption ablation.

Verdicts ("yes — better / worse") come from Holm step-down intervals over each section's family of comparisons;
the unadjusted intervals are shown beside them."""

from __future__ import annotations

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
from ditq.report.inputs import PSNR_METRICS, MetricInfo, RunData
from ditq.report.settings import load_average
from ditq.report.timing import speed_cell, speed_header, speed_unit, variant_timings
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
    timings = variant_timings(run.manifest)
    unit = speed_unit(timings)
    listed = ordered_metrics(analysis)
    metrics = [m for m in listed if m.available]  # the others are named once, under Unavailable metrics
    header: list[str | Cell] = [
        Cell("Variant", title="name, then format"),
        Cell("Disk / transformer", title="bytes on disk of the conditional transformer (GB = 10^9 bytes)"),
        Cell("Resident / transformer", title="resident memory of the conditional transformer once loaded"),
    ]
    if unit:
        header.append(speed_header(unit, run.tiny))
    header += [metric_header(m) for m in metrics]
    if analysis.block_checked:
        header.append(
            Cell("Blocked", title="images the blocked check flagged, left out of every mean in the row")
        )
    rows = []
    shared: dict[tuple[str, str], Cell] = {}  # one cell per (metric, reason), drawn once down the column
    for name, variant in run.variants.items():
        notes = [variant.format or "format unknown"] + (
            ["reference"] if name == run.reference_variant else []
        )
        row: list[str | Cell] = [Cell(name, sub=f"({', '.join(notes)})"), bytes_cell(variant.bytes_on_disk)]
        row.append(bytes_cell(variant.resident_bytes))
        if unit:
            row.append(speed_cell(timings.get(name), unit, timings.get(run.reference_variant or "")))
        for m in metrics:
            value = analysis.mean(name, m.name, mode)
            if isinstance(value, Missing):
                row.append(shared.setdefault((m.name, value.text), missing_cell(value, span=True)))
            else:
                row.append(ci_cell(value))
        if analysis.block_checked:
            checked = analysis.observations(name, mode, "blocked")
            flagged = sum(1 for v in checked.values() if v >= 0.5)
            row.append(Cell(f"{flagged} of {len(checked)}", css="num"))
        rows.append(row)
    caption = f"Means over prompts with {_level(analysis)} bootstrap CIs, caption mode `{mode}`"
    section.add(Table(header, rows, caption=caption))
    if analysis.block_checked:
        section.add(
            Paragraph(
                "Blocked: images that are Ideogram 4's safety-filter placeholder (see Blocked images); they are "
                "left out of every mean and comparison of quality, and fidelity metrics also leave out images "
                "whose reference image was blocked."
            )
        )
    else:
        section.add(
            Paragraph(
                "The run was not scored with the blocked check (`ditq eval` runs it unless --no-checks): a "
                "safety-filter placeholder, if any, is scored like any other image.",
                "note",
            )
        )
    if unit:
        section.add(speed_note(run, unit))
    section.add(identical_note(analysis, mode))
    section.add(
        Paragraph(
            "↑ higher is better, ↓ lower is better. Sizes are per transformer (the conditional one; the "
            "unconditional transformer has the same layout); hover a size for exact bytes of every component. "
            "Fidelity metrics compare each variant's image with the reference variant's image for the same "
            "prompt and seed, so the reference row has no value."
        )
    )
    hidden = [m.name for m in listed if not m.available]
    if hidden:
        section.add(
            Paragraph(f"Not shown: {', '.join(hidden)} (unavailable, see Unavailable metrics).", "note")
        )
    if not listed:
        section.add(
            Paragraph("metrics.json lists no metrics: run `ditq eval RUN` to score the images.", "note")
        )
    return section


def speed_note(run: RunData, unit: str) -> Paragraph:
    """What the speed column measured, and on what machine and load."""
    what = (
        "s / step: median seconds per denoising step (both guidance branches' transformer calls), over the "
        "steps of every image after the warm-up (each process's first image of a variant and each image's "
        "first step pay one-time costs and are left out); below it the interquartile range."
        if unit == "step"
        else "s / image: median wall-clock seconds per image after the warm-up (this run's manifest has no "
        "per-step times), with the interquartile range."
    )
    host = run.host
    parts = []
    if host.get("gpu") or host.get("cpu"):
        parts.append(str(host.get("gpu") or host.get("cpu")))
    if isinstance(host.get("threads"), int):
        parts.append(f"{host['threads']} thread(s)")
    load = load_average(host)
    if load:
        parts.append(f"load average {load[0]:g} when generation started")
    where = f" Measured on {', '.join(parts)}; other work on the machine slows it." if parts else ""
    tiny = (
        " The reference is the built-in tiny model (random weights, 64-pixel images): these times check that "
        "the code paths run and are no measure of any format's speed on the real model."
        if run.tiny
        else ""
    )
    return Paragraph(what + where + tiny, "note" if run.tiny else None)


def identical_note(analysis: Analysis, mode: str) -> Paragraph:
    """How many images were pixel-identical to the reference (PSNR = inf), per variant; none are dropped."""
    run = analysis.run
    psnr = next((m for m in PSNR_METRICS if m in run.metrics and run.metrics[m].available), None)
    if psnr is None:
        return Paragraph("No PSNR was scored, so identical images are not counted.", "note")
    parts = []
    for name in run.variants:
        obs = analysis.observations(name, mode, psnr)
        if obs:
            parts.append(f"{name} {sum(1 for v in obs.values() if v == float('inf'))} of {len(obs)}")
    counted = "; ".join(parts) or "no image scored"
    return Paragraph(
        f"Images identical to the reference image ({psnr} = ∞), caption mode `{mode}`: {counted}. None is "
        f"dropped: a prompt's {psnr} is computed from the mean squared error over its seeds, and a prompt whose "
        f"images are all identical gets {fmt_num(analysis.psnr_ceiling)} dB, the {psnr} of the smallest possible "
        "difference (one 8-bit step in one channel of one pixel)."
    )


def ordered_metrics(analysis: Analysis) -> list[MetricInfo]:
    """Quality metrics grouped by family (preference, fidelity, text, others), in metrics.json order within
    one; checks (the blocked check) are not quality metrics and are left out."""
    rank = {"preference": 0, "fidelity": 1, "text": 2}
    metrics = [m for m in analysis.run.metrics.values() if m.family != "check"]
    return sorted(metrics, key=lambda m: rank.get(m.family, 3))


def verdict_cell(c: Comparison, info: MetricInfo) -> Cell:
    """'yes — better / worse' where the Holm-adjusted interval excludes 0, from the first side's view."""
    if not c.significant or not isinstance(c.result, PairedDifference):
        return Cell("no")
    better = (c.result.estimate > 0) == info.higher_is_better
    return Cell("yes — better" if better else "yes — worse", css="sig" if better else "worse")


def interval_text(r: PairedDifference) -> str:
    return fmt_interval(r.low, r.high) if r.n > 1 else "n=1, no CI"


def comparison_row(c: Comparison, info: MetricInfo, label: str) -> list[str | Cell]:
    if isinstance(c.result, Missing):
        return [label, missing_cell(c.result), "", "", "", "", "", ""]
    r = c.result
    adjusted = c.adjusted or r
    level = f"{100 * adjusted.ci.confidence_level:.4g}%"
    return [
        label,
        Cell(fmt_num(r.estimate), css="num"),
        Cell(
            interval_text(r), css="num", title=f"{r.ci.method} paired bootstrap over prompts, seed {r.seed}"
        ),
        Cell(interval_text(adjusted), css="num", title=f"Holm step-down interval, level {level}"),
        verdict_cell(c, info),
        Cell(fmt_p(r.p_value), css="num"),
        Cell(fmt_p(c.holm_p), css="num"),
        Cell(str(r.n), css="num"),
    ]


def diff_header(analysis: Analysis, adjusted_level: float) -> list[str | Cell]:
    level = f"{100 * adjusted_level:.4g}%"
    return [
        "Comparison",
        Cell("Δ", title="mean over prompts of the per-prompt difference first − second"),
        Cell(f"{_level(analysis)} CI", title="unadjusted paired bootstrap interval"),
        Cell(f"Holm CI ({level})", title="Holm step-down interval over this section's family of comparisons"),
        Cell("Differs (Holm)", title="the Holm interval excludes 0: better/worse for the first-named side"),
        Cell("p", title="two-sided paired sign-flip permutation test"),
        Cell("Holm p", title="Holm–Bonferroni adjusted over every comparison in this section"),
        Cell("prompts", title="number of prompts scored for both sides"),
    ]


def multiple_comparisons_note(analysis: Analysis, m: int, adjusted_level: float, what: str) -> Paragraph:
    if m == 0:
        return Paragraph(f"No {what} could be tested.", "note")
    level = analysis.settings.confidence_level
    return Paragraph(
        f"Multiple comparisons: this section makes {m} {what}. A marginal {_level(analysis)} interval excludes 0 "
        f"for about {100 * (1 - level):g}% of null comparisons by chance, so the verdicts (Differs) come from "
        f"Holm step-down intervals: each step widens the intervals of the comparisons not yet established to "
        f"level 1 − {1 - level:g}/(number left), which keeps the chance of any false verdict in the section "
        f"at {1 - level:g}; the last step ran at {100 * adjusted_level:.4g}% (the first, Bonferroni's, at "
        f"{100 * bonferroni_confidence_level(level, m):.4g}%). The unadjusted intervals and the sign-flip "
        "p-values with their Holm adjustment are shown beside them."
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
    m, adjusted_level = adjust_family(
        [c for _info, rows in per_metric for _label, c in rows], analysis.settings.confidence_level
    )
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
        body = [comparison_row(c, info, label) for label, c in rows]
        section.add(Table(diff_header(analysis, adjusted_level), body, caption=f"{info.name} {arrow(info)}"))
    unavailable = [i.name for i in run.metrics.values() if not i.available]
    if unavailable:
        section.add(
            Paragraph(
                f"Not compared: {', '.join(unavailable)} (unavailable, see Unavailable metrics).", "note"
            )
        )
    section.add(multiple_comparisons_note(analysis, m, adjusted_level, "paired comparisons"))
    return section


def text_section(analysis: Analysis) -> Section:
    run = analysis.run
    mode = analysis.main_mode
    section = Section(TEXT, "text")
    text_metrics = [m for m in ordered_metrics(analysis) if m.family == "text"]
    if not text_metrics:
        section.add(Paragraph("metrics.json lists no text-rendering (OCR) metrics for this run.", "note"))
        return section
    with_text = [pid for pid in run.prompt_ids if run.prompts.get(pid, {}).get("texts")]
    section.add(
        Paragraph(
            f"OCR scores of the text the prompts ask for, per prompt category (caption mode `{mode}`), as means "
            f"over prompts with {_level(analysis)} bootstrap CIs; `all` pools every prompt with text "
            f"({len(with_text)} of the run's {len(run.prompt_ids)} prompts ask for text)."
        )
    )
    single: set[str] = set()
    for info in text_metrics:
        if not info.available:
            section.add(Paragraph(f"{info.name} is unavailable (see Unavailable metrics).", "note"))
            continue
        categories = run.scores.categories(info.name)
        counts = {
            c: max(len(analysis.unit_values(v, info.name, mode, c)) for v in run.variants) for c in categories
        }
        single.update(c for c, n in counts.items() if n == 1)
        header: list[str | Cell] = ["Variant"]
        header += [Cell(c, sub=f"({counts[c]} prompt{'s' * (counts[c] != 1)})") for c in categories]
        header.append("all")
        rows = []
        for name in run.variants:
            cells = [ci_cell(analysis.mean(name, info.name, mode, c)) for c in categories]
            rows.append([name, *cells, ci_cell(analysis.mean(name, info.name, mode))])
        section.add(Table(header, rows, caption=f"{info.name} {arrow(info)}"))
    if single:
        section.add(
            Paragraph(
                f"No interval for {', '.join(sorted(single))}: suite {run.suite or 'of this run'} has one prompt with text "
                "in each, and an interval needs two; the `all` column pools them. Suite `quick` has 3 prompts "
                "per category, `full` 30 (`--suite quick`).",
                "note",
            )
        )
    if run.tiny:
        section.add(
            Paragraph(
                "The tiny model's images are noise, so OCR finds none of the requested text in any variant: "
                "exact match 0 and edit distance 1 are expected here.",
                "note",
            )
        )
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
            "Δ = raw − json, paired on prompt and seed within each variant, averaged over seeds per prompt. "
            "Blocked images are left out on both sides (plain-text prompts trigger the safety filter more "
            "often; its rates are compared under Blocked images)."
        )
    )
    family: list[tuple[MetricInfo, list[tuple[str, Comparison]]]] = []
    for info in (m for m in ordered_metrics(analysis) if m.available):
        family.append(
            (info, [(v, analysis.paired(info.name, (v, "raw"), (v, "json"))) for v in run.variants])
        )
    m, adjusted_level = adjust_family(
        [c for _info, rows in family for _v, c in rows], analysis.settings.confidence_level
    )
    for info, rows in family:
        header = ["Variant", "json", "raw", *diff_header(analysis, adjusted_level)[1:]]
        body = []
        for variant, c in rows:
            means = [ci_cell(analysis.mean(variant, info.name, mode)) for mode in ("json", "raw")]
            body.append([variant, *means, *comparison_row(c, info, variant)[1:]])
        section.add(Table(header, body, caption=f"{info.name} {arrow(info)}"))
    section.add(multiple_comparisons_note(analysis, m, adjusted_level, "raw-vs-json comparisons"))
    return section
