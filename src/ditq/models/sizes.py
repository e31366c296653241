"""Shapes and bytes of the real components: the full-size model on the meta device, weight files on disk, and
what a loaded model holds in memory. The size rules of each variant are in `ditq.quant.sizes`."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def full_size_components() -> dict[str, nn.Module]:
    """The full-size Ideogram 4 components on the meta device (no memory, exact shapes)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLFlux2, Ideogram4Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLModel

    with init_empty_weights(include_buffers=True):
        comps = {
            "transformer": Ideogram4Transformer2DModel(),
            "unconditional_transformer": Ideogram4Transformer2DModel(),
            "text_encoder": Qwen3VLModel(_qwen3_vl_8b_config(Qwen3VLConfig)),
            "vae": AutoencoderKLFlux2(),
        }
    return comps


def _qwen3_vl_8b_config(config_cls):
    """Qwen3-VL-8B's published sizes (the text encoder's `llm_features_dim` = 13 x 4096 = 53248)."""
    return config_cls(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 262144,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": 27,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_heads": 16,
            "out_hidden_size": 4096,
            "deepstack_visual_indexes": [8, 16, 24],
            "patch_size": 16,
        },
    )


def files_on_disk(folder: Path) -> dict[str, int]:
    """Real bytes of every weight file in a component folder."""
    out = {}
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        if f.suffix in (".safetensors", ".gguf", ".bin"):
            out[f.name] = f.stat().st_size
    return out


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as held in memory (quantized storage counted as stored)."""
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


__all__ = ["files_on_disk", "full_size_components", "human_bytes", "resident_bytes"]
