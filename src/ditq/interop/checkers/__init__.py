"""Loader-rule checkers: would stable-diffusion.cpp, ComfyUI-GGUF and ComfyUI load this Ideogram 4 file?

`check_gguf(path)` and `check_int8(path)` apply the rules those loaders document or enforce in code (docs/LAYOUTS.md
lists the sources and versions) and return a list of `Violation`s; an empty list means every rule holds. Shapes are
checked against an Ideogram 4 configuration: the official one (which stable-diffusion.cpp hard-codes) unless a
`config` (a dict, a `config.json` or a component folder) is given, e.g. for the tiny test model.

GGUF (one file per transformer):
- names: official fused names (`attention.qkv`, `attention.o`), not diffusers' split ones; no prefix for
  stable-diffusion.cpp; for ComfyUI-GGUF all names or none carry `model.diffusion_model.` (it keeps only prefixed
  tensors when any is prefixed).
- detection: stable-diffusion.cpp needs `embed_image_indicator.weight`; ComfyUI-GGUF reads `general.architecture`
  (`ideogram`) and, without it, needs `t_embedding.mlp_in.weight`, `layers.0.attention.qkv.weight` and
  `final_layer.linear.weight`.
- types: only the tensors of stable-diffusion.cpp's Ideogram 4 rule (`layers.*` adaLN modulation, qkv, o and
  feed-forward weights) block-quantized unless `quantize_all`; ComfyUI-GGUF decodes F32/F16/BF16, Q8_0, Q5_0/1,
  Q4_0/1 and Q2_K..Q6_K; 1-D tensors and tensors of at most 1024 elements F32.
- shapes: every tensor of the configuration present with its shape, nothing else.

ComfyUI INT8 safetensors (`comfy_quant`, `int8_tensorwise`):
- every int8 tensor is the 2-D weight of a Linear of the model, with a `weight_scale` F32 [N, 1] (ComfyUI also
  takes a scalar; stable-diffusion.cpp only [N, 1]) and a U8 `comfy_quant` JSON marker (stable-diffusion.cpp needs
  the per-layer marker; ComfyUI also takes the file's `_quantization_metadata`), whose `format` is
  `int8_tensorwise`; `convrot` is a boolean and, when true, `convrot_groupsize` a power of 4 dividing in_features
  (stable-diffusion.cpp: 256); a group size without `convrot` is refused by stable-diffusion.cpp.
- no marker or scale without its weight; markers and `_quantization_metadata` agree; the layers ditq's recipe
  metadata (`ditq.recipe`) keeps in bf16 are not int8 and the ones it quantizes are.
"""

from __future__ import annotations

from pathlib import Path

from ditq.interop.checkers.common import (
    COMFYUI,
    COMFYUI_GGUF,
    LOADER_NAMES,
    SDCPP,
    Violation,
    expected_tensors,
    load_config,
)
from ditq.interop.checkers.gguf import check_gguf
from ditq.interop.checkers.int8 import check_int8


def check_file(
    path: str | Path,
    loaders: tuple[str, ...] = ("sdcpp", "comfyui"),
    config: dict | str | Path | None = None,
    quantize_all: bool = False,
) -> list[Violation]:
    """`check_gguf` for `.gguf` files, `check_int8` for safetensors."""
    if Path(path).suffix == ".gguf":
        return check_gguf(path, loaders, config, quantize_all)
    return check_int8(path, loaders, config)


__all__ = [
    "COMFYUI",
    "COMFYUI_GGUF",
    "SDCPP",
    "LOADER_NAMES",
    "Violation",
    "check_file",
    "check_gguf",
    "check_int8",
    "expected_tensors",
    "load_config",
]
