"""Small helpers over a model's Linear layers that every in-memory quantizer shares."""

from __future__ import annotations

import torch
from torch import nn


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or a quantized Linear replacement (has in/out_features and `dequantized_weight`)."""
    if isinstance(module, nn.Linear):
        return True
    return all(hasattr(module, a) for a in ("in_features", "out_features", "dequantized_weight"))


def float_weight(module: nn.Module) -> torch.Tensor:
    """The float32 weight [N, K] of a Linear-like module."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    return module.dequantized_weight(torch.float32)


def float_bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().float()


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (its compute dtype), float32 if it has none."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def float_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device) -> nn.Linear:
    """A frozen nn.Linear holding `weight` [N, K] and `bias` [N] in `dtype` on `device`."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
    return lin


def linear_modules(model: nn.Module, filter_fn=None) -> tuple[dict[str, nn.Module], set[str]]:
    """({name: Linear-like module}, names `filter_fn(module, name)` refuses)."""
    mods = {n: m for n, m in model.named_modules() if is_linear_like(m)}
    skipped = {n for n, m in mods.items() if filter_fn is not None and not filter_fn(m, n)}
    return mods, skipped
