"""Bytes each component takes in each variant, predicted from shapes with the formats' own size rules.

The prediction of a transformer walks its tensors under their official fused names (what the files hold) and asks
the recipe what each one becomes, with the same rule its writer applies:
- `bf16`: 2 bytes per element;
- `fp8` (the official reference): every Linear weight E4M3 + an fp32 scale per row, everything else bf16;
- INT8: the layers the recipe quantizes (all but the protected ones, those too narrow for sd.cpp's Q8_0 rows and,
  with SmoothQuant, the unfoldable ones, which the writer keeps in bf16 where smoothing helps) int8 + fp32 row scale
  + marker; the rest as the FP8 source stores it dequantized, bf16. For a written folder, the layers its
  `ditq.json` says were kept in bf16 are used instead, so the prediction is exact;
- GGUF: `ditq.formats.gguf.tensor_type` per tensor, its ggml block size;
- NF4: every Linear weight with whole blocks per row as packed codes + fp32 absmax per block, the rest bf16.
The text encoder is predicted in FP8 for every variant but bf16 (ditq quantizes the transformers and reuses the
reference text encoder); the VAE is bf16 in every variant. File overhead (headers, NF4 code books and JSON states)
is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from torch import nn

from ditq.formats import fp8 as fp8_format
from ditq.formats import int8 as int8_format
from ditq.formats import nf4 as nf4_format
from ditq.formats.gguf import stored_bytes
from ditq.formats.keys import fused_module_name, split_to_fused
from ditq.quant.recipes.base import Recipe, parse_recipe
from ditq.quant.recipes.fp8 import FP8Recipe
from ditq.quant.recipes.gguf import GGUFRecipe
from ditq.quant.recipes.int8 import Int8Recipe
from ditq.quant.recipes.nf4 import NF4Recipe
from ditq.quant.recipes.w4a4 import W4A4Recipe

# the columns of `ditq inspect`: the references and one recipe per family
TABLE = ("bf16", "fp8", "int8", "q8_0", "q6_k", "q5_k", "q4_k", "nf4", "svdq_w4a4", "convrot_w4a4")
TRANSFORMERS = ("transformer", "unconditional_transformer")


def fused_tensors(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """({official fused tensor name: shape}, fused names of the Linear modules) of a model (built on meta)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    fused = split_to_fused(shapes, row_joiner=lambda _s, parts: (sum(p[0] for p in parts), *parts[0][1:]))
    linears = {fused_module_name(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return fused, linears


def int8_modules(recipe: Int8Recipe, model: nn.Module, protect: Iterable[str] = ()) -> set[str]:
    """Fused Linear names the INT8 recipe stores as int8 (before any data-dependent SmoothQuant decision)."""
    from ditq.quant.int8.config import protected_set, too_narrow
    from ditq.quant.int8.smoothquant import smooth_groups

    linears = {
        n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    config = recipe.config()
    base = getattr(config, "base", config)
    keep = protected_set(linears, (*base.protect, *protect)) | too_narrow(linears, base)
    if recipe.smoothquant:
        keep |= {n for g in smooth_groups(linears) if g.fold is None for n in g.linears}
    return {fused_module_name(n) for n in linears if n not in keep}


def transformer_bytes(
    model: nn.Module, recipe: Recipe | str, kept: Iterable[str] | None = None, protect: Iterable[str] = ()
) -> int:
    """Bytes of one transformer's tensors under `recipe` (a Recipe, or "bf16" / "fp8" for the references).

    `kept`: for INT8, the fused Linear names a written folder kept in bf16 (its ditq.json summary).
    """
    tensors, linears = fused_tensors(model)
    if isinstance(recipe, str) and recipe not in ("bf16", "fp8"):
        recipe = parse_recipe(recipe)
    if isinstance(recipe, FP8Recipe):
        recipe = "fp8"
    int8 = None
    if isinstance(recipe, Int8Recipe):
        int8 = (
            int8_modules(recipe, model, protect)
            if kept is None
            else {m for m in linears if m not in set(kept)}
        )
    total = 0
    for name, shape in tensors.items():
        module, _, leaf = name.rpartition(".")
        is_linear = leaf == "weight" and module in linears and len(shape) == 2
        total += _tensor_bytes(recipe, name, shape, is_linear, int8)
    return total


def _tensor_bytes(recipe, name: str, shape: tuple[int, ...], is_linear: bool, int8: set[str] | None) -> int:
    numel = math.prod(shape) if shape else 1
    if recipe == "bf16":
        return 2 * numel
    if isinstance(recipe, GGUFRecipe):
        return stored_bytes(recipe.tensor_type(name, shape)[0], shape)
    if not is_linear:
        return 2 * numel
    n, k = shape
    if recipe == "fp8":
        return fp8_format.weight_bytes(n, k)
    if isinstance(recipe, Int8Recipe):
        return int8_format.weight_bytes(n, k) if name.rpartition(".")[0] in int8 else 2 * numel
    if isinstance(recipe, NF4Recipe):
        return nf4_format.weight_bytes(n, k, recipe.blocksize) if recipe.quantizes(name, shape) else 2 * numel
    if isinstance(recipe, W4A4Recipe):  # SVDQuant / ConvRot: int4 codes + scales (+ low-rank branch) + marker
        return recipe.tensor_bytes(name, shape)
    raise ValueError(f"no size rule for {recipe!r}")


def component_bytes(model: nn.Module, component: str, variant: Recipe | str, **kwargs) -> int:
    """Bytes of one pipeline component in a variant: transformers by the recipe, the text encoder in the
    reference FP8 (bf16 in the bf16 variant), the VAE in bf16."""
    if component in TRANSFORMERS:
        return transformer_bytes(model, variant, **kwargs)
    if component == "text_encoder" and variant != "bf16":
        return transformer_bytes(model, "fp8")
    return transformer_bytes(model, "bf16")


def component_table(model: nn.Module, component: str, columns: Iterable[str] = TABLE) -> dict:
    """{"parameters", "bytes": {column: bytes}} of one component for the columns of `ditq inspect`."""
    params = sum(math.prod(t.shape) for t in model.state_dict(keep_vars=True).values())
    return {"parameters": params, "bytes": {c: component_bytes(model, component, c) for c in columns}}


def predicted_folder_bytes(
    model: nn.Module, component: str, recipe: Mapping | None, summary: Mapping | None
) -> int:
    """The predicted bytes of one component of a written folder from its ditq.json recipe and summary."""
    from ditq.quant.recipes.base import recipe_from_dict

    if component not in TRANSFORMERS or recipe is None:
        return component_bytes(model, component, "fp8")
    r = recipe_from_dict(recipe)
    kept = None
    if isinstance(r, Int8Recipe) and summary and isinstance(summary.get("kept_bf16"), Mapping):
        kept = list(summary["kept_bf16"])
    return transformer_bytes(model, r, kept=kept)
