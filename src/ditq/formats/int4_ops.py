"""Signed INT4 arithmetic of the W4A4 formats (SVDQuant and ConvRot): nibble packing, the quantizers, and the two
linear ops, each a `torch.library` custom op with a CPU implementation, a CUDA one calling comfy-kitchen and a fake
one (so models run under `FakeTensorMode` and compile with `torch.compile(fullgraph=True)`).

Packing (comfy-kitchen's natural row-major layout, the one ComfyUI's files carry)::

    codes   int8 [..., K]     signed 4-bit values, emitted in [-7, 7] (scale = absmax / 7; -8 is never emitted)
    packed  int8 [..., K/2]   byte j = (code[2j] & 0xF) | (code[2j+1] << 4): low nibble = even column

Quantizers (float32 arithmetic, as comfy-kitchen's CUDA kernels; its eager reference divides in the input dtype):

    per group of G columns:  scale = max(absmax, 1e-10) / 7,  code = clamp(round(x / scale), -7, 7)

SVDQuant uses groups of 64 for both weights (one scale per output row and group: `wscales` [K/64, N]) and activations
(per token and group); ConvRot uses one scale per weight row and one per token (`quantize_rows_int4`), after the
block-Hadamard rotation of `ditq.formats.convrot`.

On the CPU both linears dequantize and multiply in float32: ConvRot's integer dot products are exact there (|Σ| ≤
49·K < 2**24 for K < 342,000), SVDQuant's per-group scales make each group's sum a float anyway. On CUDA they are
comfy-kitchen's fused kernels (int4 tensor-core MMA on SM 8.0+ for SVDQuant, 7.5+ for ConvRot).
"""

from __future__ import annotations

import torch

INT4_MAX = 7
GROUP = 64  # the SVDQuant group (comfy-kitchen's int4 MMA kernels hard-code it)
_ABSMAX_FLOOR = 1e-10


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [..., K] (values in [-8, 7], K even) -> packed int8 [..., K/2], low nibble = even column."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {codes.shape[-1]}")
    u = codes.to(torch.int8).contiguous().view(torch.uint8)
    lo = u[..., 0::2] & 0xF
    hi = (u[..., 1::2] & 0xF) << 4
    return (lo | hi).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed int8 [..., K/2] -> signed int8 codes [..., K] in [-8, 7] (the inverse of `pack_int4`)."""
    u = packed.contiguous().view(torch.uint8)
    lo = ((u & 0xF).view(torch.int8) ^ 8) - 8
    hi = ((u >> 4).view(torch.int8) ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_groups_int4(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes int8 [M, K], float32 scales [M, K/group]): one symmetric scale per row and group."""
    m, k = x.shape
    if k % group:
        raise ValueError(f"{k} columns are not a multiple of the int4 group size {group}")
    g = x.float().reshape(m, k // group, group)
    scale = g.abs().amax(dim=-1).clamp(min=_ABSMAX_FLOOR) / INT4_MAX
    codes = torch.round(g / scale[..., None]).clamp_(-INT4_MAX, INT4_MAX)
    return codes.to(torch.int8).reshape(m, k), scale


def quantize_rows_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes int8 [M, K], float32 scale [M]): one symmetric scale per row."""
    codes, scale = quantize_groups_int4(x, x.shape[1])
    return codes, scale.reshape(-1)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes [M, K] with scales [M, K/G] -> float32 [M, K]."""
    m, k = codes.shape
    groups = scale.shape[1]
    return (codes.float().reshape(m, groups, k // groups) * scale.float()[..., None]).reshape(m, k)


def svdq_weight(qweight: torch.Tensor, wscales: torch.Tensor) -> torch.Tensor:
    """The residual weight float32 [N, K] of packed codes [N, K/2] and per-group scales [K/64, N]."""
    return dequantize_groups(unpack_int4(qweight), wscales.float().t())


def _fake_quant_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    codes, scale = quantize_groups_int4(x, group)
    return dequantize_groups(codes, scale)


@torch.library.custom_op("ditq::svdq_w4a4_linear", mutates_args=())
def svdq_w4a4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    smooth: torch.Tensor,
    proj_down: torch.Tensor,
    proj_up: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """SVDQuant W4A4: x [..., K] -> [..., N] in x's dtype, against packed int4 residual codes `qweight` [N, K/2]
    with scales `wscales` [K/64, N], the input smoothing `smooth` [K] and the low-rank branch `proj_down` [K, R],
    `proj_up` [N, R]::

        y = Q64(x / smooth) · W_res^T + (x · proj_down) · proj_up^T + bias

    CPU implementation: the activations are quantized per token and group of 64 and dequantized, everything in
    float32."""
    shape = x.shape
    n = qweight.shape[0]
    x2 = x.reshape(-1, shape[-1]).float()
    if x2.shape[0] == 0:
        return x.new_zeros(*shape[:-1], n)
    y = _fake_quant_groups(x2 / smooth.float(), GROUP) @ svdq_weight(qweight, wscales).t()
    if proj_down.shape[1]:
        y = y + (x2 @ proj_down.float()) @ proj_up.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], n)


@svdq_w4a4_linear.register_kernel("cuda")
def _svdq_w4a4_linear_cuda(x, qweight, wscales, smooth, proj_down, proj_up, bias):
    """comfy-kitchen's SVDQuant kernels: fused smoothing + int4 activation quantization + low-rank down projection,
    then the int4 GEMM with the per-group rescale, the low-rank up projection and the bias in its epilogue. They take
    bf16 / fp16 activations and parameters in that dtype."""
    import comfy_kitchen as ck

    shape = x.shape
    dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    x2 = x.reshape(-1, shape[-1]).to(dtype).contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_zeros(*shape[:-1], qweight.shape[0])
    q_x, ascales, lora_act = ck.quantize_svdquant_w4a4(x2, smooth.to(dtype), proj_down.to(dtype).contiguous())
    out = ck.scaled_mm_svdquant_w4a4(
        q_x,
        qweight,
        ascales,
        wscales.to(dtype),
        lora_act,
        proj_up.to(dtype).contiguous(),
        None if bias is None else bias.to(dtype),
    )
    return out[:m].to(x.dtype).reshape(*shape[:-1], qweight.shape[0])


@svdq_w4a4_linear.register_fake
def _svdq_w4a4_linear_fake(x, qweight, wscales, smooth, proj_down, proj_up, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("ditq::convrot_w4a4_linear", mutates_args=())
def convrot_w4a4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """ConvRot W4A4: x [..., K] -> [..., N] in x's dtype, against packed int4 codes `qweight` [N, K/2] of the
    block-Hadamard-rotated weight with one float32 scale per row `weight_scale` [N]::

        y = Δx · Δw · (Q(x R) · W_q^T) + bias      (R: block Hadamard of `group_size`, Q: per-token int4)

    CPU implementation: the integer sums in float32 (exact), then the rescale."""
    from ditq.formats.convrot import rotate

    shape = x.shape
    n = qweight.shape[0]
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] == 0:
        return x.new_zeros(*shape[:-1], n)
    codes, x_scale = quantize_rows_int4(rotate(x2.float(), group_size))
    acc = codes.float() @ unpack_int4(qweight).float().t()
    y = acc * x_scale[:, None] * weight_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], n)


@convrot_w4a4_linear.register_kernel("cuda")
def _convrot_w4a4_linear_cuda(x, qweight, weight_scale, bias, group_size):
    """comfy-kitchen's ConvRot W4A4 linear: fused rotation + int4 per-token quantization, int4 MMA, rescale and
    bias (its INT8 tensor-core fallback where int4 MMA is missing)."""
    import comfy_kitchen as ck

    return ck.convrot_w4a4_linear(
        x,
        qweight,
        weight_scale.float(),
        None if bias is None else bias.to(x.dtype),
        convrot_groupsize=group_size,
        quant_group_size=GROUP,
    )


@convrot_w4a4_linear.register_fake
def _convrot_w4a4_linear_fake(x, qweight, weight_scale, bias, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
