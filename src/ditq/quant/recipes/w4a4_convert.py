"""Streaming conversion of one Ideogram 4 transformer (official FP8, or float) to a W4A4 file.

Two passes over the source, one tensor at a time, like the INT8 writer: first the smoothing of every group is
chosen (each unit's weight dequantized to float32 while its group is searched, then dropped), then every output
tensor is declared and each module is written before the next is read: norms with 1/s folded in (ConvRot), units
with their rows divided (ConvRot) and quantized (`ditq.quant.recipes.w4a4_plan.unit_tensors`), the rest copied.
Peak memory is one fused weight in float32 and its SVD, not the model.

Output: `diffusion_pytorch_model.safetensors` with official fused names in comfy-kitchen's / ComfyUI's layout,
`comfy_quant` markers per layer and the file-level `_quantization_metadata` (the layers and their markers), the
recipe and its decisions under `ditq.recipe`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import torch

from ditq._version import __version__
from ditq.errors import CheckpointError
from ditq.formats.base import kept_dtype
from ditq.formats.fp8 import SCALE_ALIASES
from ditq.formats.int8 import QUANT_METADATA_KEY
from ditq.io.safetensors_io import StreamingSafetensorsWriter
from ditq.models.weights import group_by_module
from ditq.quant.calibration import CalibrationStats, fingerprint
from ditq.quant.int8.smoothquant import fold_into_norm
from ditq.quant.recipes.base import ConvertContext
from ditq.quant.recipes.source import FusedReader, StoredRows
from ditq.quant.recipes.w4a4 import ConvRotW4A4Recipe, W4A4Recipe
from ditq.quant.recipes.w4a4_plan import (
    choose_smoothing,
    kept_layers,
    pick_transformer,
    plan_folds,
    unit_tensors,
    units_of,
)

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
RECIPE_KEY = "ditq.recipe"
_BLOCK_RE = re.compile(r"^layers\.(\d+)\.")


def linear_shapes_of(folder: Path) -> dict[str, tuple[int, int]]:
    """{split Linear name: (out, in)} of the transformer this component folder's config describes (meta device)."""
    from accelerate import init_empty_weights
    from diffusers import Ideogram4Transformer2DModel

    from ditq.quant.calibration import linear_shapes

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json")
    with init_empty_weights():
        model = Ideogram4Transformer2DModel.from_config(Ideogram4Transformer2DModel.load_config(folder))
    return linear_shapes(model)


def _order(module: str) -> tuple[int, str]:
    m = _BLOCK_RE.match(module)
    return (int(m.group(1)) if m else -1, module)


class _Writer:
    def __init__(self, src: Path, recipe: W4A4Recipe, ctx: ConvertContext) -> None:
        self.src, self.recipe, self.ctx = src, recipe, ctx
        self.reader = FusedReader(src)
        self.linears = linear_shapes_of(src)
        self.units = units_of(self.linears)
        self.modules = group_by_module(list(self.reader.keys))
        extra = {m: "protected" for n in ctx.protect for m in self.units.get(n, [n]) if m in self.linears}
        self.kept = kept_layers(recipe, self.linears, extra)
        self._check_source()

    def _check_source(self) -> None:
        for unit in self.units:
            suffixes = self.modules.get(unit)
            if suffixes is None or "weight" not in suffixes:
                raise CheckpointError(f"{self.src}: missing tensor {unit}.weight")
            dt = self.reader.dtype(f"{unit}.weight")
            if not dt.is_floating_point:
                raise CheckpointError(
                    f"{self.src}: {unit}.weight has dtype {dt} (already quantized?); convert from the FP8 or "
                    "bf16 checkpoint"
                )
            extra = set(suffixes) - {"weight", "bias", *SCALE_ALIASES}
            if extra:
                raise CheckpointError(
                    f"{self.src}: {unit} has tensors {sorted(extra)}; only FP8 (weight_scale) or float sources "
                    "convert"
                )

    def unit_weight(self, unit: str) -> torch.Tensor:
        """The unit's weight [N, K] as float32 (FP8 dequantized with its row scales)."""
        w = self.reader.get(f"{unit}.weight")
        scale = next((s for s in SCALE_ALIASES if s in self.modules[unit]), None)
        if w.element_size() == 1 and scale is None:
            raise CheckpointError(f"{self.src}: {unit}.weight is {w.dtype} without a weight_scale")
        row_scale = None if scale is None else self.reader.get(f"{unit}.{scale}").float().reshape(-1)
        return StoredRows(w, row_scale).rows(slice(None))

    def stats_entry(self) -> tuple[CalibrationStats | None, str]:
        stats = self.ctx.stats if self.recipe.smoothquant else None
        if stats is None:
            return None, ""
        tr = pick_transformer(stats, self.ctx.component)
        for name, (_, k) in self.linears.items():
            if name in self.kept:
                continue
            if not stats.has(tr, name) or stats.get(tr, name).in_features != k:
                raise CheckpointError(
                    f"{self.src}: the calibration statistics of {tr} have no entry with {k} input channels for "
                    f"layer {name} (statistics from another model?)"
                )
        want = stats.meta.get("models", {}).get(tr, {}).get("fingerprint")
        if want and want != fingerprint(self.linears):
            raise CheckpointError(
                f"{self.src}: the calibration statistics were recorded on a model with different layer shapes "
                f"(fingerprint {want}, this checkpoint {fingerprint(self.linears)})"
            )
        return stats, tr

    def unit_specs(self, unit: str, quantize: bool) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        n, k = self.reader.shape(f"{unit}.weight")
        if quantize:
            specs = dict(self.recipe.unit_specs(n, k))
        else:
            specs = {"weight": (torch.bfloat16, (n, k))}
        if "bias" in self.modules[unit]:
            specs["bias"] = (kept_dtype(self.reader.dtype(f"{unit}.bias")), self.reader.shape(f"{unit}.bias"))
        return specs

    def write(self, dst: Path) -> dict:
        from tqdm.auto import tqdm

        stats, tr = self.stats_entry()
        progress = self.ctx.progress
        t0 = time.perf_counter()
        choices = choose_smoothing(self.recipe, self.linears, self.kept, self.unit_weight, stats, tr)
        folds = plan_folds(self.recipe, choices, self.linears)
        quantized = sorted(u for u, m in self.units.items() if m[0] not in self.kept)
        order = sorted(self.modules, key=_order)
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for module in order:
            if module in self.units:
                mine = self.unit_specs(module, module in quantized)
            else:
                mine = {
                    s: (kept_dtype(self.reader.dtype(f"{module}.{s}")), self.reader.shape(f"{module}.{s}"))
                    for s in self.modules[module]
                }
            specs.update({f"{module}.{s}": mine[s] for s in sorted(mine)})
        kept = {u: self.kept[m[0]] for u, m in sorted(self.units.items()) if m[0] in self.kept}
        record = {
            "recipe": self.recipe.to_dict(),
            "format": self.recipe.format,
            "transformer": self.ctx.component,
            "statistics": tr or None,
            "groups": {c.group.name: c.summary() for c in choices},
            "quantized": quantized,
            "kept_float": kept,
            "ditq_version": __version__,
        }
        metadata = {"format": "pt", RECIPE_KEY: json.dumps(record)}
        path = dst / WEIGHTS_NAME
        convrot = isinstance(self.recipe, ConvRotW4A4Recipe)
        tensors_out: dict[str, torch.Tensor]
        layers = {u: self.recipe.unit_marker(*self.reader.shape(f"{u}.weight")) for u in quantized}
        metadata[QUANT_METADATA_KEY] = json.dumps({"format_version": "1.0", "layers": layers})
        with StreamingSafetensorsWriter(path, specs, metadata) as writer:
            for module in tqdm(order, desc=f"{self.recipe.kind} {self.ctx.component}", disable=not progress):
                if module in self.units:
                    tensors_out = self.unit_out(module, module in quantized, folds, convrot)
                else:
                    tensors_out = {s: self.reader.get(f"{module}.{s}") for s in self.modules[module]}
                    if module in folds.norms and "weight" in tensors_out:
                        tensors_out["weight"] = fold_into_norm(tensors_out["weight"], folds.norms[module])
                    tensors_out = {s: t.to(kept_dtype(t.dtype)) for s, t in tensors_out.items()}
                for s in sorted(tensors_out):
                    writer.write(f"{module}.{s}", tensors_out[s])
        seconds = time.perf_counter() - t0
        log.info(
            "%s: %d units %s, %d kept bf16, %.1f MB in %.1f s",
            self.ctx.component,
            len(quantized),
            self.recipe.kind,
            len(kept),
            path.stat().st_size / 1e6,
            seconds,
        )
        return {
            "file": str(path),
            "bytes": path.stat().st_size,
            "quantized": len(quantized),
            "kept_bf16": kept,
            "seconds": seconds,
            "recipe": record,
        }

    def unit_out(self, unit: str, quantize: bool, folds, convrot: bool) -> dict[str, torch.Tensor]:
        w = self.unit_weight(unit)
        bias = self.reader.get(f"{unit}.bias") if "bias" in self.modules[unit] else None
        b = None if bias is None else bias.float()
        if unit in folds.rows:
            w = w / folds.rows[unit][:, None]
            b = None if b is None else b / folds.rows[unit]
        col = folds.columns.get(unit)
        if quantize:
            out = unit_tensors(self.recipe, w, col)
        else:
            if convrot and col is not None:
                w = w * col[None, :]
            out = {"weight": w.to(torch.bfloat16)}
        if bias is not None:
            out["bias"] = b.to(kept_dtype(bias.dtype))
        return out


def convert_transformer_w4a4(
    src: str | Path, dst: str | Path, recipe: W4A4Recipe, ctx: ConvertContext
) -> dict:
    """Convert one transformer component folder `src` into `dst` (config.json copied, quantization_config
    dropped); returns the summary recorded in ditq.json."""
    from ditq.io.jsonfile import read_json

    src, dst = Path(src), Path(dst)
    cfg = read_json(src / "config.json", "the transformer config")  # before any work: a bad one names itself
    writer = _Writer(src, recipe, ctx)
    try:
        dst.mkdir(parents=True, exist_ok=True)
        summary = writer.write(dst)
        cfg.pop("quantization_config", None)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    finally:
        writer.reader.close()
    return summary
