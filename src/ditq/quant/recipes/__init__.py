"""`quantize_pipeline(source, out, recipe)`: a complete pipeline folder with both transformers quantized.

Recipes are registered by name; each converts one transformer component folder. Everything else (scheduler,
tokenizer, text encoder, VAE, prompt-enhancer head) is reused from the source (hard-linked where possible). The
output is built under `<out>.partial/` and renamed when complete; an interrupted run resumes with the transformers
it already finished. `ditq.json` records the recipe, the source and the ditq version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ditq import __version__
from ditq.errors import ConfigError
from ditq.io.files import link_or_copy_tree
from ditq.registry import Registry

log = logging.getLogger(__name__)
TRANSFORMERS = ("transformer", "unconditional_transformer")


@dataclass(frozen=True)
class Recipe:
    name: str
    format: str
    description: str
    # (source component folder, destination component folder, options) -> summary dict
    convert: Callable[[Path, Path, dict], dict]


RECIPES: Registry[Recipe] = Registry("recipe")


def _gguf(name: str) -> Callable[[Path, Path, dict], dict]:
    def convert(src: Path, dst: Path, options: dict) -> dict:
        from ditq.quant.recipes.gguf import GGUF_NAME, GGUFRecipe, write_transformer_gguf

        imatrix = None
        stats = options.get("stats")
        if stats is not None:
            from ditq.quant.int8.calibrate import importance

            def imatrix(module: str, _t=src.name):
                return importance(stats, _t, module)

        recipe = GGUFRecipe(name=name, threads=options.get("threads"))
        return write_transformer_gguf(src, dst / GGUF_NAME, recipe, imatrix, options.get("progress", True))

    return convert


def _nf4(src: Path, dst: Path, options: dict) -> dict:
    from ditq.quant.recipes.nf4 import write_transformer_nf4

    return write_transformer_nf4(
        src, dst / "diffusion_pytorch_model.safetensors", options.get("progress", True)
    )


def int8_config(options: dict):
    """SmoothQuant over W8A8 when calibration statistics are given, plain W8A8 otherwise."""
    from ditq.quant.int8.config import Int8W8A8Config, SmoothQuantConfig

    base = Int8W8A8Config()
    if options.get("stats") is None:
        log.warning(
            "int8 without calibration statistics: plain W8A8, no SmoothQuant (run ditq calibrate first)"
        )
        return base
    alpha = str(options.get("alpha", "auto"))
    if alpha == "auto":
        return SmoothQuantConfig(base=base, alpha=None)
    try:
        value = float(alpha)
    except ValueError:
        raise ConfigError(f"--alpha {alpha!r}: expected 'auto' or a number in [0, 1]") from None
    return SmoothQuantConfig(base=base, alpha=value)


def _int8(src: Path, dst: Path, options: dict) -> dict:
    from ditq.quant.int8.convert import convert_transformer_int8

    comp = options["component"]
    report = convert_transformer_int8(
        src,
        dst,
        options.get("stats"),
        int8_config(options),
        transformer=comp,
        protect=options.get("protect_layers", {}).get(comp, ()),
        progress=options.get("progress", True),
    )
    return {
        "file": str(report.path),
        "bytes": report.bytes_written,
        "quantized": len(report.quantized),
        "kept_bf16": report.kept_float,
        "seconds": report.seconds,
        "recipe": report.recipe,
    }


def protect_layers(
    fragility: str | None,
    protect: int | None,
    protect_bytes: str | None,
    source: str | None = None,
    stats=None,
) -> dict[str, list[str]]:
    """Layers to keep in bf16 beyond the defaults, chosen most fragile first within a budget.

    The ranking comes from a fragility table (`ditq sensitivity`); without one it is measured here from the
    source model and the calibration statistics (each Linear alone in W8A8, whole-transformer output error).
    """
    if protect is None and protect_bytes is None:
        return {}
    from ditq.quant.int8.config import DEFAULT_PROTECT
    from ditq.quant.int8.sensitivity import ProtectBudget, choose_protected, rank, read_csv

    budget = ProtectBudget.parse(f"bytes={protect_bytes}" if protect_bytes else str(protect))
    if fragility is not None:
        rows = read_csv(fragility)
    elif stats is not None and source is not None:
        import torch

        from ditq.models.loading import load_transformer, resolve_source
        from ditq.quant.int8.sensitivity import measure_fragility

        log.info(
            "no fragility table given: measuring per-layer W8A8 fragility (ditq sensitivity does the same)"
        )
        folder = resolve_source(source)
        rows = []
        for comp in TRANSFORMERS:
            model, _ = load_transformer(folder / comp, torch.float32)
            rows += measure_fragility(model, stats, comp, int8_config({"stats": stats}))
            del model
        rows = rank(rows)
    else:
        raise ConfigError("--protect / --protect-bytes need calibration statistics (--stats) or --fragility")
    return choose_protected(rows, budget, DEFAULT_PROTECT)


for _name, _desc in (
    ("q8_0", "GGUF Q8_0 (8.5 bits/weight)"),
    ("q6_k", "GGUF Q6_K (6.56 bits/weight)"),
    ("q5_k", "GGUF Q5_K (5.5 bits/weight)"),
    ("q5_k_m", "GGUF Q5_K with qkv and ffn-down in Q6_K"),
    ("q4_k", "GGUF Q4_K (4.5 bits/weight)"),
    ("q4_k_m", "GGUF Q4_K with qkv and ffn-down in Q5_K"),
    ("q3_k", "GGUF Q3_K (3.44 bits/weight)"),
    ("q3_k_m", "GGUF Q3_K with qkv and ffn-down in Q4_K"),
    ("q2_k", "GGUF Q2_K (2.63 bits/weight)"),
):
    RECIPES.add(_name, Recipe(_name, "gguf", _desc, _gguf(_name)))
RECIPES.add("nf4", Recipe("nf4", "nf4", "bitsandbytes NF4, blocksize 64 (official NF4 layout)", _nf4))
RECIPES.add(
    "int8",
    Recipe("int8", "int8", "W8A8: int8 per-channel weights, per-token activations, SmoothQuant", _int8),
)


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


def quantize_pipeline(
    source: str,
    out: str | os.PathLike,
    recipe: str,
    options: dict | None = None,
    force: bool = False,
) -> Path:
    """Write `out` = the pipeline at `source` with both transformers converted by `recipe`."""
    from ditq.models.loading import check_folder, read_recipe, resolve_source

    spec = RECIPES.get(recipe)
    options = dict(options or {})
    src = resolve_source(source)
    index = check_folder(src)
    src_recipe = read_recipe(src)
    if src_recipe and src_recipe.get("format") not in (None, "fp8", "bf16"):
        raise ConfigError(
            f"{src} is already quantized ({src_recipe.get('format')}); quantize from the FP8 or bf16 reference"
        )
    for comp in TRANSFORMERS:
        refuse_quantized(src / comp)
    out = Path(out)
    record = {
        "format": spec.format,
        "recipe": {
            "name": spec.name,
            **{k: v for k, v in options.items() if k in ("alpha", "protect", "protect_bytes")},
        },
        "source": str(source),
        "source_folder": str(src),
        "ditq_version": __version__,
    }
    if (out / "ditq.json").is_file() and not force:
        done = json.loads((out / "ditq.json").read_text())
        if done.get("recipe", {}).get("name") == spec.name and done.get("source_folder") == str(src):
            log.info("%s already holds %s from %s; skipping", out, spec.name, src)
            return out
        raise ConfigError(
            f"{out} already holds a different model ({done.get('recipe')}); use another -o or --force"
        )
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for comp in index:
        if comp.startswith("_") or comp in TRANSFORMERS or not (src / comp).is_dir():
            continue
        link_or_copy_tree(src / comp, tmp / comp)
    for f in src.iterdir():
        if f.is_file() and f.name != "ditq.json":
            shutil.copy2(f, tmp / f.name)
    summaries = {}
    for comp in TRANSFORMERS:
        dst = tmp / comp
        marker = dst / ".ditq-done.json"
        if marker.is_file():
            summaries[comp] = json.loads(marker.read_text())
            log.info("%s: already converted, resuming after it", comp)
            continue
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        shutil.copy2(src / comp / "config.json", dst / "config.json")
        start = time.perf_counter()
        summaries[comp] = spec.convert(src / comp, dst, {**options, "component": comp})
        summaries[comp].setdefault("seconds", time.perf_counter() - start)
        marker.write_text(json.dumps(summaries[comp], default=str))
    for comp in TRANSFORMERS:
        (tmp / comp / ".ditq-done.json").unlink()
    # paths in the summaries point into the temporary folder: record where they will live
    record["summary"] = json.loads(json.dumps(summaries, default=str).replace(str(tmp), str(out)))
    (tmp / "ditq.json").write_text(json.dumps(record, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
