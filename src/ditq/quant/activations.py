"""Activation peaks of one generation, per stage, from the component configs (the formulas of `ditq.quant.plan`'s
docstring). A quantized Linear's own temporaries (its output, FP8's dequantized weight, GGUF's decoded tiles) are
measured by running that one layer of the variant's format on fake tensors (`ditq.quant.simulate`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from ditq.errors import ConfigError


@dataclass(frozen=True)
class Dims:
    """The sizes the activation formulas read, from the component configs and the resolution."""

    text_tokens: int
    image_tokens: int
    width: int  # D
    ffn: int  # F
    llm: int  # Fl
    head_dim: int
    text_hidden: int
    text_layers: int
    text_ffn: int
    vae_channels: tuple[int, ...]
    height_px: int
    width_px: int

    @property
    def cond_tokens(self) -> int:
        return self.text_tokens + self.image_tokens


def dims(components: dict[str, nn.Module], height: int, width: int, text_tokens: int) -> Dims:
    tc = components["transformer"].config
    te = components["text_encoder"].config
    te = getattr(te, "text_config", te)
    channels = tuple(components["vae"].config.block_out_channels)
    down = 2 ** (len(channels) - 1) * 2  # the VAE's downsampling, then the transformer's 2x2 patches
    if height % down or width % down:
        raise ConfigError(f"{height}x{width}: height and width must be multiples of {down}")
    return Dims(
        text_tokens=text_tokens,
        image_tokens=(height // down) * (width // down),
        width=tc.num_attention_heads * tc.attention_head_dim,
        ffn=tc.intermediate_size,
        llm=tc.llm_features_dim,
        head_dim=tc.attention_head_dim,
        text_hidden=te.hidden_size,
        text_layers=te.num_hidden_layers,
        text_ffn=te.intermediate_size,
        vae_channels=channels,
        height_px=height,
        width_px=width,
    )


# ------------------------------------------------------------------------------------------------- activations


def _recipe_key(recipe) -> str:
    return recipe if isinstance(recipe, str) else repr(recipe)


_RECIPES: dict[str, object] = {}


@cache
def _layer_peak_cached(key: str, name: str, n: int, k: int, tokens: int, dtype: torch.dtype) -> int:
    from ditq.formats.keys import fused_module_name
    from ditq.quant.fakes import DEVICE, fake_linear
    from ditq.quant.handlers import fused_shape
    from ditq.quant.simulate import _peak, fake_mode

    recipe = _RECIPES[key]
    with fake_mode():
        linear = nn.Linear(k, n, bias=False, device="meta")
        context = {"fused_shape": fused_shape, "int8": {fused_module_name(name)}}
        layer = fake_linear(recipe, name, linear, dtype, context)
        x = torch.empty(1, tokens, k, dtype=dtype, device=DEVICE)
        return _peak(lambda: layer(x))


def layer_peak(recipe, name: str, n: int, k: int, tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak bytes one Linear of `recipe` allocates on `tokens` tokens: its output and its own temporaries, measured
    on fake tensors (the input excluded), plus what its CUDA kernel allocates that no fake implementation shows
    (the W8A8 / W4A4 kernels' quantized input and its scales)."""
    from ditq.quant.recipes import ConvRotW4A4Recipe, Int8Recipe, SVDQuantRecipe

    key = _recipe_key(recipe)
    _RECIPES[key] = recipe
    peak = _layer_peak_cached(key, name, n, k, tokens, dtype)
    if isinstance(recipe, Int8Recipe):
        peak += tokens * k + 4 * tokens
    elif isinstance(
        recipe, SVDQuantRecipe
    ):  # packed int4 input, its bf16 group scales, the low-rank activation
        peak += tokens * k // 2 + tokens * k // 32 + 4 * tokens * recipe.rank
    elif isinstance(recipe, ConvRotW4A4Recipe):  # the rotated bf16 input, its packed int4 codes and scales
        peak += 2 * tokens * k + tokens * k // 2 + 4 * tokens
    return peak


def _mlp(recipe, d: Dims, tokens: int, e: int) -> int:
    from ditq.quant.recipes import Int8Recipe

    lf = tokens * d.ffn * e
    w2 = layer_peak(recipe, "layers.0.feed_forward.w2", d.width, d.ffn, tokens)
    if isinstance(recipe, Int8Recipe):  # w1 and w3 run as one fused GEMM
        w13 = layer_peak(recipe, "layers.0.feed_forward.w1", 2 * d.ffn, d.width, tokens)
        return max(w13, 4 * lf, lf + w2)
    w1 = layer_peak(recipe, "layers.0.feed_forward.w1", d.ffn, d.width, tokens)
    w3 = layer_peak(recipe, "layers.0.feed_forward.w3", d.ffn, d.width, tokens)
    return max(w1, lf + w3, 3 * lf, lf + w2)


def _block(recipe, d: Dims, tokens: int, e: int) -> int:
    return (
        6 * tokens * d.width * e + tokens * tokens + 2 * tokens * d.head_dim * e + _mlp(recipe, d, tokens, e)
    )


def denoise_activations(recipes: dict[str, object], d: Dims, e: int = 2) -> dict[str, int]:
    """{phase: bytes} of one denoising step (both branches); the step's peak is the largest."""
    lc, n = d.cond_tokens, d.image_tokens
    held = lc * d.llm * e  # the packed conditioning, alive through the whole step
    cond, uncond = recipes["transformer"], recipes["unconditional_transformer"]
    return {
        "cond_entry": 6 * lc * d.llm * e + lc * d.width * e,
        "cond_projection": 2 * held
        + layer_peak(cond, "llm_cond_proj", d.width, d.llm, lc)
        + lc * d.width * e,
        "cond_block": held + _block(cond, d, lc, e),
        "uncond_entry": held + 5 * n * d.llm * e + n * d.width * e,
        "uncond_block": held + _block(uncond, d, n, e),
    }


def encode_activations(d: Dims, e: int = 2) -> int:
    lc, t = d.cond_tokens, d.text_tokens
    packed = 8 * d.llm * lc + t * d.llm * e
    forward = (
        (d.text_layers + 1) * t * d.text_hidden * e + 3 * t * d.text_ffn * e + 8 * d.text_ffn * d.text_hidden
    )
    return max(packed, forward)


def decode_activations(d: Dims, e: int = 2) -> int:
    c = d.vae_channels
    c1 = c[1] if len(c) > 1 else c[0]
    return d.height_px * d.width_px * e * max(3 * c1, 5 * c[0])
