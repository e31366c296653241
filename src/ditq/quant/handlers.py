"""`quantize_` handlers for the recipes: INT8 (through its configs), GGUF, NF4 and FP8, in memory.

Each follows its recipe's own tensor rule with the official fused names, so an Ideogram 4 transformer quantized in
memory holds what its file would: weights the rule keeps in float become plain frozen `nn.Linear`s in the model's
dtype, as they load from a file.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ditq.formats.keys import fused_module_name
from ditq.quant.api import QuantizationRecord, dense_float, quantize_, register_quantize_handler
from ditq.quant.modules import float_bias, float_weight, linear_modules, model_dtype, set_module
from ditq.quant.recipes.fp8 import FP8Recipe
from ditq.quant.recipes.gguf import GGUFRecipe
from ditq.quant.recipes.int8 import Int8Recipe
from ditq.quant.recipes.nf4 import NF4Recipe
from ditq.quant.recipes.w4a4 import W4A4Recipe

_IDEOGRAM = re.compile(r"^layers\.\d+\.(attention\.(to_[qkv]|qkv)|feed_forward\.w[123])$")
_QKV = re.compile(r"^layers\.\d+\.attention\.to_[qkv]$")


def is_ideogram_transformer(names) -> bool:
    """Whether these Linear names are those of an Ideogram 4 transformer (blocks of attention + feed-forward)."""
    names = list(names)
    return any(_IDEOGRAM.match(n) for n in names) and any(n.endswith("adaln_modulation") for n in names)


def fused_shape(name: str, module: nn.Module) -> tuple[int, int]:
    """The stored shape of a Linear's weight under its official fused name (to_q/to_k/to_v are one qkv)."""
    rows = module.out_features * (3 if _QKV.match(name) else 1)
    return rows, module.in_features


@register_quantize_handler(Int8Recipe)
def _int8_recipe(model, recipe: Int8Recipe, filter_fn, *, stats=None, transformer=None):
    from ditq.quant.api import quantization_record

    if recipe.smoothquant and stats is None:
        from ditq.errors import ConfigError

        raise ConfigError("Int8Recipe(smoothquant=True) needs calibration statistics: pass stats=")
    quantize_(model, recipe.config(), filter_fn, stats=stats, transformer=transformer)
    return quantization_record(model)


@register_quantize_handler(GGUFRecipe)
def _gguf(model, recipe: GGUFRecipe, filter_fn, *, stats=None, transformer=None):
    from gguf import GGMLQuantizationType as Q

    from ditq.formats.gguf import GGUFLinear
    from ditq.gguf import quantize

    mods, skipped = linear_modules(model, filter_fn)
    ideogram = is_ideogram_transformer(mods)
    dtype = model_dtype(model)
    quantized, kept = {}, {}
    for name, m in mods.items():
        if name in skipped:
            kept[name] = "filter_fn"
            continue
        qtype, note = recipe.tensor_type(f"{fused_module_name(name)}.weight", fused_shape(name, m), ideogram)
        w = float_weight(m)
        if qtype in (Q.F32, Q.BF16, Q.F16):
            set_module(model, name, dense_float(m, dtype, w.device))
            kept[name] = note or f"{qtype.name} by the tensor rule"
            continue
        imatrix = None
        if stats is not None and recipe.uses_stats and qtype != Q.Q8_0:
            from ditq.quant.calibration import importance

            imatrix = importance(stats, transformer or stats.transformers[0], name)
        raw = torch.from_numpy(quantize(w.cpu().numpy(), qtype, imatrix, rule=recipe.rule))
        set_module(model, name, GGUFLinear(raw, qtype, float_bias(m), dtype).to(w.device))
        quantized[name] = qtype.name
    return QuantizationRecord(config=recipe.to_dict(), quantized=quantized, kept_float=kept)


@register_quantize_handler(NF4Recipe)
def _nf4(model, recipe: NF4Recipe, filter_fn, *, stats=None, transformer=None):
    from ditq.formats.nf4 import NF4Format, quantize_nf4

    mods, skipped = linear_modules(model, filter_fn)
    dtype = model_dtype(model)
    quantized, kept = {}, {}
    for name, m in mods.items():
        if name in skipped:
            kept[name] = "filter_fn"
            continue
        w = float_weight(m)
        if not recipe.quantizes(f"{fused_module_name(name)}.weight", fused_shape(name, m)):
            set_module(model, name, dense_float(m, dtype, w.device))
            kept[name] = f"in_features {m.in_features} is not a multiple of the block size {recipe.blocksize}"
            continue
        tensors = quantize_nf4(w.cpu(), recipe.blocksize)
        if m.bias is not None:
            tensors["bias"] = float_bias(m)
        set_module(model, name, NF4Format().build(tensors, dtype).to(w.device))
        quantized[name] = "nf4"
    return QuantizationRecord(config=recipe.to_dict(), quantized=quantized, kept_float=kept)


@register_quantize_handler(FP8Recipe)
def _fp8(model, recipe: FP8Recipe, filter_fn, *, stats=None, transformer=None):
    from ditq.formats.fp8 import Fp8Linear, quantize_fp8_rowwise

    mods, skipped = linear_modules(model, filter_fn)
    dtype = model_dtype(model)
    quantized, kept = {}, {}
    for name, m in mods.items():
        if name in skipped or isinstance(m, Fp8Linear):
            kept[name] = "filter_fn" if name in skipped else "already FP8"
            continue
        w = float_weight(m)
        q, scale = quantize_fp8_rowwise(w)
        set_module(model, name, Fp8Linear(q, scale, float_bias(m), dtype).to(w.device))
        quantized[name] = "fp8"
    return QuantizationRecord(config=recipe.to_dict(), quantized=quantized, kept_float=kept)


@register_quantize_handler(W4A4Recipe)
def _w4a4(model, recipe: W4A4Recipe, filter_fn, *, stats=None, transformer=None):
    """SVDQuant and ConvRot W4A4: the streaming writer's decisions and tensors (`ditq.quant.recipes.w4a4_plan`)."""
    from ditq.quant.recipes.w4a4_plan import quantize_model_w4a4

    return quantize_model_w4a4(model, recipe, filter_fn, stats, transformer)
