"""NF4 recipe: every Linear weight of a transformer as bitsandbytes NF4 (blocksize 64), official fused names.

Streams tensor by tensor from the FP8 (or bf16) checkpoint into one safetensors file laid out like the official
`ideogram-ai/ideogram-4-nf4` repo; biases, norms and the indicator embedding stay bf16, and so does a weight whose
row length is not a multiple of the block size (bitsandbytes' CPU kernels need whole blocks per row; every Linear of
the full-size model qualifies).
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
from ditq.errors import ConfigError
from ditq.formats.nf4 import encode_state, quantize_nf4_pieces
from ditq.io.safetensors_io import StreamingSafetensorsWriter, TensorSource
from ditq.quant.recipes.base import ConvertContext, Recipe, register_name
from ditq.quant.recipes.source import float_rows, fused_sources, read_float

NOT_LINEAR = ("embed_image_indicator.weight",)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True, kw_only=True)
class NF4Recipe(Recipe):
    """Every Linear weight whose rows are whole blocks as bitsandbytes NF4 (no double quantization); the others,
    biases, norms and the indicator embedding stay bf16."""

    kind: ClassVar[str] = "nf4"
    format: ClassVar[str] = "nf4"

    blocksize: int = 64

    def __post_init__(self) -> None:
        if self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"NF4 blocksize must be a power of 2 in 64..4096, got {self.blocksize}")

    def quantizes(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether the tensor `name` (official fused name) of `shape` is stored as NF4."""
        return (
            name.endswith(".weight")
            and len(shape) == 2
            and name not in NOT_LINEAR
            and shape[1] % self.blocksize == 0
        )

    def convert(self, src: Path, dst: Path, ctx: ConvertContext) -> dict:
        return write_transformer_nf4(src, dst / WEIGHTS_NAME, self, ctx.progress)


register_name("nf4", lambda **options: NF4Recipe(**options))


def write_transformer_nf4(
    src: Path, dst: Path, recipe: NF4Recipe | None = None, progress: bool = True
) -> dict:
    from tqdm import tqdm

    recipe = recipe or NF4Recipe()
    blocksize = recipe.blocksize
    source = TensorSource(src)
    plans = fused_sources(source)
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    kinds: dict[str, str] = {}
    logical: dict[str, tuple[int, ...]] = {}
    for name, keys in plans.items():
        shapes = [source.info(k).shape for k in keys]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else tuple(shapes[0])
        module = name[: -len(".weight")]
        logical[name] = shape
        if recipe.quantizes(name, shape):
            n, k = shape
            state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "bfloat16", "shape": [n, k]}
            specs[name] = (torch.uint8, (n * k // 2, 1))
            specs[f"{module}.weight.absmax"] = (torch.float32, (n * k // blocksize,))
            specs[f"{module}.weight.quant_map"] = (torch.float32, (16,))
            specs[f"{module}.weight.quant_state.bitsandbytes__nf4"] = (
                torch.uint8,
                (len(encode_state(state)),),
            )
            kinds[name] = "nf4"
        else:
            specs[name] = (torch.bfloat16, shape)
            kinds[name] = "bf16"
    meta = {"format": "pt", "ditq.version": __version__, "ditq.recipe": json.dumps(recipe.to_dict())}
    start = time.perf_counter()
    with StreamingSafetensorsWriter(dst, specs, meta) as writer:
        for name, keys in tqdm(plans.items(), desc=f"{src.name} -> nf4", unit="tensor", disable=not progress):
            if kinds[name] == "nf4":  # streamed a block of rows at a time: rows are whole NF4 blocks
                module = name[: -len(".weight")]
                pieces = (torch.from_numpy(x) for k in keys for x in float_rows(source, k))
                for suffix, t in quantize_nf4_pieces(pieces, logical[name], blocksize).items():
                    writer.write(f"{module}.{suffix}", t)
            else:
                parts = [read_float(source, k) for k in keys]
                x = torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))
                writer.write(name, x.to(torch.bfloat16))
    return {"file": str(dst), "bytes": dst.stat().st_size, "seconds": time.perf_counter() - start}
