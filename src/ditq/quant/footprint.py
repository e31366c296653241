"""What each component keeps on the device: resident bytes per component from the size rules `ditq inspect` uses
(`ditq.quant.sizes`), and for each transformer one block's bytes and the bytes outside its blocks (what group
offloading keeps), and the largest single module (what sequential offloading holds at once)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

TRANSFORMERS = ("transformer", "unconditional_transformer")


@dataclass(frozen=True)
class Weights:
    """Resident bytes of each component, and for each transformer one block's bytes and its non-block bytes."""

    components: dict[str, int]
    block: dict[str, int]
    outside_blocks: dict[str, int]
    largest_leaf: dict[str, int]


def _leaf_bytes(model: nn.Module) -> int:
    """The largest single module's bytes in bf16 (what sequential offloading holds at once; a quantized Linear is
    smaller, so the bound is safe): for the text encoder, its token embedding."""
    best = 0
    for m in model.modules():
        if next(m.children(), None) is None:
            own = sum(math.prod(t.shape) for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
            best = max(best, 2 * own)
    return best


def weights(components: dict[str, nn.Module], recipes: dict[str, object]) -> Weights:
    """From the size rules of `ditq inspect`: the text encoder in FP8 without its vision tower, the VAE in bf16."""
    from ditq.quant.sizes import transformer_bytes

    te = components["text_encoder"]
    if hasattr(te, "visual"):
        del te.visual  # never loaded for generation
    sizes = {
        "text_encoder": transformer_bytes(te, "fp8"),
        "vae": transformer_bytes(components["vae"], "bf16"),
    }
    block, outside, leaf = {}, {}, {}
    for name in TRANSFORMERS:
        model, recipe = components[name], recipes[name]
        sizes[name] = transformer_bytes(model, recipe)
        per_block = _block_bytes(model, recipe)
        block[name] = max(per_block)
        outside[name] = sizes[name] - sum(per_block)
        leaf[name] = _leaf_bytes(model)
    leaf["text_encoder"] = _leaf_bytes(te)
    leaf["vae"] = _leaf_bytes(components["vae"])
    return Weights(sizes, block, outside, leaf)


def _block_bytes(model: nn.Module, recipe) -> list[int]:
    """Bytes of each transformer block under `recipe`: the block's tensors as a model of their own."""
    from ditq.quant.sizes import transformer_bytes

    return [transformer_bytes(_Prefixed(b, i), recipe) for i, b in enumerate(model.layers)]


class _Prefixed(nn.Module):
    """A block seen under its name in the transformer (`layers.<i>.`), so name-based rules apply as they do there."""

    def __init__(self, block: nn.Module, index: int) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(index): block})


__all__ = ["TRANSFORMERS", "Weights", "weights"]
