"""LoRA key names: which transformer a key is for, which Linear it adapts, and which factor it holds.

A key is `<prefix><module><role>`. The prefix names the transformer (see `ditq.lora` for the full table and the
rule for keys without one); the module is a Linear of `Ideogram4Transformer2DModel` in the official fused naming
(`layers.3.attention.qkv`, `layers.3.attention.o`) or diffusers' split naming (`layers.3.attention.to_q`,
`layers.3.attention.to_out.0`), dotted (`layers.3.feed_forward.w1`) or, after a kohya-style prefix, with every dot
flattened to `_` (`lora_unet_layers_3_feed_forward_w1`); the role is one of the factor suffixes in `ROLES`.

Flattened names are resolved against the model's own module names, never by guessing where the dots were, so
`to_out_0` and `feed_forward_w1` come back exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ditq.formats.keys import fused_module_name

COND, UNCOND = "transformer", "unconditional_transformer"
BRANCHES = (COND, UNCOND)

# dotted prefixes, checked in this order (an `uncond.` form before the conditional prefix it extends)
DOTTED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.uncond.", UNCOND),  # stable-diffusion.cpp's name for the unconditional model
    ("diffusion_model.uncond.", UNCOND),
    ("unconditional_transformer.", UNCOND),  # the pipeline component's name (diffusers style)
    ("uncond.", UNCOND),
    ("model.diffusion_model.", COND),  # ComfyUI
    ("diffusion_model.", COND),  # ComfyUI, ai-toolkit
    ("conditional_transformer.", COND),  # accepted by diffusers' Ideogram 4 converter
    ("transformer.", COND),  # diffusers / peft through the pipeline
    ("base_model.model.", COND),  # peft's PeftModel.save_pretrained of the transformer alone
)
# kohya-style prefixes: the module name follows with its dots flattened to underscores
FLAT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unconditional_transformer_", UNCOND),
    ("lora_uncond_", UNCOND),
    ("lora_transformer_", COND),  # OneTrainer / kohya for DiT models
    ("lora_unet_", COND),  # kohya sd-scripts, ai-toolkit's kohya export
)
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoders.", "lora_te.")

# factor suffixes: "down" is A [rank, in_features], "up" is B [out_features, rank], "alpha" a scalar
ROLES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)
# suffixes of other adapter kinds, named in the unknown-key list with the reason ditq skips them
UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (".dora_scale", "DoRA magnitude vectors are not supported"),
    (".lora_B.bias", "LoRA bias terms are not supported"),
    (".lora_up.bias", "LoRA bias terms are not supported"),
    (".diff", "full weight differences are not LoRA factors"),
    (".diff_b", "full bias differences are not LoRA factors"),
)
_OTHER_ADAPTER = re.compile(r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2|w_norm|b_norm)$")
_QKV_PART = re.compile(r"^(layers\.\d+\.attention\.)to_([qkv])$")


@dataclass(frozen=True)
class ParsedKey:
    """One LoRA tensor name taken apart: `branch` None when the key carries no transformer prefix."""

    key: str
    stem: str  # the key without its role suffix: the name of the adapted module in the file
    branch: str | None
    module: str
    role: str
    flat: bool


def parse_key(key: str) -> ParsedKey | str:
    """The parts of a LoRA key, or the reason the key is not a LoRA factor ditq applies."""
    if key.startswith(TEXT_ENCODER_PREFIXES):
        return "text-encoder LoRA: ditq adapts the transformers only"
    for suffix, reason in UNSUPPORTED:
        if key.endswith(suffix):
            return reason
    if _OTHER_ADAPTER.search(key):
        return "LoHa / LoKr / norm adapters are not supported"
    role = next(((s, r) for s, r in ROLES if key.endswith(s)), None)
    if role is None:
        return "not a LoRA factor (expected lora_A/lora_B, lora_down/lora_up or alpha)"
    stem = key[: -len(role[0])]
    for prefix, branch in FLAT_PREFIXES:
        if stem.startswith(prefix):
            return ParsedKey(key, stem, branch, stem[len(prefix) :], role[1], True)
    for prefix, branch in DOTTED_PREFIXES:
        if stem.startswith(prefix):
            return ParsedKey(key, stem, branch, stem[len(prefix) :], role[1], False)
    return ParsedKey(key, stem, None, stem, role[1], False)


@dataclass(frozen=True)
class Target:
    """The model Linears (diffusers split names) one LoRA module adapts: one, or to_q/to_k/to_v for a fused qkv
    (whose B is split into three equal row blocks, in that order)."""

    modules: tuple[str, ...]

    @property
    def fused(self) -> bool:
        return len(self.modules) > 1


def target_aliases(linears: Iterable[str]) -> dict[str, Target]:
    """{name a LoRA may use: Target} for a model whose Linear layers have these diffusers split names.

    Every split name maps to itself; `attention.qkv` to the three projections (when all three exist) and
    `attention.o` to `to_out.0`; each of these also in its flattened (`_`) form.
    """
    names = list(linears)
    present = set(names)
    out: dict[str, Target] = {}
    for name in names:
        out[name] = Target((name,))
        fused = fused_module_name(name)
        if fused == name:
            continue
        m = _QKV_PART.match(name)
        if m:
            parts = tuple(f"{m.group(1)}to_{p}" for p in "qkv")
            if all(p in present for p in parts):
                out[fused] = Target(parts)
        else:
            out[fused] = Target((name,))
    for alias, target in list(out.items()):
        out.setdefault(alias.replace(".", "_"), target)
    return out


def resolve_module(parsed: ParsedKey, aliases: Mapping[str, Target]) -> Target | None:
    """The Target of a parsed key's module, None when the model has no such Linear."""
    return aliases.get(parsed.module)
