"""The storage layer: how quantized Linear layers are stored on disk and computed with in memory.

One module per format, each holding its Linear module, its on-disk tensors (suffixes, dtypes), its size rule and
its row slicing for fused projections:

- `fp8`: E4M3 + fp32 row scales (the official Ideogram 4 reference layout), `Fp8Linear`.
- `int8`: ComfyUI's `comfy_quant` INT8 layout, `Int8Linear` (W8A8; arithmetic in `int8_ops`).
- `convrot`: ComfyUI's ConvRot block-Hadamard INT8 files, `ConvRotInt8Linear`.
- `gguf`: ggml block formats, `GGUFLinear`, `GGUFSource`, sd.cpp's tensor type rule.
- `nf4`: bitsandbytes NF4, `NF4Linear`.
- `keys`: the official fused <-> diffusers split key layouts.
- `base`: the `LinearFormat` registry and the `QuantizedLinear` base module.

This package is the bottom floor: it imports only `ditq.errors`, `ditq.registry`, `ditq.io` and `ditq.gguf`.
Importing a format module registers it in `LINEAR_FORMATS`.
"""

from __future__ import annotations

import importlib

from ditq.formats.base import (
    LINEAR_FORMATS,
    LinearFormat,
    QuantizedLinear,
    all_extra_suffixes,
    detect_format,
    register_format,
)

FORMAT_MODULES = ("fp8", "int8", "nf4", "gguf", "svdquant", "convrot_w4a4")


def load_all_formats() -> None:
    """Import every format module, so that `LINEAR_FORMATS` is complete."""
    for name in FORMAT_MODULES:
        importlib.import_module(f"ditq.formats.{name}")


__all__ = [
    "FORMAT_MODULES",
    "LINEAR_FORMATS",
    "LinearFormat",
    "QuantizedLinear",
    "all_extra_suffixes",
    "detect_format",
    "load_all_formats",
    "register_format",
]
