"""The reference path: LoRA updates added into float weights, W' = W + Σ strength · alpha/rank · B A.

- `merge_lora_folder(source, loras, out)`: a pipeline folder whose two transformers hold W' in bf16 (float32
  arithmetic, one rounding), in the official fused layout (`attention.qkv`, `attention.o`, no prefix), every
  other component reused from `source` (hard links where possible). `ditq.quantize_pipeline(out, recipe, ...)`
  quantizes it like any bf16 reference, so "merge, then quantize" is `ditq quantize --lora`. The source is the FP8
  reference (E4M3 + row scales, dequantized as the loader does) or a float folder, fused or split names, with or
  without a `model.diffusion_model.` prefix; quantized sources (INT8, GGUF, NF4) are refused: merging needs the
  float weights. Written tensor by tensor (peak memory: about one fused weight in float32) into `<out>.partial`,
  renamed when complete; `ditq.json` records the LoRAs (file, sha256, strength, layers merged).
- `merge_lora_(model, lora)`: the same in place on a model's float `nn.Linear` layers.
- `merged_weight(layer, updates)`: a layer's weight (dequantized) plus its updates, e.g. in float64 for tests.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from ditq.errors import CheckpointError, ConfigError
from ditq.formats.base import kept_dtype
from ditq.lora.files import LoraFile, read_lora
from ditq.lora.names import COND
from ditq.lora.spec import LoraSpec, parse_lora_spec
from ditq.lora.targets import LayerFactor, config_linear_shapes, linear_shapes, resolve

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
METADATA_KEY = "ditq.lora"
_DROPPED = (".weight_scale", ".scale_weight", ".input_scale", ".scale_input")
Update = tuple[LayerFactor, float]  # a factor and its strength


def lora_update(updates: Sequence[Update], dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Σ strength · scale · up @ down [out, in] in `dtype` (None for no updates)."""
    total = None
    for factor, strength in updates:
        delta = (factor.up.to(dtype) * (strength * factor.scale)) @ factor.down.to(dtype)
        total = delta if total is None else total + delta
    return total


def merged_weight(
    layer: nn.Module, updates: Sequence[Update], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The layer's weight [out, in] (a QuantizedLinear's `dequantized_weight`) plus the updates, in `dtype`."""
    if isinstance(layer, nn.Linear):
        w = layer.weight.detach().to(dtype)
    else:
        w = layer.dequantized_weight(torch.float32).to(dtype)
    delta = lora_update(updates, dtype)
    return w if delta is None else w + delta.to(w.device)


def _specs(loras: Sequence[LoraSpec | LoraFile | str]) -> list[tuple[LoraFile, float, LoraSpec | None]]:
    out = []
    for item in loras:
        if isinstance(item, str):
            item = parse_lora_spec(item)
        if isinstance(item, LoraSpec):
            out.append(
                (read_lora(item.path, name=item.name, unprefixed=item.unprefixed), item.strength, item)
            )
        elif isinstance(item, LoraFile):
            out.append((item, 1.0, None))
        else:
            raise ConfigError(
                f"expected a LoraSpec, a LoraFile or 'PATH[:STRENGTH]', got {type(item).__name__}"
            )
    return out


def _plan_updates(loras, component: str, shapes, strict: bool) -> tuple[dict[str, list[Update]], list[str]]:
    updates: dict[str, list[Update]] = {}
    unknown: list[str] = []
    for lora, strength, _ in loras:
        factors, missing = resolve(lora, component, shapes)
        bad = [f"{k} ({why})" for k, why in lora.unknown] + [f"{k} (no such layer)" for k in missing]
        if bad and strict:
            raise CheckpointError(
                f"{lora.source}: {len(bad)} key(s) not applied (strict): {', '.join(bad[:8])}"
            )
        unknown += bad
        for layer, factor in factors.items():
            updates.setdefault(layer, []).append((factor, strength))
    return updates, unknown


def merge_lora_(
    model: nn.Module,
    lora: str | os.PathLike | LoraFile,
    strength: float = 1.0,
    *,
    branch: str = COND,
    strict: bool = False,
    unprefixed: str = "transformer",
) -> list[str]:
    """Add a LoRA into `model`'s float `nn.Linear` weights in place; returns the merged layer names.
    Quantized layers are refused (merging into them would mean requantizing): apply the LoRA as a branch."""
    file = read_lora(lora, unprefixed=unprefixed)
    updates, unknown = _plan_updates([(file, float(strength), None)], branch, linear_shapes(model), strict)
    modules = dict(model.named_modules())
    quantized = [n for n in updates if not isinstance(modules[n], nn.Linear)]
    if quantized:
        raise ConfigError(
            f"{quantized[0]} is a {type(modules[quantized[0]]).__name__}: merging needs float weights; apply the "
            "LoRA as a branch (ditq.lora.apply_lora) or merge it before quantizing (merge_lora_folder)"
        )
    if unknown:
        log.warning("%s: %d key(s) not applied: %s", file.source, len(unknown), ", ".join(unknown[:8]))
    with torch.no_grad():
        for name, ups in updates.items():
            layer = modules[name]
            w = merged_weight(layer, ups, torch.float32)
            layer.weight.copy_(w.to(layer.weight.dtype))
    return sorted(updates)


def _fused_sources(source, component: Path) -> dict[str, list[str]]:
    """{official fused tensor name: stored keys, in row order} of a component (q, k, v joined into qkv)."""
    from ditq.formats.keys import find_prefix, split_to_fused

    keys = source.keys()
    find_prefix(keys)  # refuses a partial ComfyUI prefix
    listed = split_to_fused({k: [k] for k in keys}, row_joiner=lambda _suffix, parts: sum(parts, []))
    for name, stored in listed.items():
        info = source.info(stored[0])
        if name.endswith(".weight") and info.dtype in (torch.int8, torch.uint8):
            raise ConfigError(
                f"{component}: {stored[0]} is {info.dtype}: already quantized; merge into the FP8 or bf16 reference"
            )
    return {n: s for n, s in listed.items() if not n.endswith(_DROPPED) and not n.endswith(".comfy_quant")}


def _read_float(source, key: str) -> torch.Tensor:
    """A stored tensor; FP8 E4M3 weights dequantized with their row scales to float32, as the loader does."""
    from ditq.formats.fp8 import SCALE_ALIASES, dequantize_fp8_rowwise

    t = source.get(key)
    if t.dtype == torch.float8_e4m3fn:
        module = key[: -len(".weight")]
        scale = next((f"{module}.{s}" for s in SCALE_ALIASES if f"{module}.{s}" in source), None)
        if scale is None or not key.endswith(".weight"):
            raise CheckpointError(f"{source.path}: {key} is float8 without a per-row weight_scale")
        return dequantize_fp8_rowwise(t, source.get(scale))
    if t.dtype.is_floating_point and t.dtype.itemsize == 1:
        raise ConfigError(
            f"{source.path}: {key} is {t.dtype}; ditq reads E4M3 FP8 weights with row scales only"
        )
    return t


def _merge_component(src: Path, dst: Path, component: str, loras, strict: bool) -> dict:
    from ditq.formats.keys import fused_module_name, split_module_name
    from ditq.io.safetensors_io import StreamingSafetensorsWriter, TensorSource

    if any(src.glob("*.gguf")):
        raise ConfigError(f"{src} holds a GGUF file: already quantized; merge into the FP8 or bf16 reference")
    shapes = config_linear_shapes(src)
    updates, unknown = _plan_updates(loras, component, shapes, strict)
    fused_updates: dict[str, list[str]] = {}
    for layer in updates:
        fused_updates.setdefault(fused_module_name(layer), []).append(layer)
    source = TensorSource(src)
    plan = _fused_sources(source, src)
    specs = {}
    for name, stored in plan.items():
        infos = [source.info(k) for k in stored]
        shape = (sum(i.shape[0] for i in infos), *infos[0].shape[1:]) if len(infos) > 1 else infos[0].shape
        module, _, leaf = name.rpartition(".")
        is_weight = leaf == "weight" and any(m in shapes for m in split_module_name(module))
        dtype = torch.bfloat16 if is_weight else kept_dtype(infos[0].dtype)  # one float dtype in the folder
        specs[name] = (dtype, tuple(shape))
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    record = [{"name": lora.name, "strength": s} for lora, s, _ in loras]
    merged = []
    with StreamingSafetensorsWriter(
        dst / WEIGHTS_NAME, specs, {"format": "pt", METADATA_KEY: json.dumps(record)}
    ) as w:
        for name, stored in plan.items():
            parts = [_read_float(source, k) for k in stored]
            t = parts[0] if len(parts) == 1 else torch.cat([p.float() for p in parts], dim=0)
            module = name.rpartition(".")[0]
            if name.endswith(".weight") and module in fused_updates:
                t = t.float().clone()
                row = 0
                for member in split_module_name(module):
                    n = shapes[member][0]
                    delta = lora_update(updates.get(member, []), torch.float32)
                    if delta is not None:
                        t[row : row + n] += delta
                        merged.append(member)
                    row += n
                if not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"{src}: {name} + LoRA updates is not finite")
            w.write(name, t.to(specs[name][0]))
    source.close()
    if unknown:
        log.warning("%s: %d LoRA key(s) not applied: %s", component, len(unknown), ", ".join(unknown[:8]))
    return {"merged_layers": sorted(merged), "unknown": unknown}


def merge_lora_folder(
    source: str | os.PathLike,
    loras: Sequence[LoraSpec | LoraFile | str],
    out: str | os.PathLike,
    *,
    strict: bool = False,
    force: bool = False,
) -> Path:
    """Write `out`: the pipeline at `source` (folder, hub id or `tiny`) with the LoRAs merged into both
    transformers (see the module docstring). An existing `out` is refused unless `force`."""
    from ditq._version import __version__
    from ditq.io.files import file_sha256, link_or_copy, link_or_copy_tree, write_json_atomic
    from ditq.models.loading import check_folder, resolve_source
    from ditq.models.record import RECORD_FILE, TRANSFORMERS, VariantRecord

    specs = _specs(loras)
    if not specs:
        raise ConfigError("merge_lora_folder needs at least one LoRA")
    src = resolve_source(str(source))
    index = check_folder(src)
    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out}: exists; choose another output or pass force=True to replace it")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        summary = {c: _merge_component(src / c, tmp / c, c, specs, strict) for c in TRANSFORMERS}
        for comp in index:
            if not comp.startswith("_") and comp not in TRANSFORMERS and (src / comp).is_dir():
                link_or_copy_tree(src / comp, tmp / comp)
        for f in src.iterdir():
            if f.is_file() and f.name != RECORD_FILE:
                link_or_copy(f, tmp / f.name)
        summary["lora"] = [
            {
                "name": lora.name,
                "source": lora.source,
                "sha256": file_sha256(lora.path) if lora.path is not None else None,
                "strength": strength,
            }
            for lora, strength, _ in specs
        ]
        record = VariantRecord(
            variant="bf16",
            formats=dict.fromkeys(TRANSFORMERS, "bf16"),
            source=str(source),
            source_folder=str(src),
            summary=summary,
            ditq_version=__version__,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        write_json_atomic(tmp / RECORD_FILE, record.to_json())
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
