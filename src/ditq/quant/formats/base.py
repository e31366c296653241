"""How a quantized Linear is stored and rebuilt: one `LinearFormat` per on-disk layout.

A checkpoint stores a Linear module `m` as tensors `m.weight`, `m.bias` and format-specific extras (`m.weight_scale`,
`m.weight.absmax`, ...). A format recognizes its tensors (by suffix and dtype), rebuilds the module for compute,
dequantizes it for reference, and slices its rows (used to split the official fused `qkv` projection into diffusers'
`to_q/to_k/to_v`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ditq.registry import Registry


class LinearFormat:
    """Base class; subclasses register themselves in `LINEAR_FORMATS` by `name`."""

    name: ClassVar[str]
    # Suffixes (after the module name) that only this format uses; `weight` and `bias` are shared by all.
    extra_suffixes: ClassVar[tuple[str, ...]] = ()
    # Nominal storage bits per weight element (for size predictions), excluding scales.
    bits_per_weight: ClassVar[float] = 16.0

    def matches(self, tensors: dict[str, torch.Tensor]) -> bool:
        raise NotImplementedError

    def build(self, tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> nn.Module:
        """A module computing `x @ W.T + b` from this format's tensors (keyed by suffix, `bias` optional)."""
        raise NotImplementedError

    def weight_shape(self, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
        """The logical [out_features, in_features] of the stored weight."""
        return tuple(tensors["weight"].shape)

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight [out_features, in_features] these tensors represent."""
        raise NotImplementedError

    def slice_rows(self, suffix: str, tensor: torch.Tensor, part: int, parts: int) -> torch.Tensor:
        rows = tensor.shape[0]
        step = rows // parts
        return tensor[part * step : (part + 1) * step]

    def join_rows(self, suffix: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors, dim=0)


LINEAR_FORMATS: Registry[LinearFormat] = Registry("linear format")


def register_format(cls: type[LinearFormat]) -> type[LinearFormat]:
    LINEAR_FORMATS.add(cls.name, cls())
    return cls


def detect_format(tensors: dict[str, torch.Tensor]) -> LinearFormat | None:
    """The quantized format these module tensors are stored in, or None for a plain float Linear."""
    for name in LINEAR_FORMATS:
        fmt = LINEAR_FORMATS.get(name)
        if fmt.matches(tensors):
            return fmt
    return None


def all_extra_suffixes() -> set[str]:
    return {s for name in LINEAR_FORMATS for s in LINEAR_FORMATS.get(name).extra_suffixes}
