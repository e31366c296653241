"""The FP8 recipe: the official Ideogram 4 reference layout (E4M3 weights with one fp32 scale per row), written from
a bf16 / fp32 checkpoint in either key layout, or applied in memory.

Every Linear weight of the transformer becomes E4M3 + `weight_scale` [N] (row absmax / 448); biases, norms and the
indicator embedding are bf16; keys are the official fused names. Streamed a block of rows at a time (the row scales
are independent), so peak memory is one block. An FP8 source converts to the same E4M3 codes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ditq._version import __version__
from ditq.formats.fp8 import quantize_fp8_rowwise
from ditq.io.safetensors_io import StreamingSafetensorsWriter, TensorSource
from ditq.quant.recipes.base import ConvertContext, Recipe, register_name
from ditq.quant.recipes.source import float_rows, fused_sources, read_float

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True, kw_only=True)
class FP8Recipe(Recipe):
    """Every Linear weight as E4M3 with an fp32 scale per output row (the official FP8 layout)."""

    kind: ClassVar[str] = "fp8"
    format: ClassVar[str] = "fp8"

    def convert(self, src: Path, dst: Path, ctx: ConvertContext) -> dict:
        return write_transformer_fp8(src, dst / WEIGHTS_NAME, self, ctx.progress)


register_name("fp8", lambda **options: FP8Recipe(**options))


def _linear_weights(component: Path) -> set[str]:
    """Fused names of the Linear weights of the transformer a component folder's config describes."""
    from accelerate import init_empty_weights
    from diffusers import Ideogram4Transformer2DModel

    from ditq.quant.sizes import fused_tensors

    with init_empty_weights():
        model = Ideogram4Transformer2DModel.from_config(Ideogram4Transformer2DModel.load_config(component))
    _, linears = fused_tensors(model)
    return {f"{m}.weight" for m in linears}


def write_transformer_fp8(src: Path, dst: Path, recipe: FP8Recipe | None = None, progress: bool = True) -> dict:
    """Convert one transformer component folder to `dst` (a safetensors path) in the official FP8 layout."""
    from tqdm import tqdm

    recipe = recipe or FP8Recipe()
    source = TensorSource(src)
    plans = fused_sources(source)
    linears = _linear_weights(src)
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, keys in plans.items():
        shapes = [source.info(k).shape for k in keys]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else tuple(shapes[0])
        if name in linears:
            specs[name] = (torch.float8_e4m3fn, shape)
            specs[f"{name}_scale"] = (torch.float32, (shape[0],))
        else:
            specs[name] = (torch.bfloat16, shape)
    meta = {"format": "pt", "ditq.version": __version__, "ditq.recipe": json.dumps(recipe.to_dict())}
    start = time.perf_counter()
    with StreamingSafetensorsWriter(dst, specs, meta) as writer:
        for name, keys in tqdm(plans.items(), desc=f"{src.name} -> fp8", unit="tensor", disable=not progress):
            if name in linears:
                parts = [quantize_fp8_rowwise(torch.from_numpy(x)) for k in keys for x in float_rows(source, k)]
                writer.write(name, torch.cat([q for q, _ in parts]))
                writer.write(f"{name}_scale", torch.cat([s for _, s in parts]))
            else:
                arrays = [read_float(source, k) for k in keys]
                x = torch.from_numpy(arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0))
                writer.write(name, x.to(torch.bfloat16))
    return {"file": str(dst), "bytes": dst.stat().st_size, "seconds": time.perf_counter() - start}
