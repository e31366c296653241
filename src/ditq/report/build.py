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
    Document,
    render_html,
    render_markdown,
)
from ditq.report.gallery import grid_section
from ditq.report.headline import headline_section
from ditq.report.inputs import MetricInfo, RunData, load_run
from ditq.report.memory import variant_memories
from ditq.report.memory_section import memory_section
from ditq.report.notes import notes_section, unavailable_section
from ditq.report.pareto_section import MEMORY_KINDS, pareto_section
from ditq.report.sections import ablation_section, paired_section, text_section, variant_section
from ditq.report.settings import methods_section, settings_section

log = logging.getLogger(__name__)

# Default quality axis: the first available of these (names compared lower-case without punctuation).
QUALITY_PREFERENCE = ("hpsv2", "pickscore", "clipscore", "lpips", "psnr")


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


def report_title(run: RunData) -> str:
    """Suite, variants (reference first) and date: "Suite smoke: fp8 vs int8, q4_k, nf4 (2026-12-01)"."""
    ref = run.reference_variant if run.reference_variant in run.variants else None
    others = [v for v in run.variants if v != ref]
    variants = f"{ref} vs {', '.join(others)}" if ref and others else ", ".join(run.variants)
    date = f" ({run.date})" if run.date else ""
    return f"ditq benchmark · suite {run.suite or 'unknown'}: {variants}{date}"


def report_subtitle(run: RunData) -> str:
    modes = ", ".join(run.caption_modes) or "unknown"
    hardware = run.host.get("gpu") or run.host.get("cpu")
    parts = [
        f"{len(run.prompt_ids)} prompts × {len(run.seeds)} seed(s), caption modes {modes}",
        f"reference {run.reference_variant or 'none'}",
    ]
    if hardware:
        parts.append(str(hardware))
    if run.tiny:
        parts.append("built-in tiny model (random weights): numbers check code paths only")
    return " · ".join(parts) + f" · run folder `{run.root.name}`"


def build_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    quality_metric: str | None = None,
    memory: str = "peak",
    settings: StatsSettings | None = None,
    grid_prompts: int = 4,
) -> ReportPaths:
    """Write the benchmark report of the run folder `run_dir` into `out_dir` (default RUN/report).

    `quality_metric` picks the Pareto plot's y axis (default: see `choose_quality_metric`); `memory` its x axis:
    "peak", the peak device memory of generating one image (measured on CUDA, else planned: `ditq.report.memory`),
    or "resident" / "disk" bytes of the conditional transformer. Raises `RunFolderError` / `ConfigError` on bad
    input.
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
    memories = variant_memories(run)
    pareto, pareto_png = pareto_section(analysis, out, quality, memory, memories)
    grids, grid_paths = grid_section(analysis, out, grid_prompts)
    sections = [s for s in (notes_section(run), unavailable_section(run)) if s is not None]
    sections += [
        variant_section(analysis),
        headline_section(analysis),
        paired_section(analysis),
        blocked_section(analysis),
        memory_section(run, memories),
        pareto,
        text_section(analysis),
        ablation_section(analysis),
        grids,
        settings_section(run, analysis),
        methods_section(analysis),
    ]
    doc = Document(report_title(run), report_subtitle(run), sections)
    index_html = out / "index.html"
    index_html.write_text(render_html(doc), encoding="utf-8")
    markdown = out / "report.md"
    markdown.write_text(render_markdown(doc), encoding="utf-8")
    return ReportPaths(
        out_dir=out, index_html=index_html, markdown=markdown, pareto_png=pareto_png, grids=grid_paths
    )
