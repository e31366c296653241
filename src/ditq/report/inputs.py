"""Reading a run folder (run.json, scores.csv, metrics.json, prompts.jsonl, manifest.jsonl) for the report.

Layout: docs/DESIGN.md, "Run folders". Only run.json is required; a run that has not been scored yet (no
scores.csv, or one with a header only) loads with an empty score table and the report says so. Inconsistent
input raises `RunFolderError` naming the file, the line or field, and what was expected.

No score is dropped silently: a PSNR of identical images (`inf`) is kept (the analysis aggregates PSNR over MSE),
and the `blocked` check's rows mark the images the analysis leaves out of quality means. Only empty or NaN
values, and infinities of other metrics, are dropped, and counted for the report's data notes.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditq.errors import DitqError
from ditq.io.jsonfile import get_field, read_json, read_jsonl

SCORE_COLUMNS = ("variant", "prompt_id", "seed", "caption_mode", "category", "metric", "value")
FAMILIES = ("fidelity", "text", "preference", "check")
# Metrics whose value is +inf for identical images and is aggregated over MSE (ditq.stats.psnr_unit_values).
PSNR_METRICS = frozenset({"psnr"})
BLOCKED = "blocked"

# (variant, caption_mode, metric) -> {(prompt_id, seed): value}
CellKey = tuple[str, str, str]
Observation = tuple[str, int]


class RunFolderError(DitqError):
    """A run folder file is missing, malformed, or inconsistent with run.json."""


@dataclass(frozen=True, kw_only=True)
class VariantInfo:
    """One benchmarked pipeline: sizes are {component: bytes}, e.g. {"transformer": 9583465712, ...}; `folder` the
    pipeline folder the run loaded, `offload` the policy its images ran under (when run.json records them)."""

    name: str
    model: str | None
    format: str | None
    bytes_on_disk: dict[str, int]
    resident_bytes: dict[str, int]
    folder: str | None = None
    offload: str | None = None


@dataclass(frozen=True, kw_only=True)
class MetricInfo:
    """A metric's entry in metrics.json. `reference` names the variant a fidelity metric compares against."""

    name: str
    available: bool
    reason: str | None
    higher_is_better: bool
    reference: str | None
    family: str
    model: str | None
    weights: tuple[dict[str, Any], ...] = ()


@dataclass
class ScoreTable:
    """scores.csv indexed by (variant, caption_mode, metric); empty, NaN and (outside PSNR) infinite values are
    dropped and counted. `blocked` holds the (variant, caption_mode, prompt_id, seed) images the blocked check
    flagged."""

    cells: dict[CellKey, dict[Observation, float]] = field(default_factory=dict)
    category: dict[str, str] = field(default_factory=dict)
    dropped_nonfinite: dict[tuple[str, str], int] = field(default_factory=dict)
    n_rows: int = 0
    blocked: set[tuple[str, str, str, int]] = field(default_factory=set)

    def observations(
        self,
        variant: str,
        caption_mode: str,
        metric: str,
        category: str | None = None,
        *,
        unblocked: bool = False,
        reference: str | None = None,
    ) -> dict[Observation, float]:
        """{(prompt_id, seed): value} for one variant, caption mode and metric (optionally one category).

        unblocked: leave out images the blocked check flagged, and with `reference` also those whose reference
        image (same prompt, seed and mode) was flagged.
        """
        obs = self.cells.get((variant, caption_mode, metric), {})
        if category is not None:
            obs = {key: v for key, v in obs.items() if self.category.get(key[0]) == category}
        if unblocked and self.blocked:
            sides = [variant] + ([reference] if reference else [])
            obs = {
                k: v for k, v in obs.items() if not any((s, caption_mode, *k) in self.blocked for s in sides)
            }
        return obs

    def blocked_count(
        self, variant: str, caption_mode: str, metric: str, reference: str | None = None
    ) -> int:
        """How many of the metric's scored images the `unblocked` filter leaves out."""
        every = self.observations(variant, caption_mode, metric)
        kept = self.observations(variant, caption_mode, metric, unblocked=True, reference=reference)
        return len(every) - len(kept)

    def caption_modes(self) -> list[str]:
        return sorted({mode for _v, mode, _m in self.cells})

    def metrics(self) -> list[str]:
        return list(dict.fromkeys(metric for _v, _mode, metric in self.cells))

    def categories(self, metric: str | None = None) -> list[str]:
        prompts = {p for (_v, _mode, m), obs in self.cells.items() if metric in (None, m) for p, _s in obs}
        return sorted({self.category[p] for p in prompts if p in self.category})


@dataclass(kw_only=True)
class RunData:
    """Everything the report reads from a run folder."""

    root: Path
    suite: str | None
    prompt_ids: list[str]
    seeds: list[int]
    caption_modes: list[str]
    settings: dict[str, Any]
    variants: dict[str, VariantInfo]
    reference_variant: str | None
    ditq_version: str | None
    extra: dict[str, Any]
    prompts: dict[str, dict[str, Any]]
    manifest: list[dict[str, Any]]
    metrics: dict[str, MetricInfo]
    scores: ScoreTable
    missing_images: list[str] = field(default_factory=list)
    image_size: tuple[int, int] | None = None  # (height, width) of the generated images, when known
    host: dict[str, Any] = field(
        default_factory=dict
    )  # run.json "host": cpu, gpu, threads, torch, load_avg...
    tiny: bool = False  # the reference is the built-in tiny model (random weights)
    date: str | None = None  # YYYY-MM-DD the last image was recorded (manifest.jsonl, else run.json, mtime)


def _read_json(path: Path) -> Any:
    return read_json(path, f"a run folder's {path.name}", expect=None, error=RunFolderError)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    # a run killed mid-append leaves a torn last manifest line, which `ditq run` also ignores (and rewrites)
    torn_tail = path.name == "manifest.jsonl"
    what = f"a {path.stem} record"
    return [r for _, r in read_jsonl(path, what, error=RunFolderError, torn_tail=torn_tail)]


def _run_fields(run: dict[str, Any], path: Path) -> None:
    """The run.json fields the report reads, of the types it reads them as."""
    where = str(path)
    for name in ("prompt_ids", "seeds", "caption_modes"):
        get_field(run, name, (list, type(None)), where, None, RunFolderError)
    for name in ("settings", "host"):
        get_field(run, name, (dict, type(None)), where, None, RunFolderError)
    for name in ("suite", "reference_variant", "ditq_version"):
        get_field(run, name, (str, type(None)), where, None, RunFolderError)
    for i, seed in enumerate(run.get("seeds") or []):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RunFolderError(f"{path}: seeds[{i}] is {seed!r}, expected an integer")


def _byte_counts(value: Any, where: str) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RunFolderError(f"{where}: expected {{component: bytes}}, got {type(value).__name__}")
    out = {}
    for component, n in value.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise RunFolderError(
                f"{where}.{component}: expected a non-negative integer byte count, got {n!r}"
            )
        out[str(component)] = n
    return out


def _optional_text(spec: dict[str, Any], key: str, where: str) -> str | None:
    value = spec.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RunFolderError(f"{where}.{key}: expected a string, got {type(value).__name__}")
    return value


def _load_variants(raw: Any, path: Path) -> dict[str, VariantInfo]:
    if not isinstance(raw, dict) or not raw:
        raise RunFolderError(f"{path}: field 'variants' must be a non-empty object {{name: {{...}}}}")
    variants = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict):
            raise RunFolderError(f"{path}: variants.{name} must be an object")
        variants[name] = VariantInfo(
            name=name,
            model=None if spec.get("model") is None else str(spec["model"]),
            format=None if spec.get("format") is None else str(spec["format"]),
            bytes_on_disk=_byte_counts(spec.get("bytes_on_disk"), f"{path}: variants.{name}.bytes_on_disk"),
            resident_bytes=_byte_counts(
                spec.get("resident_bytes"), f"{path}: variants.{name}.resident_bytes"
            ),
            folder=_optional_text(spec, "folder", f"{path}: variants.{name}"),
            offload=_optional_text(spec, "offload", f"{path}: variants.{name}"),
        )
    return variants


def _load_metrics(path: Path) -> tuple[dict[str, MetricInfo], list[str]]:
    """Metric entries and the images `ditq eval` found missing. Accepts eval's file ({"version", "metrics":
    {name: entry}, "missing_images": [...], ...}) and a bare {name: entry} object."""
    if not path.is_file():
        return {}, []
    raw = _read_json(path)
    missing_images: list[str] = []
    if isinstance(raw, dict) and isinstance(raw.get("metrics"), dict):
        listed = get_field(raw, "missing_images", (list, type(None)), str(path), None, RunFolderError)
        missing_images = [str(p) for p in listed or []]
        raw = raw["metrics"]
    if not isinstance(raw, dict):
        raise RunFolderError(f"{path}: expected an object {{metric name: {{available, reason, ...}}}}")
    metrics = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict):
            raise RunFolderError(f"{path}: metric {name!r} must be an object")
        if not isinstance(spec.get("available"), bool):
            raise RunFolderError(f"{path}: metric {name!r}: field 'available' must be true or false")
        hib = spec.get("higher_is_better")
        if spec["available"] and not isinstance(hib, bool):
            raise RunFolderError(f"{path}: metric {name!r}: field 'higher_is_better' must be true or false")
        reference = spec.get("reference")
        family = spec.get("family") or ("fidelity" if reference else "other")
        weights = spec.get("weights") or []
        if not isinstance(weights, list) or not all(
            isinstance(w, dict) and isinstance(w.get("sha256"), str) for w in weights
        ):
            raise RunFolderError(
                f"{path}: metric {name!r}: field 'weights' must be a list of {{file, sha256, ...}}"
            )
        metrics[name] = MetricInfo(
            name=name,
            available=spec["available"],
            reason=None if spec.get("reason") is None else str(spec["reason"]),
            higher_is_better=bool(hib) if isinstance(hib, bool) else True,
            reference=None if reference is None else str(reference),
            family=str(family),
            model=None if spec.get("model") is None else str(spec["model"]),
            weights=tuple(weights),
        )
    return metrics, missing_images


def _parse_value(text: str) -> float:
    text = text.strip()
    if text == "" or text.lower() == "nan":
        return math.nan
    return float(text)


def _load_scores(
    path: Path, variants: Iterable[str], prompt_ids: list[str], caption_modes: list[str]
) -> ScoreTable:
    table = ScoreTable()
    if not path.is_file():
        return table
    known_variants = set(variants)
    known_prompts = set(prompt_ids)
    known_modes = set(caption_modes)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in SCORE_COLUMNS if c not in header]
        if missing:
            raise RunFolderError(
                f"{path}: missing column(s) {', '.join(missing)}; expected header {','.join(SCORE_COLUMNS)}"
            )
        for row in reader:
            line = reader.line_num
            variant, prompt_id, mode = row["variant"], row["prompt_id"], row["caption_mode"]
            if variant not in known_variants:
                raise RunFolderError(
                    f"{path}:{line}: variant {variant!r} is not in run.json variants ({', '.join(sorted(known_variants))})"
                )
            if known_prompts and prompt_id not in known_prompts:
                raise RunFolderError(f"{path}:{line}: prompt_id {prompt_id!r} is not in run.json prompt_ids")
            if known_modes and mode not in known_modes:
                raise RunFolderError(
                    f"{path}:{line}: caption_mode {mode!r} is not in run.json caption_modes ({', '.join(caption_modes)})"
                )
            try:
                seed = int(row["seed"])
            except (TypeError, ValueError):
                raise RunFolderError(f"{path}:{line}: seed {row['seed']!r} is not an integer") from None
            try:
                value = _parse_value(row["value"] or "")
            except ValueError:
                raise RunFolderError(f"{path}:{line}: value {row['value']!r} is not a number") from None
            metric = row["metric"]
            table.n_rows += 1
            table.category.setdefault(prompt_id, row["category"] or "uncategorized")
            if not (math.isfinite(value) or (value == math.inf and metric in PSNR_METRICS)):
                key = (variant, metric)
                table.dropped_nonfinite[key] = table.dropped_nonfinite.get(key, 0) + 1
                continue
            if metric == BLOCKED and value >= 0.5:
                table.blocked.add((variant, mode, prompt_id, seed))
            cell = table.cells.setdefault((variant, mode, metric), {})
            previous = cell.get((prompt_id, seed))
            if previous is not None and previous != value:
                raise RunFolderError(
                    f"{path}:{line}: second, different value for {variant}/{mode}/{prompt_id}/seed {seed}/{metric}"
                )
            cell[(prompt_id, seed)] = value
    return table


def _image_size(root: Path, settings: Any, manifest: list[dict[str, Any]]) -> tuple[int, int] | None:
    """(height, width) from run.json settings, else from the first image of the manifest that can be read."""
    if isinstance(settings, dict):
        h, w = settings.get("height"), settings.get("width")
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            return h, w
    for record in manifest:
        path = root / str(record.get("path") or "")
        if path.is_file():
            try:
                from PIL import Image

                with Image.open(path) as image:
                    return image.height, image.width
            except OSError:
                continue
    return None


def load_run(run_dir: str | Path) -> RunData:
    """Read and check a run folder; see the module docstring for what is optional."""
    root = Path(run_dir)
    run_path = root / "run.json"
    if not run_path.is_file():
        raise RunFolderError(f"{run_path} not found: expected a run folder written by `ditq run`")
    run = _read_json(run_path)
    if not isinstance(run, dict):
        raise RunFolderError(f"{run_path}: expected a JSON object")
    _run_fields(run, run_path)
    variants = _load_variants(run.get("variants"), run_path)
    prompts_path = root / "prompts.jsonl"
    prompts = {str(r.get("id")): r for r in _read_jsonl(prompts_path)} if prompts_path.is_file() else {}
    prompt_ids = [str(p) for p in run.get("prompt_ids") or prompts]
    caption_modes = [str(m) for m in run.get("caption_modes") or []]
    manifest_path = root / "manifest.jsonl"
    manifest = _read_jsonl(manifest_path) if manifest_path.is_file() else []
    scores = _load_scores(root / "scores.csv", variants, prompt_ids, caption_modes)
    metrics, missing_images = _load_metrics(root / "metrics.json")
    unknown = [m for m in scores.metrics() + [m for _v, m in scores.dropped_nonfinite] if m not in metrics]
    if unknown:
        raise RunFolderError(
            f"{root / 'metrics.json'}: no entry for metric(s) {', '.join(sorted(set(unknown)))} found in scores.csv"
        )
    known = {"suite", "prompt_ids", "seeds", "caption_modes", "settings", "variants", "reference_variant"}
    known |= {"ditq_version", "host", "tiny"}
    host = run.get("host")
    if host is not None and not isinstance(host, dict):
        raise RunFolderError(f"{run_path}: field 'host' must be an object {{cpu, gpu, threads, ...}}")
    dated = manifest_path if manifest_path.is_file() else run_path
    return RunData(
        host=dict(host or {}),
        tiny=run.get("tiny") is True,
        date=time.strftime("%Y-%m-%d", time.localtime(dated.stat().st_mtime)),
        image_size=_image_size(root, run.get("settings") or {}, manifest),
        root=root,
        suite=None if run.get("suite") is None else str(run["suite"]),
        prompt_ids=prompt_ids,
        seeds=[int(s) for s in run.get("seeds") or []],
        caption_modes=caption_modes or scores.caption_modes(),
        settings=dict(run.get("settings") or {}),
        variants=variants,
        reference_variant=run.get("reference_variant"),
        ditq_version=None if run.get("ditq_version") is None else str(run["ditq_version"]),
        extra={k: v for k, v in run.items() if k not in known},
        prompts=prompts,
        manifest=manifest,
        metrics=metrics,
        scores=scores,
        missing_images=missing_images,
    )
