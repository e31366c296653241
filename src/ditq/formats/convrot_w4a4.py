"""ConvRot W4A4 weights: a block-Hadamard rotation, then 4-bit weights and 4-bit per-token activations, in
ComfyUI's `comfy_quant` layout of format `convrot_w4a4` (comfy-kitchen `TensorCoreConvRotW4A4Layout`).

Per quantized Linear `m` (official fused names; N outputs, K inputs)::

    m.weight        I8   [N, K/2]   4-bit codes of W R, two per byte (see `ditq.formats.int4_ops`)
    m.weight_scale  F32  [N]        one scale per output row: row absmax of W R / 7
    m.comfy_quant   U8   [L]        JSON {"format": "convrot_w4a4", "convrot_groupsize": G}
    m.bias          BF16 [N]        when the layer has one

R is the block-diagonal regular Hadamard of `ditq.formats.convrot` (blocks of G = 256 inputs, 64 where K is not a
multiple of 256). The rotation spreads an outlier channel over its whole block, so one scale per token and per
row is enough at 4 bits; at run time each token is rotated (x R) and quantized per token, and
``y = Δx Δw (Q(x R) · Q(W R)^T) + b``. ComfyUI reads `convrot_groupsize` from the marker (flat or under "params",
default 256) and an optional `linear_dtype` ("int8": 8-bit activations, which ditq does not compute).
"""

from __future__ import annotations

import torch

from ditq.errors import CheckpointError
from ditq.formats.base import LinearFormat, QuantizedLinear, register_format
from ditq.formats.convrot import check_group, rotate
from ditq.formats.int4_ops import GROUP, convrot_w4a4_linear, pack_int4, quantize_rows_int4, unpack_int4
from ditq.formats.int8 import marker_bytes, marker_tensor, parse_marker

COMFY_FORMAT = "convrot_w4a4"
SUFFIXES = ("weight_scale", "comfy_quant")
DEFAULT_GROUP = 256


def marker(group_size: int) -> dict:
    return {"format": COMFY_FORMAT, "convrot_groupsize": int(group_size)}


def group_for(in_features: int, largest: int = DEFAULT_GROUP) -> int | None:
    """The rotation block of a layer: the largest power of 4 up to `largest` dividing K, or None when K is not a
    multiple of 64 (comfy-kitchen's int4 kernels need whole groups of 64)."""
    if in_features % GROUP:
        return None
    g = largest
    while g > GROUP and in_features % g:
        g //= 4
    return g if in_features % g == 0 else None


def tensor_specs(
    out_features: int, in_features: int, group_size: int
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{suffix: (dtype, shape)} of the tensors one ConvRot W4A4 Linear weight of this shape is stored as."""
    return {
        "weight": (torch.int8, (out_features, in_features // 2)),
        "weight_scale": (torch.float32, (out_features,)),
        "comfy_quant": (torch.uint8, (len(marker_bytes(marker(group_size))),)),
    }


def weight_bytes(out_features: int, in_features: int, group_size: int) -> int:
    """Stored bytes of one ConvRot W4A4 Linear weight: packed codes (K/2 per row) + fp32 row scale + the marker."""
    return out_features * in_features // 2 + 4 * out_features + len(marker_bytes(marker(group_size)))


def quantize_convrot_w4a4(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """float weight [N, K] -> this format's tensors (suffix -> tensor), as comfy-kitchen's
    `quantize_convrot_w4a4_weight` computes them (in float32)."""
    w = weight.float()
    check_group(group_size, w.shape[1])
    codes, scale = quantize_rows_int4(rotate(w, group_size))
    return {
        "weight": pack_int4(codes),
        "weight_scale": scale,
        "comfy_quant": marker_tensor(marker(group_size)),
    }


class ConvRotW4A4Linear(QuantizedLinear):
    """A Linear computing ConvRot W4A4 (`ditq::convrot_w4a4_linear`: comfy-kitchen on CUDA, exact integer sums
    on CPU). Storage: `weight` int8 [N, K/2] (rotated basis), `weight_scale` fp32 [N]; bias in the compute dtype."""

    def __init__(
        self,
        qweight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = DEFAULT_GROUP,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        if qweight.dtype != torch.int8 or qweight.ndim != 2:
            raise CheckpointError(
                f"ConvRot W4A4 weight must be int8 [N, K/2], got {qweight.dtype} {list(qweight.shape)}"
            )
        n, k = qweight.shape[0], 2 * qweight.shape[1]
        check_group(group_size, k)
        if k % GROUP:
            raise CheckpointError(f"ConvRot W4A4 weight has {k} inputs, not a multiple of {GROUP}")
        scale = weight_scale.float().reshape(-1)
        if scale.numel() != n:
            raise CheckpointError(
                f"ConvRot W4A4 weight_scale has {scale.numel()} values, expected one per output row ({n})"
            )
        default = bias.dtype if bias is not None and bias.is_floating_point() else torch.bfloat16
        super().__init__(k, n, compute_dtype or default)
        self.group_size = int(group_size)
        self.store("weight", qweight.contiguous())
        self.store("weight_scale", scale.contiguous())
        self.set_bias(bias)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = DEFAULT_GROUP,
        compute_dtype: torch.dtype | None = None,
    ) -> ConvRotW4A4Linear:
        t = quantize_convrot_w4a4(weight, group_size)
        return cls(t["weight"], t["weight_scale"], bias, group_size, compute_dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The weight [N, K] in the original (unrotated) basis."""
        w = unpack_int4(self.weight).float() * self.weight_scale[:, None]
        return rotate(w, self.group_size).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return convrot_w4a4_linear(x, self.weight, self.weight_scale, self.bias, self.group_size)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, convrot w4a4, "
            f"convrot_groupsize={self.group_size}"
        )


def marker_group(tensors: dict[str, torch.Tensor]) -> int:
    """The rotation block a `convrot_w4a4` marker declares (flat or under "params", default 256)."""
    conf = parse_marker(tensors["comfy_quant"])
    if conf.get("format") != COMFY_FORMAT:
        raise CheckpointError(f"comfy_quant format is {conf.get('format')!r}, expected {COMFY_FORMAT!r}")
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    linear_dtype = conf.get("linear_dtype", params.get("linear_dtype", "int4"))
    if linear_dtype != "int4":
        raise CheckpointError(
            f"comfy_quant linear_dtype is {linear_dtype!r}; ditq computes ConvRot W4A4 with int4 activations only"
        )
    size = conf.get("convrot_groupsize", params.get("convrot_groupsize", DEFAULT_GROUP))
    if not isinstance(size, int) or isinstance(size, bool):
        raise CheckpointError(f"comfy_quant convrot_groupsize is {size!r}; expected an integer power of 4")
    return size


@register_format
class ConvRotW4A4Format(LinearFormat):
    name = "int4_convrot"
    extra_suffixes = SUFFIXES
    bits_per_weight = 4.0
    layout = "comfy-kitchen's ConvRot W4A4 layout"
    # `tensor_specs` above: comfy-kitchen's TensorCoreConvRotW4A4Layout packs the codes into int8 and keeps an
    # fp32 row scale
    stored_dtypes = {"weight": (torch.int8,), "weight_scale": (torch.float32,), "comfy_quant": (torch.uint8,)}

    def matches(self, tensors: dict[str, torch.Tensor]) -> bool:
        w = tensors.get("weight")
        if w is None or w.dtype != torch.int8 or "comfy_quant" not in tensors:
            return False
        return parse_marker(tensors["comfy_quant"]).get("format") == COMFY_FORMAT

    def weight_shape(self, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
        w = tensors["weight"]
        return w.shape[0], 2 * w.shape[1]

    def build(self, tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> ConvRotW4A4Linear:
        if "weight_scale" not in tensors:
            raise CheckpointError("ConvRot W4A4 weight without weight_scale")
        group = marker_group(tensors)
        return ConvRotW4A4Linear(
            tensors["weight"], tensors["weight_scale"], tensors.get("bias"), group, compute_dtype
        )

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.build(tensors, torch.float32).dequantized_weight(torch.float32)

    def slice_rows(self, suffix: str, tensor: torch.Tensor, part: int, parts: int) -> torch.Tensor:
        if suffix == "comfy_quant":
            return tensor
        return super().slice_rows(suffix, tensor, part, parts)

    def join_rows(self, suffix: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if suffix == "comfy_quant":
            return tensors[0]
        return torch.cat(tensors, dim=0)
