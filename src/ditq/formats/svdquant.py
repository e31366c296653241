"""SVDQuant W4A4 weights (4-bit weights and activations with a 16-bit low-rank branch), in comfy-kitchen's
`TensorCoreSVDQuantW4A4Layout` tensors with a `comfy_quant` marker of format `svdquant_w4a4`.

Per quantized Linear `m` (official fused names; N outputs, K inputs, rank R)::

    m.weight                I8   [N, K/2]    the 4-bit residual codes, two per byte (see `ditq.formats.int4_ops`)
    m.weight_scale          BF16 [K/64, N]   one scale per output row and group of 64 inputs: group absmax / 7
    m.weight_proj_down      BF16 [K, R]      the low-rank down projection (applied to the unsmoothed input)
    m.weight_proj_up        BF16 [N, R]      the low-rank up projection
    m.weight_smooth_factor  BF16 [K]         s: the input is divided by s before its int4 quantization
    m.comfy_quant           U8   [L]         JSON {"format": "svdquant_w4a4", "group_size": 64, "rank": R,
                                             "act_unsigned": false}
    m.bias                  BF16 [N]         when the layer has one

The layer computes ``y = Q64(x / s) · Q(Ŵ - L)^T + (x · proj_down) · proj_up^T + b`` with Ŵ = W·diag(s) the
SmoothQuant-migrated weight and L = proj_up · (proj_down·diag(s))^T its best rank-R approximation (truncated SVD):
the low-rank branch keeps the large singular directions, where the outliers migrated by smoothing live, in 16 bits,
and only the residual goes to 4 bits. The residual is computed against the bf16-rounded factors, so the stored
branch and the stored codes add up to W up to the 4-bit rounding alone.

A fused qkv is one weight with one SVD; its q/k/v parts share the input side (`weight_proj_down`,
`weight_smooth_factor`) and take their rows of everything else (`weight_scale` by column).
"""

from __future__ import annotations

import math

import torch

from ditq.errors import CheckpointError
from ditq.formats.base import LinearFormat, QuantizedLinear, register_format
from ditq.formats.int4_ops import GROUP, pack_int4, quantize_groups_int4, svdq_w4a4_linear, svdq_weight
from ditq.formats.int8 import marker_bytes, marker_tensor, parse_marker

COMFY_FORMAT = "svdquant_w4a4"
SUFFIXES = ("weight_scale", "weight_proj_down", "weight_proj_up", "weight_smooth_factor", "comfy_quant")
SHARED = (
    "weight_proj_down",
    "weight_smooth_factor",
)  # input-side tensors: one copy for every part of a fused qkv
STORE_DTYPE = torch.bfloat16
_EXACT_SVD_MAX = 1024  # min(N, K) up to which the exact SVD is cheap; above it, a seeded randomized SVD


def marker(rank: int) -> dict:
    return {"format": COMFY_FORMAT, "group_size": GROUP, "rank": int(rank), "act_unsigned": False}


def effective_rank(rank: int, out_features: int, in_features: int) -> int:
    return max(0, min(int(rank), out_features, in_features))


def quantizable(in_features: int) -> bool:
    """Whether a Linear with this many inputs can be stored: whole groups of 64 per row."""
    return in_features % GROUP == 0


def tensor_specs(
    out_features: int, in_features: int, rank: int
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{suffix: (dtype, shape)} of the tensors one SVDQuant Linear weight of this shape is stored as."""
    n, k = out_features, in_features
    r = effective_rank(rank, n, k)
    return {
        "weight": (torch.int8, (n, k // 2)),
        "weight_scale": (STORE_DTYPE, (k // GROUP, n)),
        "weight_proj_down": (STORE_DTYPE, (k, r)),
        "weight_proj_up": (STORE_DTYPE, (n, r)),
        "weight_smooth_factor": (STORE_DTYPE, (k,)),
        "comfy_quant": (torch.uint8, (len(marker_bytes(marker(r))),)),
    }


def weight_bytes(out_features: int, in_features: int, rank: int) -> int:
    """Stored bytes of one SVDQuant Linear weight: codes (K/2 per row), bf16 group scales, the bf16 low-rank
    branch, the bf16 s and the marker."""
    return sum(_nbytes(*spec) for spec in tensor_specs(out_features, in_features, rank).values())


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def low_rank(weight: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` approximation of a float32 weight [N, K] as (U·Σ [N, R], V [K, R]), in float64.

    Exact when min(N, K) <= 1024 (a QR of the tall side, then the SVD of the small square factor: LAPACK's SVD of
    a tall matrix runs 30x slower here); above, a randomized SVD (Halko et al.: 32 extra directions, 4 power
    iterations) from a seeded Gaussian, so a conversion is reproducible."""
    n, k = weight.shape
    r = effective_rank(rank, n, k)
    if r == 0:
        return weight.new_zeros(n, 0), weight.new_zeros(k, 0)
    w = weight.double()
    if n < k:
        us, v = low_rank(weight.t(), r, seed)  # W^T = U' S V'^T, so W = V' S U'^T
        sv = torch.linalg.norm(us, dim=0).clamp(min=1e-30)
        return v * sv[None, :], us / sv[None, :]
    if k <= _EXACT_SVD_MAX:
        q, small = torch.linalg.qr(w)
    else:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(w @ torch.randn(k, min(r + 32, k), generator=g, dtype=torch.float64))
        for _ in range(4):
            q, _ = torch.linalg.qr(w.t() @ q)
            q, _ = torch.linalg.qr(w @ q)
        small = q.t() @ w
    ub, sv, vh = torch.linalg.svd(small, full_matrices=False)
    u = q @ ub
    return (u[:, :r] * sv[:r]).float(), vh[:r].t().float()


def quantize_svdq(
    weight: torch.Tensor, smooth: torch.Tensor | None = None, rank: int = 32
) -> dict[str, torch.Tensor]:
    """float weight [N, K] (and smoothing vector s [K], None for none) -> this format's tensors (suffix -> tensor)."""
    w = weight.float()
    n, k = w.shape
    if not quantizable(k):
        raise CheckpointError(f"SVDQuant needs in_features divisible by {GROUP}, got {k}")
    s = torch.ones(k) if smooth is None else smooth.float().reshape(-1)
    s = s.to(STORE_DTYPE).float().to(w.device)  # the stored s is what the kernel divides by
    up, v = low_rank(w * s[None, :], rank)
    up_b = up.to(STORE_DTYPE)
    down_b = (v / s[:, None]).to(STORE_DTYPE)
    residual = (w - up_b.float() @ down_b.float().t()) * s[None, :]
    _, scale = quantize_groups_int4(residual)
    scale_b = scale.to(STORE_DTYPE)
    g = residual.reshape(n, k // GROUP, GROUP) / scale_b.float()[..., None]
    codes = torch.round(g).clamp_(-7, 7).to(torch.int8).reshape(n, k)
    return {
        "weight": pack_int4(codes),
        "weight_scale": scale_b.t().contiguous(),
        "weight_proj_down": down_b.contiguous(),
        "weight_proj_up": up_b.contiguous(),
        "weight_smooth_factor": s.to(STORE_DTYPE),
        "comfy_quant": marker_tensor(marker(up_b.shape[1])),
    }


class SVDQuantLinear(QuantizedLinear):
    """A Linear computing SVDQuant W4A4 (`ditq::svdq_w4a4_linear`: comfy-kitchen on CUDA, dequantized on CPU).

    Storage: `weight` int8 [N, K/2], `weight_scale` [K/64, N], `weight_proj_down` [K, R], `weight_proj_up` [N, R],
    `weight_smooth_factor` [K] (bf16 as stored); the bias is a parameter in the compute dtype."""

    def __init__(
        self,
        qweight: torch.Tensor,
        weight_scale: torch.Tensor,
        proj_down: torch.Tensor,
        proj_up: torch.Tensor,
        smooth: torch.Tensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        n, k = _check_shapes(qweight, weight_scale, proj_down, proj_up, smooth)
        default = bias.dtype if bias is not None and bias.is_floating_point() else torch.bfloat16
        super().__init__(k, n, compute_dtype or default)
        self.rank = int(proj_down.shape[1])
        self.store("weight", qweight.contiguous())
        self.store("weight_scale", weight_scale.contiguous())
        self.store("weight_proj_down", proj_down.contiguous())
        self.store("weight_proj_up", proj_up.contiguous())
        self.store("weight_smooth_factor", smooth.reshape(-1).contiguous())
        self.set_bias(bias)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        smooth: torch.Tensor | None = None,
        rank: int = 32,
        compute_dtype: torch.dtype | None = None,
    ) -> SVDQuantLinear:
        t = quantize_svdq(weight, smooth, rank)
        return cls(
            t["weight"],
            t["weight_scale"],
            t["weight_proj_down"],
            t["weight_proj_up"],
            t["weight_smooth_factor"],
            bias,
            compute_dtype,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The weight [N, K] this layer applies to its input, activation rounding aside."""
        w = svdq_weight(self.weight, self.weight_scale) / self.weight_smooth_factor.float()[None, :]
        w = w + self.weight_proj_up.float() @ self.weight_proj_down.float().t()
        return w.to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return svdq_w4a4_linear(
            x,
            self.weight,
            self.weight_scale,
            self.weight_smooth_factor,
            self.weight_proj_down,
            self.weight_proj_up,
            self.bias,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, svdquant w4a4, rank={self.rank}"


def _check_shapes(qweight, weight_scale, proj_down, proj_up, smooth) -> tuple[int, int]:
    if qweight.dtype != torch.int8 or qweight.ndim != 2:
        raise CheckpointError(
            f"SVDQuant weight must be int8 [N, K/2], got {qweight.dtype} {list(qweight.shape)}"
        )
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if k % GROUP:
        raise CheckpointError(f"SVDQuant weight has {k} inputs, not a multiple of the group size {GROUP}")
    want = {
        "weight_scale": (k // GROUP, n),
        "weight_proj_down": (k, proj_down.shape[-1] if proj_down.ndim == 2 else -1),
        "weight_proj_up": (n, proj_down.shape[-1] if proj_down.ndim == 2 else -1),
        "weight_smooth_factor": (k,),
    }
    for name, t in zip(want, (weight_scale, proj_down, proj_up, smooth), strict=True):
        if tuple(t.shape) != want[name] or not t.is_floating_point():
            raise CheckpointError(
                f"SVDQuant {name} is {t.dtype} {list(t.shape)}, expected a float tensor {list(want[name])} "
                f"for a weight of {n} x {k}"
            )
    return n, k


def _check_marker(tensors: dict[str, torch.Tensor]) -> None:
    conf = parse_marker(tensors["comfy_quant"])
    if conf.get("format") != COMFY_FORMAT:
        raise CheckpointError(f"comfy_quant format is {conf.get('format')!r}, expected {COMFY_FORMAT!r}")
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    group = conf.get("group_size", params.get("group_size", GROUP))
    if group != GROUP:
        raise CheckpointError(f"comfy_quant group_size is {group!r}; SVDQuant W4A4 kernels use {GROUP}")
    if conf.get("act_unsigned", params.get("act_unsigned", False)):
        raise CheckpointError(
            "comfy_quant act_unsigned is true (unsigned int4 activations after a shifted GELU); ditq computes "
            "signed int4 activations only"
        )


@register_format
class SVDQuantFormat(LinearFormat):
    name = "int4_svdquant"
    extra_suffixes = SUFFIXES
    bits_per_weight = 4.0
    layout = "comfy-kitchen's SVDQuant W4A4 layout"
    # `tensor_specs` above: the scales, the low-rank branch and the smoothing factor in the model's 16-bit dtype,
    # which for Ideogram 4 is bfloat16 (nunchaku's float16 variant serves float16 models only)
    stored_dtypes = {
        "weight": (torch.int8,),
        **{s: (STORE_DTYPE,) for s in SUFFIXES if s != "comfy_quant"},
        "comfy_quant": (torch.uint8,),
    }

    def matches(self, tensors: dict[str, torch.Tensor]) -> bool:
        w = tensors.get("weight")
        if w is None or w.dtype != torch.int8:
            return False
        if "comfy_quant" in tensors:
            return parse_marker(tensors["comfy_quant"]).get("format") == COMFY_FORMAT
        return "weight_proj_down" in tensors and "weight_smooth_factor" in tensors

    def weight_shape(self, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
        w = tensors["weight"]
        return w.shape[0], 2 * w.shape[1]

    def _parts(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        missing = [s for s in SUFFIXES[:-1] if s not in tensors]
        if missing:
            raise CheckpointError(f"SVDQuant weight without {', '.join(missing)}")
        if "comfy_quant" in tensors:
            _check_marker(tensors)
        return tuple(tensors[s] for s in ("weight", *SUFFIXES[:-1]))

    def build(self, tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> SVDQuantLinear:
        q, scale, down, up, smooth = self._parts(tensors)
        return SVDQuantLinear(q, scale, down, up, smooth, tensors.get("bias"), compute_dtype)

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.build(tensors, torch.float32).dequantized_weight(torch.float32)

    def slice_rows(self, suffix: str, tensor: torch.Tensor, part: int, parts: int) -> torch.Tensor:
        if suffix in SHARED or suffix == "comfy_quant":
            return tensor
        if suffix == "weight_scale":
            step = tensor.shape[1] // parts
            return tensor[:, part * step : (part + 1) * step].contiguous()
        return super().slice_rows(suffix, tensor, part, parts)

    def join_rows(self, suffix: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if suffix in SHARED or suffix == "comfy_quant":
            if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise CheckpointError(
                    f"cannot join SVDQuant parts with different {suffix}: the parts of a fused projection share "
                    "their input side"
                )
            return tensors[0]
        if suffix == "weight_scale":
            return torch.cat(tensors, dim=1)
        return torch.cat(tensors, dim=0)
