"""Names and defaults the command line offers before anything heavy is imported.

`ditq VERB --help` and the argument checks run without importing torch, diffusers or the quantizers; the modules
that own these names import them from here, and a test checks each against the registry it mirrors.
"""

from __future__ import annotations

GiB = 2**30

# Where pipeline components live while generating (`ditq.models.placement`).
OFFLOAD = ("none", "encoder", "model", "group", "sequential", "auto")
# Attention kernels: PyTorch's SDPA, or comfy-kitchen's INT8 attention (CUDA).
ATTENTION = ("sdpa", "int8")
# Variant names `parse_recipe` builds (`ditq.quant.recipes.recipe_names()`), in its order.
RECIPE_NAMES = (
    "fp8",
    "q8_0",
    "q6_k",
    "q5_k",
    "q5_k_m",
    "q4_k",
    "q4_k_m",
    "q3_k",
    "q3_k_m",
    "q2_k",
    "int8",
    "nf4",
    "svdq_w4a4",
    "convrot_w4a4",
)
# Card presets of `ditq plan --vram`.
CARDS = {"3090": 24 * GiB, "4090": 24 * GiB, "a100-40": 40 * GiB, "a100-80": 80 * GiB, "h100": 80 * GiB}
# Variants `ditq plan` compares when none are named.
PLAN_VARIANTS = ("fp8", "int8", "q8_0", "q6_k", "q4_k", "nf4", "int8+q4_k")
# Bootstrap defaults of `ditq report` (`ditq.stats.bootstrap`).
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
