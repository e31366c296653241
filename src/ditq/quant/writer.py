"""`quantize_pipeline(source, recipe, out)`: the one writer of quantized pipeline folders.

Each transformer is converted by its recipe (`uncond_recipe` gives the unconditional branch another one: a
per-branch mix such as `int8+q4_k`); everything else (scheduler, tokenizer, text encoder, VAE, prompt-enhancer
head) is reused from the source, hard-linked where possible. The folder is built under `<out>.partial/` and renamed
when complete; an interrupted run resumes with the transformers it already finished, but only when the recipes, the
source and the calibration statistics are the ones it started with (the reuse key in `ditq.json`, see
`ditq.models.record`). A finished folder with the same key is reused as it is; any other existing folder is
refused unless `force` is given, which also clears a stale staging folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ditq._version import __version__
from ditq.errors import CheckpointError, ConfigError
from ditq.io.files import file_sha256, folder_fingerprint, link_or_copy, link_or_copy_tree, write_json_atomic
from ditq.models.record import RECORD_FILE, TRANSFORMERS, VariantRecord
from ditq.quant.recipes.base import ConvertContext, Recipe, parse_recipe

log = logging.getLogger(__name__)
DONE_MARKER = ".ditq-done.json"


@dataclass(frozen=True)
class Plan:
    """What one call writes: the recipe of each transformer, and the key a reusable folder must carry."""

    recipes: dict[str, Recipe]
    source: Path
    stats_sha256: str | None
    key: str

    @property
    def variant(self) -> str:
        names = [self.recipes[c].name for c in TRANSFORMERS]
        return names[0] if names[0] == names[1] else "+".join(names)


def source_fingerprint(folder: Path) -> str:
    """A cheap identity of a pipeline's transformer weights (`ditq.io.files.folder_fingerprint` of each)."""
    return "".join(folder_fingerprint(folder / comp)[:16] for comp in TRANSFORMERS)


def plan(
    source: Path, recipe: Recipe, uncond_recipe: Recipe | None, stats_path: str | Path | None, protect: dict
) -> Plan:
    recipes = {"transformer": recipe, "unconditional_transformer": uncond_recipe or recipe}
    uses_stats = any(r.uses_stats for r in recipes.values())
    stats_sha = file_sha256(stats_path) if stats_path is not None and uses_stats else None
    content = {
        "recipes": {c: r.to_dict() for c, r in recipes.items()},
        "source": source_fingerprint(source),
        "stats": stats_sha,
        "protect": {c: sorted(v) for c, v in protect.items()},
    }
    key = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]
    return Plan(recipes, source, stats_sha, key)


def refuse_quantized(component: Path) -> None:
    """ConfigError when a transformer folder already holds quantized weights (a GGUF file, integer or packed
    4-bit tensors), whatever its pipeline's ditq.json says; checked before anything is written."""
    import torch

    from ditq.io.safetensors_io import TensorSource

    if any(component.glob("*.gguf")):
        raise ConfigError(
            f"{component} holds a GGUF file: already quantized; quantize from the FP8 or bf16 reference"
        )
    source = TensorSource(component)
    for key in source.keys():
        dtype = source.info(key).dtype
        # byte tensors that are not weights (ComfyUI's `comfy_quant` JSON markers) may sit beside FP8 weights
        if key.endswith(".weight") and dtype in (torch.int8, torch.uint8):
            raise ConfigError(
                f"{component}: {key} is {dtype}: already quantized; quantize from the FP8 or bf16 reference"
            )


def _as_recipe(recipe: Recipe | str) -> Recipe:
    return parse_recipe(recipe) if isinstance(recipe, str) else recipe


def quantize_pipeline(
    source: str | os.PathLike,
    recipe: Recipe | str,
    out: str | os.PathLike,
    *,
    uncond_recipe: Recipe | str | None = None,
    stats=None,
    fragility: str | os.PathLike | None = None,
    threads: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Write `out`: the pipeline at `source` (a folder, hub id or `tiny`) with its transformers quantized.

    `stats` is a `CalibrationStats` file path (or object, then not part of the reuse key) for SmoothQuant, GGUF
    importance matrices and protect budgets; `fragility` a `ditq sensitivity` table for INT8 protect budgets.
    """
    from ditq.models.loading import check_folder, resolve_source

    recipe, uncond_recipe = _as_recipe(recipe), None if uncond_recipe is None else _as_recipe(uncond_recipe)
    src = resolve_source(str(source))
    index = check_folder(src)
    _refuse_quantized_source(src)
    stats_obj, stats_path = _load_stats(stats)
    out = Path(out)
    protect = _resolve_protect(recipe, uncond_recipe, src, stats_obj, fragility)
    p = plan(src, recipe, uncond_recipe, stats_path, protect)
    if _reusable(out, p, force):
        return out
    tmp = out.with_name(out.name + ".partial")
    _prepare_staging(tmp, p, force)
    _reuse_components(src, tmp, index)
    summaries = {}
    for comp in TRANSFORMERS:
        ctx = ConvertContext(
            component=comp,
            stats=stats_obj,
            protect=tuple(protect.get(comp, ())),
            threads=threads,
            progress=progress,
        )
        summaries[comp] = _convert_component(src / comp, tmp / comp, p, ctx)
    # paths in the summaries point into the staging folder: record where they will live
    summaries = json.loads(json.dumps(summaries, default=str).replace(str(tmp), str(out)))
    record = _record(p, str(source), src, summaries)
    gather_smoothing(tmp)
    for comp in TRANSFORMERS:
        (tmp / comp / DONE_MARKER).unlink()
    (tmp / ".ditq-key").unlink(missing_ok=True)
    write_json_atomic(tmp / RECORD_FILE, record.to_json())
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def save_smoothing_part(folder: Path, component: str, vectors: dict) -> None:
    """One transformer's folded smoothing vectors {group: s [K]}, as `.smoothing-<component>.safetensors` in the
    staging folder, keys `<component>.<group>`."""
    from ditq.io.safetensors_io import save_safetensors

    path = folder / f".smoothing-{component}.safetensors"
    part = path.with_name(path.name + ".partial")
    save_safetensors(
        part, {f"{component}.{g}": s.detach().float().cpu().contiguous() for g, s in vectors.items()}
    )
    os.replace(part, path)


def gather_smoothing(tmp: Path) -> None:
    """Both transformers' parts into the pipeline folder's `smoothing.safetensors` (`ditq.lora.frames`), where
    a LoRA on SmoothQuant-folded INT8 layers is mapped into their coordinates; the parts are removed. A component
    without folded groups (another recipe, or a rerun) leaves no part, and a stale file goes."""
    from ditq.io.safetensors_io import TensorSource, save_safetensors

    parts = {c: tmp / f".smoothing-{c}.safetensors" for c in TRANSFORMERS}
    tensors = {}
    for path in parts.values():
        if not path.is_file():
            continue
        src = TensorSource(path)
        try:
            tensors.update({k: src.get(k).clone() for k in src.keys()})
        finally:
            src.close()
    final = tmp / "smoothing.safetensors"
    if tensors:
        save_safetensors(final, tensors)
    else:
        final.unlink(missing_ok=True)
    for path in parts.values():
        path.unlink(missing_ok=True)


def _record(p: Plan, source: str, src: Path, summaries: dict) -> VariantRecord:
    return VariantRecord(
        variant=p.variant,
        formats={c: r.format for c, r in p.recipes.items()},
        recipes={c: r.to_dict() for c, r in p.recipes.items()},
        source=source,
        source_folder=str(src),
        key=p.key,
        stats_sha256=p.stats_sha256,
        summary=summaries,
        ditq_version=__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _refuse_quantized_source(src: Path) -> None:
    record = VariantRecord.load(src)
    if record is not None and record.is_quantized:
        formats = ", ".join(sorted(set(record.formats.values())))
        raise ConfigError(f"{src} is already quantized ({formats}); quantize from the FP8 or bf16 reference")
    for comp in TRANSFORMERS:
        refuse_quantized(src / comp)


def _load_stats(stats):
    """(CalibrationStats or None, its file path or None)."""
    if stats is None:
        return None, None
    from ditq.quant.calibration import CalibrationStats

    if isinstance(stats, CalibrationStats):
        return stats, None
    return CalibrationStats.load(stats), Path(stats)


def _resolve_protect(recipe, uncond_recipe, src, stats, fragility) -> dict[str, list[str]]:
    from ditq.quant.recipes.int8 import Int8Recipe, resolve_protected

    out: dict[str, list[str]] = {}
    for comp, r in (("transformer", recipe), ("unconditional_transformer", uncond_recipe or recipe)):
        if isinstance(r, Int8Recipe) and r.protect_budget is not None:
            chosen = resolve_protected(r, src, stats, fragility)
            out[comp] = list(chosen.get(comp, []))
    return out


def _reusable(out: Path, p: Plan, force: bool) -> bool:
    """True when `out` already holds exactly this plan; ConfigError when it holds something else (and no force)."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; choose another output or remove it")
    record = VariantRecord.load(out) if (out / RECORD_FILE).is_file() else None
    if record is not None and record.key == p.key:
        log.info("%s already holds %s from %s with the same statistics; reusing it", out, p.variant, p.source)
        return True
    if force:
        return False
    if record is None:
        raise ConfigError(
            f"{out}: exists and is not a ditq pipeline folder; choose another output or pass --force to replace it"
        )
    raise ConfigError(
        f"{out} holds {record.variant} made with other recipe options, source or statistics "
        f"(key {record.key or 'none'}, this request {p.key}); use another -o or --force to rebuild it"
    )


def _prepare_staging(tmp: Path, p: Plan, force: bool) -> None:
    """Create the staging folder, or resume in it when it was started with the same key."""
    key_file = tmp / ".ditq-key"
    if tmp.exists():
        same = key_file.is_file() and key_file.read_text().strip() == p.key
        if not same:
            if not force and any(tmp.iterdir()):
                raise ConfigError(
                    f"{tmp}: an interrupted conversion with other recipe options, source or statistics; pass "
                    "--force to discard it, or rerun with the options it was started with"
                )
            shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    if not key_file.is_file():
        key_file.write_text(p.key + "\n")


def _reuse_components(src: Path, tmp: Path, index: dict) -> None:
    for comp in index:
        if comp.startswith("_") or comp in TRANSFORMERS or not (src / comp).is_dir():
            continue
        link_or_copy_tree(src / comp, tmp / comp)
    for f in src.iterdir():
        if f.is_file() and f.name != RECORD_FILE:
            link_or_copy(f, tmp / f.name)


def _convert_component(src: Path, dst: Path, p: Plan, ctx: ConvertContext) -> dict:
    marker = dst / DONE_MARKER
    if marker.is_file():
        from ditq.io.jsonfile import read_json

        try:  # a marker that cannot be read means "not done": the component is converted again
            done = read_json(marker, "a conversion marker")
        except CheckpointError as exc:
            log.warning("%s; converting %s again", exc, ctx.component)
            done = None
        if isinstance(done, dict) and done.get("key") == p.key and isinstance(done.get("summary"), dict):
            log.info("%s: already converted, resuming after it", ctx.component)
            return done["summary"]
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    start = time.perf_counter()
    summary = p.recipes[ctx.component].convert(src, dst, ctx)
    summary.setdefault("seconds", time.perf_counter() - start)
    write_json_atomic(marker, {"key": p.key, "summary": summary})
    return summary
