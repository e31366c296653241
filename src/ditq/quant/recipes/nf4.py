"""NF4 recipe: every Linear weight of a transformer as bitsandbytes NF4 (blocksize 64), official fused names.

Streams tensor by tensor from the FP8 (or bf16) checkpoint into one safetensors file laid out like the official
`ideogram-ai/ideogram-4-nf4` repo; biases, norms and the indicator embedding stay bf16, and so does a weight whose
row length is not a multiple of the block size (bitsandbytes' CPU kernels need whole blocks per row; every Linear of
the full-size model qualifies).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ditq import __version__
from ditq.formats.nf4 import encode_state, quantize_nf4_pieces
from ditq.io.safetensors_io import StreamingSafetensorsWriter, TensorSource
from ditq.quant.recipes.gguf import float_rows, fused_sources, read_float

BLOCKSIZE = 64
NOT_LINEAR = ("embed_image_indicator.weight",)


def write_transformer_nf4(src: Path, dst: Path, progress: bool = True) -> dict:
    from tqdm import tqdm

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
        if (
            name.endswith(".weight")
            and len(shape) == 2
            and name not in NOT_LINEAR
            and shape[1] % BLOCKSIZE == 0
        ):
            n, k = shape
            state = {"quant_type": "nf4", "blocksize": BLOCKSIZE, "dtype": "bfloat16", "shape": [n, k]}
            specs[name] = (torch.uint8, (n * k // 2, 1))
            specs[f"{module}.weight.absmax"] = (torch.float32, (n * k // BLOCKSIZE,))
            specs[f"{module}.weight.quant_map"] = (torch.float32, (16,))
            specs[f"{module}.weight.quant_state.bitsandbytes__nf4"] = (
                torch.uint8,
                (len(encode_state(state)),),
            )
            kinds[name] = "nf4"
        else:
            specs[name] = (torch.bfloat16, shape)
            kinds[name] = "bf16"
    recipe = {"name": "nf4", "format": "nf4", "blocksize": BLOCKSIZE, "double_quant": False}
    meta = {"format": "pt", "ditq.version": __version__, "ditq.recipe": json.dumps(recipe)}
    start = time.perf_counter()
    with StreamingSafetensorsWriter(dst, specs, meta) as writer:
        for name, keys in tqdm(plans.items(), desc=f"{src.name} -> nf4", unit="tensor", disable=not progress):
            if kinds[name] == "nf4":  # streamed a block of rows at a time: rows are whole NF4 blocks
                module = name[: -len(".weight")]
                pieces = (torch.from_numpy(x) for k in keys for x in float_rows(source, k))
                for suffix, t in quantize_nf4_pieces(pieces, logical[name], BLOCKSIZE).items():
                    writer.write(f"{module}.{suffix}", t)
            else:
                parts = [read_float(source, k) for k in keys]
                x = torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))
                writer.write(name, x.to(torch.bfloat16))
    return {"file": str(dst), "bytes": dst.stat().st_size, "seconds": time.perf_counter() - start}
