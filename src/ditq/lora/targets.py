"""Resolving a LoRA file's modules onto a model's Linear layers, checked against their shapes.

The model side is `{diffusers split name: (out_features, in_features)}`, taken from a loaded model
(`linear_shapes(model)`: every `nn.Linear` and every module with `in_features`, `out_features` and
`dequantized_weight`, i.e. any `ditq.formats.QuantizedLinear`) or from a transformer's config on the meta device
(`config_linear_shapes`). A fused `attention.qkv` LoRA becomes three `LayerFactor`s sharing one A, with B's row
blocks [0:H), [H:2H), [2H:3H) for to_q, to_k, to_v: exactly the factors of the equivalent split LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ditq.errors import CheckpointError
from ditq.lora.files import LoraFile
from ditq.lora.names import target_aliases

Shapes = Mapping[str, tuple[int, int]]


@dataclass(frozen=True, eq=False)
class LayerFactor:
    """One LoRA's factors on one model Linear: update = scale · up @ down, up [out, rank], down [rank, in]."""

    key: str  # the file's module name, for messages
    down: torch.Tensor
    up: torch.Tensor
    scale: float


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a quantized Linear following the `QuantizedLinear` contract."""
    if isinstance(module, nn.Linear):
        return True
    return all(hasattr(module, a) for a in ("in_features", "out_features", "dequantized_weight"))


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module name: (out_features, in_features)} of every Linear-like module of `model`."""
    return {
        n: (int(m.out_features), int(m.in_features)) for n, m in model.named_modules() if n and is_linear(m)
    }


def config_linear_shapes(component: str | Path) -> dict[str, tuple[int, int]]:
    """The Linear shapes of the `Ideogram4Transformer2DModel` a component folder's config.json describes."""
    from accelerate import init_empty_weights
    from diffusers import Ideogram4Transformer2DModel

    folder = Path(component)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json")
    with init_empty_weights():
        model = Ideogram4Transformer2DModel.from_config(Ideogram4Transformer2DModel.load_config(folder))
    return linear_shapes(model)


def resolve(lora: LoraFile, branch: str, shapes: Shapes) -> tuple[dict[str, LayerFactor], list[str]]:
    """({model Linear: its factor}, file modules the model lacks) for one transformer of `lora`.

    Raises CheckpointError, naming the key, when a factor's shape does not fit its layer or when two of the
    file's modules land on one layer (e.g. `attention.qkv` and `attention.to_q`, or a dotted and a flattened
    spelling of one name).
    """
    aliases = target_aliases(shapes)
    out: dict[str, LayerFactor] = {}
    missing: list[str] = []
    for module, f in lora.branches.get(branch, {}).items():
        target = aliases.get(module)
        if target is None:
            missing.append(f.key)
            continue
        out_rows = sum(shapes[m][0] for m in target.modules)
        in_features = shapes[target.modules[0]][1]
        if f.down.shape[1] != in_features or f.up.shape[0] != out_rows:
            layer = "+".join(target.modules)
            raise CheckpointError(
                f"{lora.source}: {f.key} does not fit {branch} layer {layer} ({out_rows} outputs, {in_features} "
                f"inputs): its A is {list(f.down.shape)} and B {list(f.up.shape)}; expected A [r, {in_features}] "
                f"and B [{out_rows}, r]"
            )
        row = 0
        for m in target.modules:
            n = shapes[m][0]
            if m in out:
                raise CheckpointError(
                    f"{lora.source}: {out[m].key} and {f.key} both adapt {branch} layer {m}; expected one"
                )
            up = f.up if not target.fused else f.up[row : row + n]
            out[m] = LayerFactor(f.key, f.down, up, f.scale)
            row += n
    return out, missing
