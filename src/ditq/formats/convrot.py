"""ConvRot: the block Hadamard rotation of ComfyUI's `int8_convrot` files, undone at load time or applied at run time.

A ConvRot INT8 layer stores its weight in a rotated basis (comfy-kitchen `quantize_int8_convrot_weight`;
stable-diffusion.cpp `docs/int8_convrot.md`)::

    R        block-diagonal, one block H_G per contiguous group of G input features (G = convrot_groupsize, 4**n)
    H_G      = H4 ⊗ H4 ⊗ ... (n factors) / sqrt(G),   H4 = [[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]]
    W_rot    = W R                        (per row: each group of G columns times H_G)
    weight   = round(W_rot / s) in int8,  s = row absmax of W_rot / 127 (stored as weight_scale [N, 1])

H_G is symmetric and orthogonal (H_G H_G = I), so the same product undoes it: W = W_rot R. At run time the loaders
rotate activations instead, `y = (x R) W_rot^T = x W^T`, and quantize the rotated activations per token.
`ConvRotInt8Linear` (an `Int8Linear`) does exactly that, so a ConvRot file computes in ditq as it does
in ComfyUI and stable-diffusion.cpp.
"""

from __future__ import annotations

import math
from functools import cache

import torch

from ditq.errors import CheckpointError
from ditq.formats.int8 import Int8Linear

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


class ConvRotInt8Linear(Int8Linear):
    """W8A8 Linear over a ConvRot-rotated int8 weight [N, K]: each token's input is rotated (x R), then quantized.

    `weight` / `qweight_t` hold the stored rotated weight; `dequantized_weight()` returns it in the original basis.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = 256,
        kernel: str = "auto",
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(qweight, weight_scale, bias, kernel=kernel, compute_dtype=compute_dtype)
        if not is_power_of_four(group_size):
            raise CheckpointError(
                f"ConvRot group size {group_size} is not a power of 4 (4, 16, 64, 256, ...)"
            )
        if self.in_features % group_size:
            raise CheckpointError(
                f"ConvRot group size {group_size} does not divide in_features {self.in_features}"
            )
        self.group_size = group_size

    def dequantized_weight(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        return rotate(super().dequantized_weight(torch.float32), self.group_size).to(
            dtype or self.compute_dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(rotate(x.float(), self.group_size)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, convrot_groupsize={self.group_size}"
