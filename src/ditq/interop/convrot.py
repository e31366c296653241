"""ConvRot: the block Hadamard rotation of ComfyUI's `int8_convrot` files, undone at load time or applied at run time.

A ConvRot INT8 layer stores its weight in a rotated basis (comfy-kitchen `quantize_int8_convrot_weight`;
stable-diffusion.cpp `docs/int8_convrot.md`)::

    R        block-diagonal, one block H_G per contiguous group of G input features (G = convrot_groupsize, 4**n)
    H_G      = H4 ⊗ H4 ⊗ ... (n factors) / sqrt(G),   H4 = [[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]]
    W_rot    = W R                        (per row: each group of G columns times H_G)
    weight   = round(W_rot / s) in int8,  s = row absmax of W_rot / 127 (stored as weight_scale [N, 1])

H_G is symmetric and orthogonal (H_G H_G = I), so the same product undoes it: W = W_rot R. At run time the loaders
rotate activations instead, `y = (x R) W_rot^T = x W^T`, and quantize the rotated activations per token.
`ConvRotInt8Linear` does exactly that on top of ditq's `Int8Linear`, so a ConvRot file computes in ditq as it does
in ComfyUI and stable-diffusion.cpp.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import nn

from ditq.errors import CheckpointError

H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


def is_power_of_four(n: int) -> bool:
    return n >= 4 and n & (n - 1) == 0 and (n.bit_length() - 1) % 2 == 0


@cache
def _hadamard64(size: int) -> torch.Tensor:
    h4 = torch.tensor(H4, dtype=torch.float64)
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return h / math.sqrt(size)


def regular_hadamard(size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalized regular Hadamard matrix H_size [size, size] (size a power of 4): symmetric, orthogonal."""
    if not is_power_of_four(size):
        raise CheckpointError(f"ConvRot group size {size} is not a power of 4 (4, 16, 64, 256, ...)")
    return _hadamard64(size).to(dtype)


def rotate(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., K] -> x R: each contiguous group of `group_size` features times H_G (float32 math, x's dtype out).

    Because H_G is symmetric and orthogonal the same call rotates activations, rotates a weight (W R) and undoes
    the rotation of a stored weight (W_rot R = W).
    """
    k = x.shape[-1]
    if k % group_size:
        raise CheckpointError(f"ConvRot group size {group_size} does not divide the {k} input features")
    h = regular_hadamard(group_size).to(x.device)
    groups = x.float().reshape(-1, k // group_size, group_size)
    return (groups @ h).reshape(x.shape).to(x.dtype)


def quantize_convrot(weight: torch.Tensor, group_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight [N, K] -> (int8 rotated weight [N, K], fp32 scale [N, 1]) as comfy-kitchen's eager path does."""
    w_rot = rotate(weight.float(), group_size)
    scale = (w_rot.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-30)
    q = torch.round(w_rot / scale).clamp(-128, 127).to(torch.int8)
    return q, scale


def dequantize_convrot(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 rotated weight [N, K] and its row scale -> the float32 weight in the original basis."""
    s = scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(1, 1)
    return rotate(q.float() * s, group_size)


class ConvRotInt8Linear(nn.Module):
    """W8A8 Linear over a ConvRot-rotated int8 weight: rotates each token's input, then runs `Int8Linear`."""

    def __init__(self, inner: nn.Module, group_size: int) -> None:
        super().__init__()
        if not is_power_of_four(group_size):
            raise CheckpointError(f"ConvRot group size {group_size} is not a power of 4")
        if inner.in_features % group_size:
            raise CheckpointError(
                f"ConvRot group size {group_size} does not divide in_features {inner.in_features}"
            )
        self.inner = inner
        self.group_size = group_size
        self.in_features, self.out_features = inner.in_features, inner.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The stored (rotated) int8 weight [N, K]."""
        return self.inner.weight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] in the original basis: the stored one rotated back."""
        return rotate(self.inner.dequantized_weight(torch.float32), self.group_size).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(rotate(x.float(), self.group_size)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"convrot_groupsize={self.group_size}"
