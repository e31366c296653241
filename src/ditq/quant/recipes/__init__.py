"""Recipes: frozen configs saying how a transformer is quantized (see `base`), one module per family.

`parse_recipe("q4_k_m")` builds a recipe from a variant name; `recipe_names()` lists those names; the pipeline
writer is `ditq.quant.writer.quantize_pipeline`.
"""

from __future__ import annotations

from ditq.quant.recipes.base import (
    RECIPE_KINDS,
    ConvertContext,
    Recipe,
    parse_recipe,
    recipe_from_dict,
    recipe_names,
)
from ditq.quant.recipes.fp8 import FP8Recipe
from ditq.quant.recipes.gguf import GGUFRecipe
from ditq.quant.recipes.int8 import Int8Recipe
from ditq.quant.recipes.nf4 import NF4Recipe
from ditq.quant.recipes.w4a4 import ConvRotW4A4Recipe, SVDQuantRecipe, W4A4Recipe

__all__ = [
    "RECIPE_KINDS",
    "ConvRotW4A4Recipe",
    "ConvertContext",
    "FP8Recipe",
    "GGUFRecipe",
    "Int8Recipe",
    "NF4Recipe",
    "Recipe",
    "SVDQuantRecipe",
    "W4A4Recipe",
    "parse_recipe",
    "recipe_from_dict",
    "recipe_names",
]
