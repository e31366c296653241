"""Parameter counts and bytes per storage format, from shapes alone (meta-device models) or from files.

Predictions per format (per component):
- bf16: 2 bytes per element.
- fp8: every Linear weight 1 byte + fp32 scale per output row; everything else bf16 (the official layout).
- int8: Linear weights of the transformer blocks and the text projection 1 byte + fp32 scale per row; the rest bf16
  (ditq's W8A8 recipe target set before protection).
- q4_k (and the other GGUF types): 1-D and small (<= 1024 elements) tensors F32; the tensors stable-diffusion.cpp's
  Ideogram 4 rule quantizes (block adaLN modulation, attention qkv/o, feed-forward) at the type's bits per weight
  when the row length is a multiple of its block (256 for k-quants), else Q8_0 when it is a multiple of 32, else
  bf16 (the recipe's fallbacks); other weights bf16.
- nf4: every Linear weight whose row length is a multiple of 64: 4 bits + one fp32 absmax per 64 elements
  (bitsandbytes, no double quantization); other Linear weights (the recipe's fallback) and the rest bf16. The
  64-byte code book and the JSON state stored with each NF4 layer count as file overhead, like the header.
The text encoder is predicted in FP8 for every format but bf16 (ditq quantizes the transformers and reuses the
reference text encoder); the VAE is bf16 in every format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

FORMATS = ("bf16", "fp8", "int8", "q8_0", "q6_k", "q5_k", "q4_k", "nf4")
NF4_BLOCK = 64
GGUF_BYTES_PER_BLOCK = {"q8_0": (34, 32), "q6_k": (210, 256), "q5_k": (176, 256), "q4_k": (144, 256)}
GGUF_QUANTIZED = re.compile(
    r"^layers\.\d+\.(adaln_modulation|attention\.(qkv|o|to_[qkv]|to_out\.0)|feed_forward\.w[123])\.weight$"
)
INT8_TARGET = re.compile(
    r"^(layers\.\d+\.(attention\.(to_[qkv]|to_out\.0|qkv|o)|feed_forward\.w[123])|llm_cond_proj)$"
)


@dataclass(frozen=True)
class TensorShape:
    name: str
    shape: tuple[int, ...]
    is_linear_weight: bool

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def model_shapes(model: nn.Module) -> list[TensorShape]:
    """Every parameter and persistent buffer of `model` with whether it is a Linear weight."""
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        module, _, leaf = name.rpartition(".")
        out.append(TensorShape(name, tuple(t.shape), module in linears and leaf == "weight"))
    return out


def tensor_bytes(t: TensorShape, fmt: str, component: str) -> int:
    n = t.numel
    rows = t.shape[0] if t.shape else 1
    transformer = component.endswith("transformer")
    if fmt == "bf16" or component == "vae":
        return 2 * n
    if not transformer and component == "text_encoder" and fmt != "fp8":
        fmt = "fp8"  # ditq quantizes the transformers; the text encoder stays in the reference FP8
    if fmt == "fp8":
        return n + 4 * rows if t.is_linear_weight else 2 * n
    if fmt == "int8":
        module = t.name.rsplit(".", 1)[0]
        if t.is_linear_weight and (not transformer or INT8_TARGET.match(module)):
            return n + 4 * rows
        return 2 * n
    if fmt == "nf4":
        # the recipe keeps a weight in bf16 when its rows are not whole 64-value blocks
        if t.is_linear_weight and t.shape[-1] % NF4_BLOCK == 0:
            return n // 2 + 4 * -(-n // NF4_BLOCK)
        return 2 * n
    if fmt in GGUF_BYTES_PER_BLOCK:
        if transformer:
            # the recipe's order: 1-D and small tensors F32, then sd.cpp's rule at the type (Q8_0 when the row
            # length is not a multiple of the type's block, bf16 when not even of 32), everything else bf16
            if len(t.shape) <= 1 or n <= 1024:
                return 4 * n
            if GGUF_QUANTIZED.match(t.name) and len(t.shape) == 2:
                for qtype in (fmt, "q8_0"):
                    block_bytes, block = GGUF_BYTES_PER_BLOCK[qtype]
                    if t.shape[-1] % block == 0:
                        return n // block * block_bytes
            return 2 * n
    raise ValueError(f"unknown format {fmt!r}")


def component_table(model: nn.Module, component: str) -> dict:
    shapes = model_shapes(model)
    return {
        "parameters": sum(t.numel for t in shapes),
        "bytes": {fmt: sum(tensor_bytes(t, fmt, component) for t in shapes) for fmt in FORMATS},
    }


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
    for m in model.modules():  # bitsandbytes keeps quantization state outside parameters
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None and getattr(qs, "absmax", None) is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


__all__ = [
    "FORMATS",
    "component_table",
    "full_size_components",
    "files_on_disk",
    "resident_bytes",
    "human_bytes",
]
torch  # noqa: B018 - torch is imported for type users of this module
