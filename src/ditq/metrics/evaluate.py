"""Score every image of a run folder with the metric battery: writes scores.csv and metrics.json.

Metrics run one after another (one model in memory at a time), over every image that has no row yet for
that metric, so an interrupted or extended evaluation resumes where it stopped. Fidelity metrics compare each
image with the reference variant's image of the same prompt id, seed and caption mode (the reference variant
itself gets no fidelity rows); text metrics score the prompt's `texts`; preference metrics the prompt text.

metrics.json:

    {"version": 1, "ditq_version": "...", "reference_variant": "fp8",
     "metrics": {name: {"available": bool, "reason": str | null, "higher_is_better": bool,
                        "reference": "fp8" | null, "family": "fidelity" | "text" | "preference" | "check",
                        "model": str | null, "rows": int, "without_reference": int,
                        "weights": [{"file", "path", "bytes", "mtime_ns", "sha256"}, ...],
                        "flagged": int, "flagged_images": [path, ...]}},
     "missing_images": ["images/<variant>/<caption_mode>/<prompt_id>_s<seed>.png", ...]}

`reference` is the reference variant actually used (null for standalone metrics); `rows` counts the metric's
rows in scores.csv; `without_reference` (fidelity only) counts images skipped because the reference variant
has no readable image of their prompt, seed and caption mode; `weights` (metrics that read weight files) pins
what was loaded (`ditq.metrics.weights`); `flagged` and `flagged_images` (checks only: `blocked`) list the images
whose check value is 1. Metrics not run this time keep their entry.

Checks (family "check") run with every metric set unless `checks=False`, first, so the report can leave
flagged images out of every quality mean.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ditq._version import __version__
from ditq.errors import CheckpointError, ConfigError
from ditq.metrics.base import METRICS, Metric, MetricStatus, ScoreItem
from ditq.metrics.runfolder import (
    ImageKey,
    ImageRecord,
    RunFolder,
    RunFolderError,
    ScoreTable,
    load_image,
    write_json_atomic,
)
from ditq.metrics.weights import check_expected, hash_weights

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 60.0


@dataclass
class EvalResult:
    """What `evaluate_run` did: paths written, per-metric status and new rows, images it could not read."""

    scores_path: Path
    metrics_path: Path
    statuses: dict[str, MetricStatus]
    new_rows: dict[str, int]
    missing_images: list[str] = field(default_factory=list)


def resolve_metrics(metrics: Iterable[str | Metric] | None, *, checks: bool = True) -> list[Metric]:
    """Metric objects for names or objects (None: every registered metric); unknown names raise ConfigError.

    With `checks`, every registered check (family "check", e.g. `blocked`) is included too; checks come first.
    """
    if metrics is None:
        metrics = [name for name in METRICS if checks or METRICS.get(name).family != "check"]
    elif isinstance(metrics, str):  # "psnr,ssim"
        metrics = [name.strip() for name in metrics.split(",") if name.strip()]
    resolved: list[Metric] = []
    for entry in metrics:
        metric = METRICS.get(entry) if isinstance(entry, str) else entry
        if not isinstance(metric, Metric):
            raise ConfigError(f"metrics must be names or Metric objects, got {entry!r}")
        if metric.name not in {m.name for m in resolved}:
            resolved.append(metric)
    if checks:
        listed = {m.name for m in resolved}
        resolved += [METRICS.get(n) for n in METRICS if METRICS.get(n).family == "check" and n not in listed]
    return [m for m in resolved if m.family == "check"] + [m for m in resolved if m.family != "check"]


class _Evaluation:
    """The state of one `evaluate_run` call."""

    def __init__(self, run: RunFolder, reference: str, device: str, batch_size: int, progress: bool) -> None:
        self.run = run
        self.reference = reference
        self.device = device
        self.batch_size = batch_size
        self.progress = progress
        self.table = ScoreTable(run.root / "scores.csv")
        self.missing: set[str] = {im.path for im in run.images if not run.image_path(im).is_file()}
        self.references: dict[ImageKey, ImageRecord] = {
            im.key: im for im in run.images if im.variant == reference
        }
        self.last_flush = time.monotonic()

    def pending(self, metric: Metric) -> tuple[list[ImageRecord], int]:
        """Images still to score with `metric`, and how many lack a reference image."""
        todo, without_reference = [], 0
        for image in self.run.images:
            if (image.variant, image.prompt_id, image.seed, image.caption_mode, metric.name) in self.table:
                continue
            if image.path in self.missing:
                continue
            if metric.needs_texts and not self.run.prompts[image.prompt_id].texts:
                continue
            if metric.reference is not None:
                if image.variant == self.reference:
                    continue
                ref = self.references.get(image.key)
                if ref is None or ref.path in self.missing:
                    without_reference += 1
                    continue
            todo.append(image)
        return todo, without_reference

    def _read(self, image: ImageRecord) -> np.ndarray | None:
        try:
            return load_image(self.run.image_path(image))
        except (OSError, ValueError) as exc:
            logger.warning("cannot read %s: %s", image.path, exc)
            self.missing.add(image.path)
            return None

    def items(
        self, metric: Metric, batch: Sequence[ImageRecord]
    ) -> tuple[list[ImageRecord], list[ScoreItem]]:
        kept, items = [], []
        for image in batch:
            pixels = self._read(image)
            if pixels is None:
                continue
            prompt = self.run.prompts[image.prompt_id]
            reference = None
            if metric.reference is not None:
                ref = self.references[image.key]
                reference = self._read(ref)
                if reference is None:
                    continue
                if reference.shape != pixels.shape:
                    raise RunFolderError(
                        f"{image.path} is {pixels.shape[1]}x{pixels.shape[0]} but its reference {ref.path} is "
                        f"{reference.shape[1]}x{reference.shape[0]}; fidelity needs images of one size"
                    )
            kept.append(image)
            items.append(
                ScoreItem(image=pixels, prompt=prompt.prompt, texts=prompt.texts, reference=reference)
            )
        return kept, items

    def flush(self, force: bool = False) -> None:
        if self.table.dirty and (force or time.monotonic() - self.last_flush > FLUSH_SECONDS):
            self.table.write()
            self.last_flush = time.monotonic()

    def score(self, metric: Metric, todo: list[ImageRecord]) -> int:
        added = 0
        with tqdm(
            total=len(todo), desc=metric.name, unit="img", disable=not self.progress, leave=False
        ) as bar:
            for start in range(0, len(todo), self.batch_size):
                kept, items = self.items(metric, todo[start : start + self.batch_size])
                values = metric.score(items) if items else []
                if len(values) != len(items):
                    raise RuntimeError(f"{metric.name} returned {len(values)} scores for {len(items)} images")
                for image, value in zip(kept, values, strict=True):
                    if value is not None:
                        self.table.add(image, metric.name, value)
                        added += 1
                bar.update(min(self.batch_size, len(todo) - start))
                self.flush()
        return added


def evaluate_run(
    run_dir: str | Path,
    metrics: Iterable[str | Metric] | None = None,
    *,
    device: str = "cpu",
    batch_size: int = 8,
    reference: str | None = None,
    progress: bool = True,
    expect_hashes: Mapping[str, Iterable[str]] | None = None,
    checks: bool = True,
) -> EvalResult:
    """Score a run folder's images, resuming from its scores.csv; writes scores.csv and metrics.json.

    run_dir: a folder with run.json, prompts.jsonl, manifest.jsonl and the images.
    metrics: names or Metric objects (default: every registered metric); the checks (`blocked`) are added
    unless `checks=False`.
    reference: the variant fidelity metrics compare against (default: run.json's "reference_variant", or fp8).
    expect_hashes: {metric: sha256 values} the metric's weight files must have exactly; anything else raises
    ConfigError before any image is scored (`ditq.metrics.weights`).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    chosen = resolve_metrics(metrics, checks=checks)
    run = RunFolder.read(run_dir)
    reference = reference or run.run.get("reference_variant") or "fp8"
    state = _Evaluation(run, reference, device, batch_size, progress)
    if state.missing:
        logger.warning("%d image files listed in manifest.jsonl are missing", len(state.missing))

    metrics_path = run.root / "metrics.json"
    entries = _previous_entries(metrics_path)
    weights = _pinned_weights(chosen, entries, {k: set(v) for k, v in (expect_hashes or {}).items()})
    statuses: dict[str, MetricStatus] = {}
    new_rows: dict[str, int] = {}
    paths = {(im.variant, im.prompt_id, im.seed, im.caption_mode): im.path for im in run.images}
    try:
        for metric in chosen:
            status = metric.status()
            if status.available and metric.reference is not None and not state.references:
                status = MetricStatus.missing(
                    f"reference variant {reference!r} has no images in manifest.jsonl"
                )
            todo, without_reference = state.pending(metric) if status.available else ([], 0)
            if todo:
                try:
                    metric.load(device)
                except CheckpointError as exc:
                    status = MetricStatus.missing(str(exc))
            if not status.available:  # the caller prints the statuses once; the log keeps it for debugging
                logger.debug("%s unavailable: %s", metric.name, status.reason)
            else:
                if without_reference:
                    logger.warning("%s: %d images have no reference image", metric.name, without_reference)
                try:
                    new_rows[metric.name] = state.score(metric, todo) if todo else 0
                finally:
                    metric.unload()
                    state.flush(force=True)
            statuses[metric.name] = status
            entry = {"available": status.available, "reason": status.reason, **metric.describe()}
            entry["reference"] = reference if metric.reference is not None else None
            entry["rows"] = state.table.count(metric.name)
            if metric.reference is not None:
                entry["without_reference"] = without_reference
            if metric.name in weights:
                entry["weights"] = [w.as_dict() for w in weights[metric.name]]
            elif status.available and metric.weight_files():
                previous = entries.get(metric.name, {}).get("weights") or []
                entry["weights"] = [w.as_dict() for w in hash_weights(metric.weight_files(), previous)]
            if metric.family == "check":
                flagged = sorted(paths.get(key[:4], "") for key in state.table.flagged(metric.name))
                entry["flagged"] = len(flagged)
                entry["flagged_images"] = flagged
            entries[metric.name] = entry
    finally:
        if not state.table.path.exists():
            state.table.write()  # header only: the evaluation ran, nothing to score
        state.flush(force=True)
        missing = sorted(state.missing)
        write_json_atomic(
            metrics_path,
            {
                "version": 1,
                "ditq_version": __version__,
                "reference_variant": reference,
                "metrics": dict(sorted(entries.items())),
                "missing_images": missing,
            },
        )
    return EvalResult(
        scores_path=state.table.path,
        metrics_path=metrics_path,
        statuses=statuses,
        new_rows=new_rows,
        missing_images=missing,
    )


def _pinned_weights(
    chosen: Sequence[Metric], entries: dict[str, dict], expected: dict[str, set[str]]
) -> dict[str, list]:
    """Hash and check the weights of every metric named in `expected`, before anything is scored."""
    by_name = {m.name: m for m in chosen}
    unknown = sorted(set(expected) - set(by_name))
    if unknown:
        raise ConfigError(
            f"--expect-hash names {', '.join(unknown)}, not among the metrics evaluated ({', '.join(by_name)})"
        )
    pinned = {}
    for name, digests in expected.items():
        metric = by_name[name]
        status = metric.status()
        if not status.available:
            raise ConfigError(f"--expect-hash {name}=...: {name} is unavailable: {status.reason}")
        previous = entries.get(name, {}).get("weights") or []
        files = hash_weights(metric.weight_files(), previous)
        check_expected(name, files, digests)
        pinned[name] = files
    return pinned


def _previous_entries(path: Path) -> dict[str, dict]:
    """Metric entries of an earlier metrics.json, kept for metrics not run this time."""
    if not path.is_file():
        return {}
    from ditq.errors import DitqError
    from ditq.io.jsonfile import read_json

    try:
        data = read_json(path, "metrics.json")
    except DitqError as exc:  # not UTF-8, not JSON, not an object: the scores are rewritten from the images
        logger.warning("%s; it is rewritten", exc)
        return {}
    entries = data.get("metrics")
    if not isinstance(entries, dict):
        return {}
    return {str(k): v for k, v in entries.items() if isinstance(v, dict)}
