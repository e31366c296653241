"""FP8 E4M3 weights with one fp32 scale per output row: the official Ideogram 4 reference layout.

On disk: `m.weight` float8_e4m3fn [N, K], `m.weight_scale` float32 [N] (some repacks: [N, 1] or `scale_weight`),
dequantized as `weight.float() * weight_scale[:, None]`. In memory the weight stays at 1 byte per parameter; each
forward dequantizes it to the compute dtype (what a GPU without FP8 tensor cores must do). With
`compute="scaled_mm"`, activations are quantized per token to E4M3 and `torch._scaled_mm` multiplies in FP8 with
row-wise scales, as FP8-capable GPUs do.
"""

from __future__ import annotations

import logging
from functools import cache

import torch
import torch.nn.functional as F

from ditq.errors import CheckpointError, ConfigError
from ditq.formats.base import LinearFormat, QuantizedLinear, register_format

log = logging.getLogger(__name__)
FP8_MAX = 448.0
SCALE_ALIASES = ("weight_scale", "scale_weight")
COMPUTE = ("dequant", "scaled_mm")


def quantize_fp8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight [N, K] -> (E4M3 [N, K], fp32 scale [N]) with scale = row absmax / 448."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8_rowwise(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return weight.float() * scale.float().reshape(-1)[:, None]


def weight_bytes(out_features: int, in_features: int) -> int:
    """Stored bytes of one FP8 Linear weight: E4M3 [N, K] + fp32 scale [N]."""
    return out_features * in_features + 4 * out_features


class Fp8Linear(QuantizedLinear):
    """Linear layer with a resident E4M3 weight [N, K] and fp32 per-row scales [N]."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype = torch.bfloat16,
        compute: str = "dequant",
    ) -> None:
        if weight.dtype != torch.float8_e4m3fn or weight.ndim != 2:
            raise CheckpointError(
                f"FP8 weight must be float8_e4m3fn [N, K], got {weight.dtype} {list(weight.shape)}"
            )
        scale = weight_scale.float().reshape(-1)
        if scale.numel() != weight.shape[0]:
            raise CheckpointError(
                f"weight_scale has {scale.numel()} values, expected one per output row ({weight.shape[0]})"
            )
        if compute not in COMPUTE:
            raise ConfigError(f"FP8 compute must be one of {COMPUTE}, got {compute!r}")
        super().__init__(weight.shape[1], weight.shape[0], compute_dtype)
        self.store("weight", weight)
        self.store("weight_scale", scale)
        self.set_bias(bias)
        self.compute = compute

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`weight.float() * weight_scale[:, None]`, then cast: the arithmetic of diffusers' own FP8 row-scale
        layer (`BFLFP8RLinear`), so the reference computes what the official pipeline does (a product in bf16
        would round every row's scale to 8 bits)."""
        w, scale = self.stored("weight"), self.stored("weight_scale")
        return dequantize_fp8_rowwise(w, scale).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute == "scaled_mm":
            return self._forward_scaled_mm(x)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias_as(x.dtype))

    def _forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        check_scaled_mm_device(x.device)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
        xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(
            xq,
            self.stored("weight").t(),
            scale_a=x_scale,
            scale_b=self.stored("weight_scale")[None, :].contiguous(),
            out_dtype=x.dtype if x.dtype != torch.float32 else torch.bfloat16,
        ).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3 rowwise, {self.compute}"


def check_scaled_mm_device(device: torch.device) -> None:
    """`torch._scaled_mm` needs FP8 tensor cores on CUDA (compute capability 8.9+: Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    if device.type == "cuda":
        _check_cuda_fp8(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _check_cuda_fp8(index: int) -> None:
    device = torch.device("cuda", index)
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"--fp8-compute scaled_mm needs FP8 tensor cores (compute capability 8.9 or newer); {name} is "
            f"{major}.{minor}: use --fp8-compute dequant (the default)"
        )


@register_format
class Fp8RowwiseFormat(LinearFormat):
    name = "fp8"
    extra_suffixes = SCALE_ALIASES
    bits_per_weight = 8.0
    layout = "the official FP8 layout"
    # E4M3 weights and fp32 row scales: the official checkpoint (FACTS: `weight_scale` fp32 [N]), diffusers' own
    # row-scale FP8 (`quantizers/bfl`: `weight_scale` = absmax / 448 in float32), ditq's FP8 writer, and ComfyUI
    # imports (per-tensor scales rewritten to fp32 [N]). No producer stores a 16-bit scale.
    stored_dtypes = {
        "weight": (torch.float8_e4m3fn,),
        "weight_scale": (torch.float32,),
        "scale_weight": (torch.float32,),
    }

    def matches(self, tensors: dict[str, torch.Tensor]) -> bool:
        w = tensors.get("weight")
        return w is not None and w.dtype == torch.float8_e4m3fn and any(s in tensors for s in SCALE_ALIASES)

    @staticmethod
    def _scale(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        for s in SCALE_ALIASES:
            if s in tensors:
                return tensors[s]
        raise CheckpointError("FP8 weight without weight_scale")

    def build(self, tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype, compute: str = "dequant"):
        return Fp8Linear(tensors["weight"], self._scale(tensors), tensors.get("bias"), compute_dtype, compute)

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequantize_fp8_rowwise(tensors["weight"], self._scale(tensors))
