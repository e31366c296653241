"""`build_report`: a run folder in, report/index.html + report.md + pareto.png + grids/*.png out."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from ditq.errors import ConfigError
from ditq.report.analysis import Analysis, StatsSettings
from ditq.report.blocking import blocked_section
from ditq.report.document import (
    Cell,
    Document,
    Figure,
    Paragraph,
    Section,
    Table,
    render_html,
    render_markdown,
)
from ditq.report.formatting import arrow, ci_cell, memory_of, size_text
from ditq.report.grids import compose_grid
from ditq.report.headline import headline_section
from ditq.report.inputs import MetricInfo, RunData, load_run
from ditq.report.pareto import ParetoPoint, frontier_shares, plot_pareto
from ditq.report.sections import ablation_section, paired_section, text_section, variant_section
from ditq.report.settings import methods_section, settings_section
from ditq.stats import BootstrapCI

log = logging.getLogger(__name__)

PARETO = "Quality–memory Pareto plot"
GRIDS = "Image grids"
NOTES = "Data notes"
# Default quality axis: the first available of these (names compared lower-case without punctuation).
QUALITY_PREFERENCE = ("hpsv2", "pickscore", "clipscore", "lpips", "psnr")
MIN_PROMPTS = 20  # below this many prompts the report warns that bootstrap intervals run narrow
MEMORY_KINDS = {"resident": "Resident memory", "disk": "Bytes on disk"}


@dataclass(frozen=True, kw_only=True)
class ReportPaths:
    """What `build_report` wrote; `pareto_png` is None when no variant had both a size and a quality score."""

    out_dir: Path
    index_html: Path
    markdown: Path
    pareto_png: Path | None
    grids: list[Path] = field(default_factory=list)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def choose_quality_metric(metrics: dict[str, MetricInfo], requested: str | None = None) -> MetricInfo | None:
    """The metric on the Pareto plot's y axis: `requested`, else the first available by QUALITY_PREFERENCE,
    else the first available preference, fidelity or other metric; None when nothing is available."""
    if requested is not None:
        if requested not in metrics:
            known = ", ".join(metrics) or "none"
            raise ConfigError(f"quality metric {requested!r} is not in metrics.json (known: {known})")
        return metrics[requested]
    available = [m for m in metrics.values() if m.available and m.family != "check"]
    for pref in QUALITY_PREFERENCE:
        for m in available:
            if _norm(m.name).startswith(pref):
                return m
    for family in ("preference", "fidelity"):
        for m in available:
            if m.family == family:
                return m
    return available[0] if available else None


def _pareto_section(
    analysis: Analysis, out_dir: Path, info: MetricInfo | None, memory: str
) -> tuple[Section, Path | None]:
    run = analysis.run
    section = Section(PARETO, "pareto")
    (out_dir / "pareto.png").unlink(missing_ok=True)  # never leave a plot from an earlier build
    if info is None:
        section.add(Paragraph("No quality metric is available for this run, so there is no plot.", "note"))
        return section, None
    if not info.available:
        section.add(Paragraph(f"{info.name}: unavailable: {info.reason}; no plot.", "note"))
        return section, None
    points, intervals, skipped, names = [], [], [], []
    for name, variant in run.variants.items():
        mem = memory_of(variant, memory)
        ci = analysis.mean(name, info.name, analysis.main_mode)
        if mem is None:
            skipped.append(f"{name} (no transformer size in run.json)")
        elif not isinstance(ci, BootstrapCI):
            skipped.append(f"{name} ({ci.text})")
        else:
            points.append(
                ParetoPoint(label=name, memory_bytes=mem, quality=ci.estimate, low=ci.low, high=ci.high)
            )
            intervals.append(ci)
            names.append(name)
    if not points:
        section.add(Paragraph(f"No variant has both a size and a {info.name} score; no plot.", "note"))
        return section, None
    shares, n_common = _frontier_shares(analysis, names, [p.memory_bytes for p in points], info)
    if shares is not None:
        points = [
            ParetoPoint(
                label=f"{p.label} ({share:.0%})",
                memory_bytes=p.memory_bytes,
                quality=p.quality,
                low=p.low,
                high=p.high,
            )
            for p, share in zip(points, shares, strict=True)
        ]
    path = out_dir / "pareto.png"
    label = MEMORY_KINDS[memory]
    front = plot_pareto(
        points, path, quality_label=info.name, memory_label=label, higher_is_better=info.higher_is_better
    )
    direction = "higher" if info.higher_is_better else "lower"
    section.add(
        Paragraph(
            f"x: {label.lower()} of the conditional transformer; y: {info.name} {arrow(info)} ({direction} is "
            f"better), mean over prompts with {100 * analysis.settings.confidence_level:g}% CI error bars. A "
            "variant is on the frontier when no other variant uses no more memory and scores at least as well "
            "(strictly better in one); pick from the frontier. The means are uncertain, so the frontier is "
            "too: the percentage beside each variant is the share of bootstrap resamples of the prompts in "
            "which it is non-dominated"
            + (
                f" ({analysis.settings.n_resamples:,} resamples of the {n_common} prompts scored for every "
                "plotted variant)."
                if shares is not None
                else "; it needs at least two prompts scored for every plotted variant, which this run lacks."
            )
        )
    )
    section.add(
        Figure(
            "pareto.png",
            f"{info.name} against {label.lower()} per transformer",
            "* = non-dominated; (%) = share of resamples in which it is non-dominated",
        )
    )
    rows = []
    for i, (name, p, ci, on) in enumerate(zip(names, points, intervals, front, strict=True)):
        size = Cell(size_text(p.memory_bytes), title=f"{int(p.memory_bytes):,} bytes", css="num bytes")
        share = Cell(f"{shares[i]:.1%}", css="num") if shares is not None else Cell("n/a")
        rows.append(
            [Cell(name, css="frontier" if on else None), size, ci_cell(ci), "yes" if on else "no", share]
        )
    header = ["Variant", f"{label} / transformer", f"{info.name} {arrow(info)}", "On frontier"]
    header.append(Cell("Non-dominated in resamples", title="share of bootstrap resamples of the prompts"))
    section.add(Table(header, rows))
    if skipped:
        section.add(Paragraph("Not plotted: " + "; ".join(skipped) + ".", "note"))
    return section, path


def _frontier_shares(
    analysis: Analysis, names: list[str], memory: list[float], info: MetricInfo
) -> tuple[list[float] | None, int]:
    """Per variant, the share of bootstrap resamples of the common prompts in which it is non-dominated."""
    units, matrix = analysis.common_units(names, info.name, analysis.main_mode)
    if len(units) < 2:
        return None, len(units)
    st = analysis.settings
    shares = frontier_shares(
        memory, matrix, higher_is_better=info.higher_is_better, n_resamples=st.n_resamples, seed=st.seed
    )
    return [float(x) for x in shares], len(units)


def _image_index(run: RunData) -> dict[tuple[str, str, str, int], Path]:
    index = {}
    for r in run.manifest:
        try:
            key = (str(r["variant"]), str(r["caption_mode"]), str(r["prompt_id"]), int(r["seed"]))
        except (KeyError, TypeError, ValueError):
            continue
        if r.get("path"):
            index[key] = run.root / str(r["path"])
    return index


def _image_path(run: RunData, index: dict, variant: str, mode: str, prompt_id: str, seed: int) -> Path | None:
    path = index.get((variant, mode, prompt_id, seed))
    if path is None:
        path = run.root / "images" / variant / mode / f"{prompt_id}_s{seed}.png"
    return path if path.is_file() else None


def _grid_section(analysis: Analysis, out_dir: Path, n_prompts: int) -> tuple[Section, list[Path]]:
    run = analysis.run
    section = Section(GRIDS, "grids")
    mode = analysis.main_mode
    index = _image_index(run)
    seeds = run.seeds or sorted({k[3] for k in index})
    candidates = []
    for pid in run.prompt_ids:
        seed = next(
            (s for s in seeds if any(_image_path(run, index, v, mode, pid, s) for v in run.variants)), None
        )
        if seed is not None:
            candidates.append((pid, seed))
    # One prompt per category first, for variety, then the rest in suite order.
    category = {
        pid: run.prompts.get(pid, {}).get("category") or run.scores.category.get(pid) for pid, _ in candidates
    }
    chosen, seen = [], set()
    for pid, seed in candidates:
        if category[pid] not in seen:
            chosen.append((pid, seed))
            seen.add(category[pid])
    chosen += [c for c in candidates if c not in chosen]
    chosen = chosen[:n_prompts]
    grid_dir = out_dir / "grids"
    for old in grid_dir.glob("*.png") if grid_dir.is_dir() else []:
        old.unlink()
    if not chosen:
        section.add(
            Paragraph(
                "No generated images were found (manifest.jsonl / images/), so there are no grids.", "note"
            )
        )
        return section, []
    section.add(Paragraph(f"The variants side by side on the same prompt and seed (caption mode `{mode}`)."))
    paths = []
    for pid, seed in chosen:
        tiles = [(v, _image_path(run, index, v, mode, pid, seed)) for v in run.variants]
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{pid}_s{seed}_{mode}") + ".png"
        paths.append(compose_grid(tiles, grid_dir / name))
        prompt = str(run.prompts.get(pid, {}).get("prompt") or "")
        prompt = prompt if len(prompt) <= 240 else prompt[:237] + "..."
        caption = f"{pid} · {category[pid] or 'uncategorized'} · seed {seed}" + (
            f" — {prompt}" if prompt else ""
        )
        section.add(Figure(f"grids/{name}", f"{pid} seed {seed}: variants side by side", caption))
    return section, paths


def _notes_section(run: RunData) -> Section | None:
    notes = []
    if not (run.root / "scores.csv").is_file():
        notes.append("The run has no scores.csv yet: run `ditq eval RUN` to score it; only sizes are shown.")
    elif run.scores.n_rows == 0:
        notes.append("scores.csv has no rows: run `ditq eval RUN` to score the images; only sizes are shown.")
    if run.reference_variant not in run.variants:
        notes.append(
            f"The run has no reference variant ({run.reference_variant!r}): fidelity vs reference unavailable."
        )
    if run.missing_images:
        shown = ", ".join(run.missing_images[:3]) + (", ..." if len(run.missing_images) > 3 else "")
        notes.append(f"metrics.json lists {len(run.missing_images)} image(s) missing on disk: {shown}.")
    scored = {p for obs in run.scores.cells.values() for p, _seed in obs}
    if 0 < len(scored) < MIN_PROMPTS:
        notes.append(
            f"Only {len(scored)} prompts are scored: bootstrap intervals from fewer than {MIN_PROMPTS} prompts "
            "are narrower than their nominal level; read the sign-flip p-values first."
        )
    for (variant, metric), count in sorted(run.scores.dropped_nonfinite.items()):
        notes.append(f"{variant} / {metric}: {count} non-finite or empty score(s) dropped.")
    if not notes:
        return None
    return Section(NOTES, "notes", [Paragraph(n, "note") for n in notes])


def build_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    quality_metric: str | None = None,
    memory: str = "resident",
    settings: StatsSettings | None = None,
    grid_prompts: int = 4,
) -> ReportPaths:
    """Write the benchmark report of the run folder `run_dir` into `out_dir` (default RUN/report).

    `quality_metric` picks the Pareto plot's y axis (default: see `choose_quality_metric`); `memory` its x axis,
    "resident" or "disk" bytes of the conditional transformer. Raises `RunFolderError` / `ConfigError` on bad input.
    """
    if memory not in MEMORY_KINDS:
        raise ConfigError(f"memory must be one of {', '.join(MEMORY_KINDS)}, got {memory!r}")
    run = load_run(run_dir)
    quality = choose_quality_metric(
        run.metrics, quality_metric
    )  # a bad name fails before anything is written
    out = Path(out_dir) if out_dir is not None else run.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    analysis = Analysis(run, settings or StatsSettings())
    log.info("building report for %s into %s", run.root, out)
    pareto, pareto_png = _pareto_section(analysis, out, quality, memory)
    grids, grid_paths = _grid_section(analysis, out, grid_prompts)
    notes = _notes_section(run)
    sections = [notes] if notes else []
    sections += [
        variant_section(analysis),
        headline_section(analysis),
        paired_section(analysis),
        blocked_section(analysis),
        pareto,
        text_section(analysis),
        ablation_section(analysis),
        grids,
        settings_section(run, analysis),
        methods_section(analysis),
    ]
    subtitle = (
        f"Run `{run.root.name}` · suite {run.suite or 'unknown'} · {len(run.variants)} variants · "
        f"{len(run.prompt_ids)} prompts × {len(run.seeds)} seed(s) · reference {run.reference_variant or 'none'}"
    )
    doc = Document(f"ditq benchmark report: {run.root.name}", subtitle, sections)
    index_html = out / "index.html"
    index_html.write_text(render_html(doc), encoding="utf-8")
    markdown = out / "report.md"
    markdown.write_text(render_markdown(doc), encoding="utf-8")
    return ReportPaths(
        out_dir=out, index_html=index_html, markdown=markdown, pareto_png=pareto_png, grids=grid_paths
    )
