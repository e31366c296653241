"""The benchmark report: tables with bootstrap CIs, paired differences, the quality–memory Pareto plot,
per-category text rendering, the caption ablation and image grids, as HTML and Markdown."""

from __future__ import annotations

from ditq.report.analysis import StatsSettings
from ditq.report.build import ReportPaths, build_report, choose_quality_metric
from ditq.report.inputs import RunData, RunFolderError, load_run
from ditq.report.pareto import pareto_frontier

__all__ = [
    "ReportPaths",
    "RunData",
    "RunFolderError",
    "StatsSettings",
    "build_report",
    "choose_quality_metric",
    "load_run",
    "pareto_frontier",
]
