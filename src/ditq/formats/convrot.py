"""ConvRot: the block Hadamard rotation of ComfyUI's `int8_convrot` files, undone at load time or applied at run time.

A ConvRot INT8 layer stores its weight in a rotated basis (comfy-kitchen `quantize_int8_convrot_weight`;
stable-diffusion.cpp `docs/int8_convrot.md`)::

    R        block-diagonal, one block H_G per contiguous group of G input features (G = convrot_groupsize, 4**n)
    H_G      = H4 ⊗ H4 ⊗ ... (n factors) / sqrt(G),   H4 = [[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]]
    W_rot    = W R                        (per row: each group of G columns times H_G)
    weight   = round(W_rot / s) in int8,  s = row absmax of W_rot / 127 (stored as weight_scale [N, 1])

H_G is symmetric and orthogonal (H_G H_G = I), so the same product undoes it: W = W_rot R. At run time the loaders
rotate activations instead, `y = (x R) W_rot^T = x W^T`, and quantize the rotated activations per token.
`Int8Linear(convrot_group=G)` does exactly that (comfy-kitchen's fused rotation + quantization on CUDA), so a
ConvRot file computes in ditq as it does in ComfyUI and stable-diffusion.cpp; `ConvRotInt8Linear` is that layer.
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


def check_group(group_size: int, in_features: int) -> None:
    """A ConvRot group size must be a power of 4 dividing the layer's input features."""
    if not is_power_of_four(group_size):
        raise CheckpointError(f"ConvRot group size {group_size} is not a power of 4 (4, 16, 64, 256, ...)")
    if in_features % group_size:
        raise CheckpointError(f"ConvRot group size {group_size} does not divide in_features {in_features}")


class ConvRotInt8Linear(Int8Linear):
    """An `Int8Linear` over a ConvRot-rotated int8 weight [N, K] (`convrot_group` = `group_size`): each token's
    input is rotated (x R), then quantized; `dequantized_weight()` returns the weight in the original basis."""

    def __init__(
        self,
        qweight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = 256,
        kernel: str = "auto",
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            qweight, weight_scale, bias, kernel=kernel, compute_dtype=compute_dtype, convrot_group=group_size
        )

    @property
    def group_size(self) -> int:
        return self.convrot_group
