"""The metric battery: fidelity to the FP8 image, text rendering, and prompt-image preference, plus the
`blocked` check (the safety-filter placeholder).

`METRICS` maps names to metric objects (see `base.Metric` for the contract); `evaluate_run` scores a run
folder into scores.csv and metrics.json, recording the sha256 of every metric weight file it loads
(`ditq.metrics.weights`). Importing this package registers every metric; models load only when a metric runs.
"""

from __future__ import annotations

from ditq.metrics import blocked, fidelity, lpips, preference, text  # noqa: F401  (register the metrics)
from ditq.metrics.base import METRICS, Metric, MetricStatus, ScoreItem
from ditq.metrics.evaluate import EvalResult, evaluate_run, resolve_metrics
from ditq.metrics.runfolder import SCORE_COLUMNS, RunFolderError

__all__ = [
    "METRICS",
    "SCORE_COLUMNS",
    "EvalResult",
    "Metric",
    "MetricStatus",
    "RunFolderError",
    "ScoreItem",
    "evaluate_run",
    "resolve_metrics",
]
