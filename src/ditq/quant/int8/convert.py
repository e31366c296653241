"""Streaming conversion of an Ideogram 4 transformer checkpoint (official FP8, or float) to INT8 W8A8 files.

Two passes over the source, each reading one tensor at a time:
1. decide: for every smoothing group, load its weights (dequantized to float32), search α on the calibration
   samples and decide fold / keep-bf16 / plain. Only the smoothing vectors are kept.
2. write: declare every output tensor (dtypes and shapes follow from the decisions), then per top-level part and
   per transformer block, dequantize each tensor, fold 1/s into norm weights and producing rows, scale the
   columns by s, quantize per output row and append it to the file.
Peak memory is about the largest single weight in float32 plus its int8 copy, not the model. Tensors are read with
plain file reads rather than through a memory map, so the pages of a 9 GB source do not pile up in the process.

Output: `diffusion_pytorch_model.safetensors` in ComfyUI's `comfy_quant` INT8 layout (see
`ditq.formats.int8`), official fused names, and `config.json`; the recipe is in the metadata under
`ditq.recipe`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ditq.errors import CheckpointError, ConfigError
from ditq.formats.base import kept_dtype
from ditq.formats.fp8 import SCALE_ALIASES
from ditq.formats.int8 import QUANT_METADATA_KEY, marker_tensor, quantization_metadata
from ditq.formats.int8_ops import quantize_weight_per_channel
from ditq.formats.keys import fused_module_name
from ditq.io.safetensors_io import StreamingSafetensorsWriter
from ditq.models.weights import group_by_module
from ditq.quant.calibration import CalibrationStats, fingerprint
from ditq.quant.int8.config import (
    GroupDecision,
    Int8W8A8Config,
    SmoothQuantConfig,
    decide_group,
    protected_set,
    recipe_dict,
    too_narrow,
)
from ditq.quant.int8.smoothquant import _blocks, fold_into_norm, smooth_groups
from ditq.quant.recipes.source import FusedReader, StoredRows

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
RECIPE_KEY = "ditq.recipe"
_BLOCK_RE = re.compile(r"^layers\.(\d+)\.")
_QKV_RE = re.compile(r"^(layers\.\d+\.attention\.)to_([qkv])$")


@dataclass
class ConvertReport:
    transformer: str
    path: Path
    quantized: list[str]
    kept_float: dict[str, str]
    groups: dict[str, dict]
    bytes_written: int
    seconds: float
    recipe: dict = field(repr=False, default_factory=dict)
    # {group: s [K] float32} of the groups folded into a neighbour: the coordinates a LoRA must be mapped into
    smoothing: dict = field(repr=False, default_factory=dict)


def _linear_names(folder: Path) -> dict[str, tuple[int, int]]:
    """{split Linear name: (out, in)} of the model this component folder's config describes (built on meta)."""
    from accelerate import init_empty_weights
    from diffusers import Ideogram4Transformer2DModel

    from ditq.quant.calibration import linear_shapes

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json")
    with init_empty_weights():
        model = Ideogram4Transformer2DModel.from_config(Ideogram4Transformer2DModel.load_config(folder))
    return linear_shapes(model)


def _split_part(name: str) -> tuple[str, int, int]:
    """(fused module, part, parts) of a diffusers Linear name."""
    m = _QKV_RE.match(name)
    if m:
        return f"{m.group(1)}qkv", "qkv".index(m.group(2)), 3
    return fused_module_name(name), 0, 1


def _unit(module: str) -> int:
    m = _BLOCK_RE.match(module)
    return int(m.group(1)) if m else -1


def _check_stats(
    stats: CalibrationStats, transformer: str, linears: dict[str, tuple[int, int]], where: str
) -> None:
    for name, (_, k) in linears.items():
        if not stats.has(transformer, name):
            raise CheckpointError(
                f"{where}: the calibration statistics have no entry for layer {name} of {transformer} "
                "(statistics from another model?)"
            )
        got = stats.get(transformer, name).in_features
        if got != k:
            raise CheckpointError(
                f"{where}: layer {name} has {k} input channels but the calibration statistics have {got} "
                "(statistics from another model?)"
            )
    want = stats.meta.get("models", {}).get(transformer, {}).get("fingerprint")
    if want and want != fingerprint(linears):
        raise CheckpointError(
            f"{where}: the calibration statistics were recorded on a model with different layer shapes "
            f"(fingerprint {want}, this checkpoint {fingerprint(linears)})"
        )


class _Converter:
    def __init__(
        self, src: Path, config, stats, transformer: str, protect: Iterable[str], recipe: dict | None = None
    ) -> None:
        self.src, self.config, self.stats, self.transformer = src, config, stats, transformer
        self.recipe = recipe
        self.reader = FusedReader(src)
        self.linears = _linear_names(src)
        self.modules = group_by_module(list(self.reader.keys))
        base = config.base if isinstance(config, SmoothQuantConfig) else config
        self.protected = protected_set(self.linears, (*base.protect, *protect))
        self.reasons = {n: "protected" for n in self.protected}
        m = base.in_features_multiple
        for n in sorted(too_narrow(self.linears, base) - self.protected):
            self.protected.add(n)
            k = self.linears[n][1]
            self.reasons[n] = f"in_features {k} is not a multiple of {m} (stable-diffusion.cpp Q8_0 rows)"
        self._check_source()

    def _check_source(self) -> None:
        fused = {_split_part(n)[0] for n in self.linears}
        for name in fused:
            suffixes = self.modules.get(name)
            if suffixes is None or "weight" not in suffixes:
                raise CheckpointError(f"{self.src}: missing tensor {name}.weight")
            dt = self.reader.dtype(f"{name}.weight")
            if dt == torch.int8:
                raise CheckpointError(
                    f"{self.src}: {name}.weight is already int8 (the source is already INT8-quantized); "
                    "convert from the FP8 or bf16 checkpoint"
                )
            if not dt.is_floating_point:
                raise CheckpointError(
                    f"{self.src}: {name}.weight has dtype {dt}; expected FP8 or a float type"
                )
            extra = set(suffixes) - {"weight", "bias", *SCALE_ALIASES}
            if extra:
                raise CheckpointError(
                    f"{self.src}: {name} has tensors {sorted(extra)}; only FP8 (weight_scale) or float sources convert"
                )

    # -- reading
    def fused_weight(self, fused: str) -> StoredRows:
        """The fused Linear's weight [N, K] as stored (FP8 + row scales, or float), read as float32 by rows."""
        w = self.reader.get(f"{fused}.weight")
        scale = next((s for s in SCALE_ALIASES if s in self.modules[fused]), None)
        if w.element_size() == 1 and scale is None:
            raise CheckpointError(f"{self.src}: {fused}.weight is {w.dtype} without a weight_scale")
        row_scale = None if scale is None else self.reader.get(f"{fused}.{scale}").float().reshape(-1)
        return StoredRows(w, row_scale)

    # -- pass 1
    def decide(self, progress: bool) -> list[GroupDecision]:
        from tqdm.auto import tqdm

        groups = smooth_groups(self.linears)
        cache: dict[str, StoredRows] = {}

        def weight(name: str) -> StoredRows:
            fused, part, parts = _split_part(name)
            if fused not in cache:
                if len(cache) > 1:
                    cache.clear()
                cache[fused] = self.fused_weight(fused)
            return cache[fused].part(part, parts)

        decisions = []
        for g in tqdm(groups, desc=f"alpha {self.transformer}", disable=not progress):
            d = decide_group(g, weight, self.stats, self.transformer, self.config, self.protected)
            if d.mode == "explicit":  # a file cannot carry an unfolded smoothing vector
                d = GroupDecision(
                    g, "bf16", d.choice, d.reason.split(";")[0] + " but cannot be folded on disk"
                )
            decisions.append(d)
        cache.clear()
        for d in decisions:
            if d.mode == "bf16":
                for n in d.group.linears:
                    self.reasons.setdefault(n, d.reason)
                    self.protected.add(n)
        return decisions

    # -- pass 2
    def plan_outputs(self, decisions: list[GroupDecision]):
        col: dict[str, torch.Tensor] = {}
        rows: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
        norms: dict[str, torch.Tensor] = {}
        for d in decisions:
            if d.mode != "folded":
                continue
            for n in d.group.linears:
                col[n] = d.s
            kind, target = d.group.fold
            if kind == "norm":
                norms[target] = d.s
            else:
                fused, part, parts = _split_part(target)
                rows.setdefault(fused, []).append((part, parts, d.s))
        fused_lin: dict[str, list[str]] = {}
        for n in self.linears:
            fused_lin.setdefault(_split_part(n)[0], []).append(n)
        quantized = {f for f, members in fused_lin.items() if not any(m in self.protected for m in members)}
        return col, rows, norms, fused_lin, quantized

    def specs(self, fused_lin, quantized) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        order = sorted(self.modules, key=lambda m: (_unit(m), m))
        specs = {}
        marker = marker_tensor()
        for module in order:
            suffixes = self.modules[module]
            mine: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
            if module in fused_lin:
                n, k = self.reader.shape(f"{module}.weight")
                if module in quantized:
                    mine["weight"] = (torch.int8, (n, k))
                    mine["weight_scale"] = (torch.float32, (n, 1))
                    mine["comfy_quant"] = (torch.uint8, tuple(marker.shape))
                else:
                    mine["weight"] = (torch.bfloat16, (n, k))
                if "bias" in suffixes:
                    mine["bias"] = (
                        kept_dtype(self.reader.dtype(f"{module}.bias")),
                        self.reader.shape(f"{module}.bias"),
                    )
            else:
                for sfx in suffixes:
                    mine[sfx] = (
                        kept_dtype(self.reader.dtype(f"{module}.{sfx}")),
                        self.reader.shape(f"{module}.{sfx}"),
                    )
            for sfx in sorted(mine):
                specs[f"{module}.{sfx}"] = mine[sfx]
        return specs

    def linear_tensors(
        self, module: str, members: list[str], col, rows, quantize: bool
    ) -> dict[str, torch.Tensor]:
        """Fold, smooth and quantize one fused Linear a block of rows at a time (row blocks stay within one
        member of a fused qkv, whose columns share one smoothing vector anyway)."""
        src = self.fused_weight(module)
        n, k = src.shape
        bias = self.reader.get(f"{module}.bias") if "bias" in self.modules[module] else None
        b = None if bias is None else bias.float()
        row_div = None
        if module in rows:
            row_div = torch.ones(n)
            for part, parts, s in rows[module]:
                row_div[part * n // parts : (part + 1) * n // parts] = s
            if b is not None:
                b = b / row_div
        out_w = torch.empty(n, k, dtype=torch.int8 if quantize else torch.bfloat16)
        out_s = torch.empty(n, 1, dtype=torch.float32)
        step = n // len(members)
        for i, name in enumerate(members):
            cs = col.get(name)
            for block in _blocks(step, k):
                r = slice(i * step + block.start, i * step + block.stop)
                w = src.rows(r)
                if row_div is not None:
                    w = w / row_div[r, None]
                if quantize:
                    q, sc = quantize_weight_per_channel(w, cs)
                    out_w[r], out_s[r, 0] = q, sc
                else:
                    out_w[r] = (w if cs is None else w * cs[None, :]).to(torch.bfloat16)
        out = {"weight": out_w}
        if quantize:
            out["weight_scale"], out["comfy_quant"] = out_s, marker_tensor()
        if bias is not None:
            out["bias"] = b.to(kept_dtype(bias.dtype))
        return out

    def write(self, dst: Path, decisions: list[GroupDecision], progress: bool) -> tuple[ConvertReport, dict]:
        from tqdm.auto import tqdm

        col, rows, norms, fused_lin, quantized = self.plan_outputs(decisions)
        specs = self.specs(fused_lin, quantized)
        kept = {}
        for n in sorted(self.protected):
            kept.setdefault(fused_module_name(n), self.reasons.get(n, "protected"))
        recipe = recipe_dict(self.config, decisions, kept, self.stats)
        if self.recipe is not None:
            recipe["recipe"] = self.recipe
        recipe["transformer"] = self.transformer
        recipe["quantized"] = sorted(quantized)
        metadata = {
            "format": "pt",
            RECIPE_KEY: json.dumps(recipe),
            QUANT_METADATA_KEY: quantization_metadata(sorted(quantized)),
        }
        order = sorted(self.modules, key=lambda m: (_unit(m), m))
        path = dst / WEIGHTS_NAME
        with StreamingSafetensorsWriter(path, specs, metadata) as writer:
            for module in tqdm(order, desc=f"write {self.transformer}", disable=not progress):
                if module in fused_lin:
                    members = sorted(fused_lin[module], key=lambda n: _split_part(n)[1])
                    tensors = self.linear_tensors(module, members, col, rows, module in quantized)
                else:
                    tensors = {s: self.reader.get(f"{module}.{s}") for s in self.modules[module]}
                    if module in norms and "weight" in tensors:
                        tensors["weight"] = fold_into_norm(tensors["weight"], norms[module])
                    tensors = {s: t.to(kept_dtype(t.dtype)) for s, t in tensors.items()}
                for s in sorted(tensors):
                    writer.write(f"{module}.{s}", tensors[s])
        return ConvertReport(
            transformer=self.transformer,
            path=path,
            quantized=sorted(quantized),
            kept_float=kept,
            groups={d.group.name: d.summary() for d in decisions},
            bytes_written=path.stat().st_size,
            seconds=0.0,
            recipe=recipe,
            smoothing={d.group.name: d.s.float().contiguous() for d in decisions if d.mode == "folded"},
        ), recipe


def convert_transformer_int8(
    src_folder: str | Path,
    dst_folder: str | Path,
    stats: CalibrationStats | str | Path | None,
    config: SmoothQuantConfig | Int8W8A8Config,
    *,
    transformer: str | None = None,
    protect: Iterable[str] = (),
    progress: bool = True,
    recipe: dict | None = None,
) -> ConvertReport:
    """Convert one transformer component folder to INT8; `protect` adds layers kept in bf16; `recipe` (the
    `Int8Recipe.to_dict()` this conversion applies) is recorded in the file's metadata with the decisions.

    `stats` (a `CalibrationStats` or its file) is required for SmoothQuant; `transformer` names the entry of the
    statistics to use (default: the source folder's name).
    """
    from ditq.io.jsonfile import read_json

    t0 = time.perf_counter()
    src, dst = Path(src_folder), Path(dst_folder)
    cfg = read_json(src / "config.json", "the transformer config")  # before any work: a bad one names itself
    if isinstance(config, SmoothQuantConfig) and config.step != "convert":
        raise ConfigError("convert_transformer_int8 needs a SmoothQuantConfig with step='convert'")
    if not isinstance(config, SmoothQuantConfig | Int8W8A8Config):
        raise ConfigError(
            f"config must be an Int8W8A8Config or SmoothQuantConfig, got {type(config).__name__}"
        )
    if isinstance(stats, str | Path):
        stats = CalibrationStats.load(stats)
    transformer = transformer or src.name
    if isinstance(config, SmoothQuantConfig):
        if stats is None:
            raise ConfigError("SmoothQuant conversion needs calibration statistics (ditq calibrate)")
        if transformer not in stats.modules and len(stats.transformers) == 1:
            transformer = stats.transformers[0]
    conv = _Converter(src, config, stats, transformer, protect, recipe)
    try:
        if isinstance(config, SmoothQuantConfig):
            _check_stats(stats, transformer, conv.linears, str(src))
        decisions = conv.decide(progress)
        dst.mkdir(parents=True, exist_ok=True)
        report, _ = conv.write(dst, decisions, progress)
        cfg.pop("quantization_config", None)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    finally:
        conv.reader.close()
    report.seconds = time.perf_counter() - t0
    log.info(
        "%s: %d layers int8, %d kept bf16, %.1f MB in %.1f s",
        transformer,
        len(report.quantized),
        len(report.kept_float),
        report.bytes_written / 1e6,
        report.seconds,
    )
    return report
