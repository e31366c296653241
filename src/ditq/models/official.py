"""Write a pipeline in the official Ideogram 4 FP8 layout (`ideogram-ai/ideogram-4-fp8`).

Layout: `model_index.json`, `scheduler/`, `tokenizer/`, `vae/` (bf16), and `transformer/`,
`unconditional_transformer/`, `text_encoder/` whose Linear weights are E4M3 with an fp32 `weight_scale` per output
row (row absmax / 448); biases, norms and embeddings stay bf16. Transformer keys use the official fused names
(`attention.qkv`, `attention.o`); the text encoder's config carries `ideogram_fp8_weight_only: true`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ditq.formats.fp8 import quantize_fp8_rowwise
from ditq.formats.keys import split_to_fused
from ditq.io.jsonfile import read_json
from ditq.io.safetensors_io import save_safetensors

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def fp8_state_dict(model: nn.Module, storage_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Split-key state dict with every Linear weight as E4M3 + `weight_scale` [N]; the rest in `storage_dtype`."""
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in linears and leaf == "weight":
            q, scale = quantize_fp8_rowwise(value)
            out[key] = q
            out[f"{module}.weight_scale"] = scale
        elif value.is_floating_point():
            out[key] = value.to(storage_dtype).contiguous()
        else:
            out[key] = value.contiguous()
    return out


def dequantized_copy_(model: nn.Module) -> nn.Module:
    """Replace each Linear weight in place by its FP8 round trip (the reference the FP8 files represent)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                q, scale = quantize_fp8_rowwise(m.weight)
                m.weight.copy_((q.float() * scale[:, None]).to(m.weight.dtype))
    return model


def save_official_fp8(pipe, folder: str | Path, tiny_marker: dict | None = None) -> Path:
    """Save `pipe` in the official FP8 layout; written to a temporary folder and renamed when complete.

    `tiny_marker` (for the built-in tiny model) is written as `ditq_tiny.json`: default size and text length.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in ("transformer", "unconditional_transformer"):
            comp = tmp / name
            for f in list(comp.glob("*.safetensors")) + list(comp.glob("*.index.json")):
                f.unlink()
            state = split_to_fused(fp8_state_dict(getattr(pipe, name)))
            save_safetensors(comp / WEIGHTS_NAME, state, {"format": "pt"})
        vae_file = tmp / "vae" / WEIGHTS_NAME
        vae_state = {
            k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(vae_file).items()
        }
        save_safetensors(vae_file, vae_state, {"format": "pt"})
        te = tmp / "text_encoder"
        for f in list(te.glob("*.safetensors")) + list(te.glob("*.index.json")):
            f.unlink()
        save_safetensors(te / "model.safetensors", fp8_state_dict(pipe.text_encoder), {"format": "pt"})
        cfg = read_json(te / "config.json", "the text encoder config")
        cfg["ideogram_fp8_weight_only"] = True
        (te / "config.json").write_text(json.dumps(cfg, indent=2))
        if tiny_marker is not None:
            (tmp / "ditq_tiny.json").write_text(json.dumps(tiny_marker))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
