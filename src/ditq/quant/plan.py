"""The memory plan of a generation: for every offload policy, what is on the device in each stage, its peak, and
what moves over PCIe per step; which policies fit a card, and the fastest that does (`auto`).

    plan = plan_variant(components, "int8+q4_k", height=1024, width=1024, vram=parse_vram("3090"))
    plan.policy, plan.peak_bytes, plan.transfer_bytes_per_step, plan.as_dict()

Weights come from the size rules `ditq inspect` uses (`ditq.quant.sizes`); activations from formulas over the
configs (below), whose per-layer terms (a quantized Linear's own temporaries: FP8's dequantized weight, GGUF's
decoded tiles, the output) are measured by running that one layer of the variant's format on fake tensors.
`ditq.quant.simulate` checks the whole: one full step of the real pipeline on fake tensors.

Activation peaks per image (bytes; bf16 e = 2; T text tokens, N image tokens, Lc = T + N, D width, F feed-forward,
Fl the text features, hd the head size):

- encode: the packed conditioning is built in float32 beside the selected hidden states,
  8·Fl·Lc + 2·T·Fl (the Qwen3-VL forward itself, (layers + 1)·2·T·H + its MLP, is smaller at every size);
- denoising step, the larger of: the conditional entry (the caller's features, their masked copy and the float32
  RMSNorm with its square: 12·Lc·Fl + 2·Lc·D), the text projection, and a block of either branch:
  2·Lc·Fl (held by the caller) + 12·L·D + L² (the mask) + 4·L·hd (RoPE) + the feed-forward, where the feed-forward
  is max(w1, 2LFe + w3, 6·LF, 2LFe + w2) with w* each layer's measured peak (w1 and w3 fused, as INT8 runs them:
  max(w13, 8·LF, 2LFe + w2));
- decode: the VAE's last up block at full resolution, H·W·e·max(3·c₁, 5·c₀) (c the block channels).

Residency per stage (E text encoder, T / U the transformers, V the VAE):

    none        E+T+U+V everywhere
    encoder     encode E; denoise and decode T+U+V                      (nothing moves per step)
    group       encode E; denoise V + both transformers' non-block layers + 2 blocks (one computing, one
                prefetched); decode V + non-block layers                (T+U stream every step)
    model       encode E; denoise the larger of T and U; decode V       (T+U move whole every step)
    sequential  encode E; then 2 of the stage's largest layers (one computing, one prefetched)
                                                                        (everything moves every step)

A card's usable memory is its size less `RESERVE` (the CUDA context, cuBLAS workspaces, the caching allocator's
slack and a display): 22.5 GiB of a 24 GiB card.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ditq.errors import ConfigError
from ditq.names import CARDS, GiB, PLAN_VARIANTS
from ditq.quant.activations import decode_activations, denoise_activations, dims, encode_activations
from ditq.quant.footprint import Weights, weights

RESERVE = int(1.5 * GiB)
POLICY_ORDER = ("none", "encoder", "group", "model", "sequential")  # fastest first
STAGES = ("encode", "denoise", "decode")
TRANSFORMERS = ("transformer", "unconditional_transformer")
DEFAULT_VARIANTS = PLAN_VARIANTS
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_vram(text: str | int) -> int:
    """'24GiB', '24GB', '24000MiB', a byte count, or a card preset (3090, 4090, a100-40, a100-80, h100)."""
    if isinstance(text, int):
        return text
    key = str(text).strip().lower()
    if key in CARDS:
        return CARDS[key]
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmg]i?b|b)?", key)
    if not m:
        raise ConfigError(f"--vram {text!r}: expected a size like 24GiB or one of {', '.join(CARDS)}")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def variant_recipes(variant: str) -> dict[str, object]:
    """'int8+q4_k' -> {transformer: Int8Recipe, unconditional_transformer: GGUFRecipe}; 'fp8' / 'bf16' stay names."""
    from ditq.quant.recipes import parse_recipe

    cond, plus, uncond = variant.partition("+")
    parts = {"transformer": cond, "unconditional_transformer": uncond if plus else cond}
    out = {}
    for comp, name in parts.items():
        if not name:
            raise ConfigError(f"variant {variant!r}: empty recipe name")
        out[comp] = name if name in ("fp8", "bf16") else parse_recipe(name)
    return out


# ----------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PolicyPlan:
    policy: str
    stages: dict[str, dict]
    peak_bytes: int
    transfer_bytes_per_step: int
    fits: bool

    def as_dict(self) -> dict:
        return {
            "fits": self.fits,
            "peak_bytes": self.peak_bytes,
            "transfer_bytes_per_step": self.transfer_bytes_per_step,
            "stages": self.stages,
        }


def resident(policy: str, stage: str, w: Weights) -> dict[str, int]:
    """{component: bytes on the device} during `stage` under `policy`."""
    c = w.components
    t, u = TRANSFORMERS
    if policy == "none":
        return dict(c)
    if stage == "encode":  # every offloading policy encodes with the whole text encoder on the device
        return {"text_encoder": c["text_encoder"]}
    if policy == "encoder":
        return {k: v for k, v in c.items() if k != "text_encoder"}
    if policy == "group":
        out = {"vae": c["vae"], **{k: w.outside_blocks[k] for k in (t, u)}}
        if stage == "denoise":
            out["blocks"] = 2 * max(w.block[t], w.block[u])
        return out
    if policy == "model":
        if stage == "decode":
            return {"vae": c["vae"]}
        big = max((t, u), key=lambda k: c[k])
        return {big: c[big]}
    if policy == "sequential":  # leaf-level group offloading: the layer computing and the one prefetched
        if stage == "decode":
            return {"vae": 2 * w.largest_leaf["vae"]}
        return {"layers": 2 * max(w.largest_leaf[t], w.largest_leaf[u])}
    raise ConfigError(f"unknown offload policy {policy!r}; expected one of {', '.join(POLICY_ORDER)}")


def transfer_per_step(policy: str, w: Weights) -> int:
    """Bytes copied host -> device per denoising step (the transformers' weights, streamed or whole)."""
    if policy in ("none", "encoder"):
        return 0
    return sum(w.components[k] for k in TRANSFORMERS)


def plan_policy(policy: str, w: Weights, activations: dict[str, int], usable: int) -> PolicyPlan:
    stages = {}
    for stage in STAGES:
        res = resident(policy, stage, w)
        total = sum(res.values()) + activations[stage]
        stages[stage] = {
            "resident": res,
            "weights": sum(res.values()),
            "activations": activations[stage],
            "total": total,
        }
    peak = max(s["total"] for s in stages.values())
    return PolicyPlan(policy, stages, peak, transfer_per_step(policy, w), peak <= usable)


@dataclass(frozen=True)
class VariantPlan:
    variant: str
    weights: Weights
    activations: dict[str, int]
    denoise_phases: dict[str, int]
    policies: dict[str, PolicyPlan]
    policy: str
    simulated: dict | None = field(default=None)

    @property
    def chosen(self) -> PolicyPlan:
        return self.policies[self.policy]

    def as_dict(self) -> dict:
        chosen = self.chosen
        out = {
            "policy": self.policy,
            "fits": chosen.fits,
            "peak_bytes": chosen.peak_bytes,
            "simulated_peak_bytes": None if self.simulated is None else self.simulated["peak_bytes"],
            "transfer_bytes_per_step": chosen.transfer_bytes_per_step,
            "stages": chosen.stages,
            "components": dict(self.weights.components),
            "activations": dict(self.activations),
            "denoise_phases": dict(self.denoise_phases),
            "policies": {p: pp.as_dict() for p, pp in self.policies.items()},
        }
        if self.simulated is not None:
            out["simulated"] = self.simulated
        return out


def plan_variant(
    components: dict[str, nn.Module],
    variant: str,
    height: int,
    width: int,
    vram: int,
    text_tokens: int = 2048,
    batch: int = 1,
    recipes: dict[str, object] | None = None,
) -> VariantPlan:
    """The plan of one variant (components built on meta: `full_size_components()` or a folder's configs; the
    text encoder's vision tower is dropped from them). `recipes` overrides the recipes parsed from the name."""
    recipes = recipes or variant_recipes(variant)
    d = dims(components, height, width, text_tokens)
    w = weights(components, recipes)
    phases = denoise_activations(recipes, d)
    acts = {
        "encode": batch * encode_activations(d),
        "denoise": batch * max(phases.values()),
        "decode": batch * decode_activations(d),
    }
    usable = vram - RESERVE
    policies = {p: plan_policy(p, w, acts, usable) for p in POLICY_ORDER}
    fitting = [p for p in POLICY_ORDER if policies[p].fits]
    chosen = fitting[0] if fitting else min(POLICY_ORDER, key=lambda p: policies[p].peak_bytes)
    return VariantPlan(variant, w, acts, phases, policies, chosen)


def simulated_peak(plan: VariantPlan, sim) -> dict:
    """The chosen policy's peak from a `ditq.quant.simulate.Simulation`: the same residency rules over the
    simulated component bytes, plus each stage's simulated activation peak."""
    comps = dict(sim.components)
    outside = {
        k: comps[k] - plan.weights.components[k] + plan.weights.outside_blocks[k] for k in TRANSFORMERS
    }
    w = Weights(comps, dict(sim.block_bytes), outside, plan.weights.largest_leaf)
    acts = sim.stages.as_dict()
    pp = plan_policy(plan.policy, w, acts, 0)
    return {"peak_bytes": pp.peak_bytes, "stages": pp.stages, "components": comps}


# ------------------------------------------------------------------------------------------------ whole models


def _components_of(source: str):
    """(a builder of fresh meta components, the folder's own {transformer: recipe} or None, its variant name)."""
    if source == "full":
        from ditq.models.sizes import full_size_components

        return full_size_components, None, None
    from ditq.models.loading import check_folder, read_record, resolve_source
    from ditq.quant.inspect import meta_components
    from ditq.quant.recipes.base import recipe_from_dict

    folder = resolve_source(source)
    check_folder(folder)
    record = read_record(folder)
    own = None
    if record is not None:
        own = {
            name: recipe_from_dict(record.recipes[name])
            if record.recipes.get(name)
            else record.formats.get(name, "fp8")
            for name in TRANSFORMERS
        }
        if any(isinstance(r, str) and r not in ("fp8", "bf16") for r in own.values()):
            own = None  # imported from another tool: no recipe to size it by
    return (lambda: meta_components(folder)), own, (record.variant if record else "fp8")


def plan_model(
    source: str,
    variants: list[str] | None,
    height: int,
    width: int,
    vram: int,
    *,
    batch: int = 1,
    text_tokens: int = 2048,
    simulate: bool = False,
    progress=None,
) -> dict:
    """The plan of each variant of `source` ('full', 'tiny' or a pipeline folder) as a JSON-ready dict. Without
    `variants`, a folder ditq wrote is planned as what it holds. `simulate` runs one full step per variant on fake
    tensors (`ditq.quant.simulate`) and adds its peak under the chosen policy."""
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}")
    if simulate and batch != 1:
        raise ConfigError("--simulate runs one image: use --batch 1")
    build, own, own_name = _components_of(source)
    if variants is None:
        if own is None and own_name not in (None, "fp8"):
            raise ConfigError(f"{source}: its ditq.json has no recipe to plan from; pass --variants")
        variants = [own_name or "fp8"] if own or own_name else list(DEFAULT_VARIANTS)
        recipes = {variants[0]: own} if own else {}
    else:
        recipes = {}
    say = progress or (lambda _msg: None)
    out: dict = {
        "model": source,
        "vram_bytes": vram,
        "usable_bytes": vram - RESERVE,
        "height": height,
        "width": width,
        "batch": batch,
        "text_tokens": text_tokens,
        "variants": {},
    }
    for name in variants:
        say(f"{name}: plan")
        plan = plan_variant(build(), name, height, width, vram, text_tokens, batch, recipes.get(name))
        if simulate:
            from ditq.quant.simulate import simulate as run_simulation

            sim = run_simulation(
                build(),
                recipes.get(name) or variant_recipes(name),
                height,
                width,
                text_tokens,
                progress=lambda stage, name=name: say(f"{name}: simulating {stage}"),
            )
            plan = VariantPlan(**{**plan.__dict__, "simulated": simulated_peak(plan, sim)})
        out["variants"][name] = plan.as_dict()
    return out


def choose_policy(model: str, settings, device: str) -> str:
    """The policy `--offload auto` runs `model` under: the fastest the plan says fits the device. Off CUDA
    everything is host memory and nothing is moved: "none"."""
    import logging

    import torch

    if not str(device).startswith("cuda"):
        return "none"
    vram = torch.cuda.get_device_properties(torch.device(device)).total_memory
    report = plan_model(
        model, None, settings.height, settings.width, vram, text_tokens=settings.max_sequence_length
    )
    (row,) = report["variants"].values()
    if not row["fits"]:
        logging.getLogger(__name__).warning(
            "%s: no offload policy fits %.1f GiB at %dx%d (smallest peak %.1f GiB, %s)",
            model,
            vram / GiB,
            settings.height,
            settings.width,
            row["peak_bytes"] / GiB,
            row["policy"],
        )
    return row["policy"]


__all__ = [
    "choose_policy",
    "plan_model",
    "CARDS",
    "DEFAULT_VARIANTS",
    "POLICY_ORDER",
    "RESERVE",
    "PolicyPlan",
    "VariantPlan",
    "Weights",
    "decode_activations",
    "denoise_activations",
    "dims",
    "encode_activations",
    "parse_vram",
    "plan_variant",
    "resident",
    "simulated_peak",
    "transfer_per_step",
    "variant_recipes",
]
