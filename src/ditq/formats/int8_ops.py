"""INT8 W8A8 arithmetic: int8 weights with one fp32 scale per output channel, int8 activations with one scale per
token computed at run time, an int32-accumulating GEMM (`torch._int_mm`), then rescale and bias.

For a token x [K] and output channel n with weight row w_n [K]::

    Δw_n = max_k |w_nk| / 127        w_q = round(w / Δw_n)          (once, offline)
    Δx   = max_k |x_k / s_k| / 127   x_q = round(x / s / Δx)        (per token, at run time)
    y_n  = Δx · Δw_n · Σ_k x_q,k · w_q,nk + b_n                     (int32 sum, exact)

`s` [K] is an optional smoothing vector (SmoothQuant) for layers whose smoothing cannot be folded into a
neighbouring weight; it is fused into the activation quantization (the stored weight is then `w · s`).

On CUDA, `ditq::int8_linear` is comfy-kitchen's fused kernel (per-token quantization, an int8 GEMM with the rescale
and bias in its epilogue; ConvRot's rotation fused into the quantizer). On the CPU it is ditq's own:
- the memory-bound halves (per-token quantization, int32 -> float rescale) run as one-pass numba kernels on large
  bf16 / fp32 inputs (`numba`), as torch ops otherwise (`torch`);
- the int32 sums come from `torch._int_mm`, or, where that is slower, from float32 GEMMs over K-chunks of 1024
  (every partial sum < 2**24, so the result is exact and equal to `_int_mm`'s bit for bit). Which one `auto` uses is
  measured once per process (`cpu_gemm()`): on CPUs without VNNI / AMX, `_int_mm` runs 10 to 100 times slower than
  float32 (measured on an AVX2-only EPYC: 27 s against 0.9 s for 1024x4608 @ 4608x4608).
Every backend gives identical outputs; the tests check it. The op has a fake implementation, so models run under
`FakeTensorMode` (memory simulation) and compile with `torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

INT8_MAX = 127
KERNELS = ("auto", "numba", "torch", "dequant")
# Largest K-chunk whose int8 x int8 partial sums stay exact in float32: 1024 * 127 * 127 < 2**24.
_EXACT_F32_CHUNK = 1024
# cuBLASLt int8 GEMM shape rules (torch._int_mm on CUDA).
CUDA_ALIGNMENT = {"min_rows": 17, "multiple": 8}
NUMBA_MIN_ELEMENTS = 1 << 18


def quantize_rows(
    x: torch.Tensor, col_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of (x * col_scale): (int8 [M, K], fp32 scale [M] = row absmax / 127, 1 if zero).

    The one quantization arithmetic of this package: q = clamp(rint((x * col_scale) * (1 / scale)), ±127), all in
    float32. Weights (per output channel) and activations (per token) both use it; large CPU inputs go through a
    one-pass numba kernel with bit-identical results.
    """
    kern = _numba_kernels() if x.device.type == "cpu" and x.numel() >= NUMBA_MIN_ELEMENTS else None
    if kern is not None and x.dtype in (torch.float32, torch.bfloat16) and x.ndim == 2:
        x = x.contiguous()
        cs = _ones(x.shape[1]) if col_scale is None else col_scale.float().contiguous()
        q = torch.empty(x.shape, dtype=torch.int8)
        scale = torch.empty(x.shape[0], dtype=torch.float32)
        if x.dtype == torch.bfloat16:
            kern.quantize_rows_bf16(
                x.view(torch.int16).numpy().view("uint16"), cs.numpy(), q.numpy(), scale.numpy(), 0
            )
        else:
            kern.quantize_rows_f32(x.numpy(), cs.numpy(), q.numpy(), scale.numpy(), 0)
        return q, scale
    xf = x.float()
    if col_scale is not None:
        xf = xf * col_scale.float()
    amax = xf.abs().amax(dim=1)
    scale = amax / float(INT8_MAX)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    inv = 1.0 / scale
    q = torch.round(xf * inv[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_weight_per_channel(
    weight: torch.Tensor, col_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight [N, K] (times `col_scale` [K], e.g. a smoothing vector) -> (int8 [N, K], fp32 scale [N])."""
    return quantize_rows(weight, col_scale)


def quantize_per_token(
    x: torch.Tensor, inv_smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] (times `inv_smooth` [K]) -> (int8 [M, K], fp32 scale [M])."""
    _count("quantize")
    return quantize_rows(x, inv_smooth)


# How often each piece ran (activation quantizations, INT8 linear calls): what the tests count to show that a
# fused projection quantizes its input once.
CALLS: Counter[str] = Counter()


def _count(what: str) -> None:
    CALLS[what] += 1


def exact_int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N] without an int8 GEMM: float32 GEMMs over exact K-chunks."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    for k0 in range(0, a.shape[1], _EXACT_F32_CHUNK):
        k1 = k0 + _EXACT_F32_CHUNK
        out += torch.mm(a[:, k0:k1].float(), b[k0:k1].float()).to(torch.int32)
    return out


def pad_for_int_mm(
    a: torch.Tensor, b: torch.Tensor, min_rows: int, multiple: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad a [M, K] and b [K, N] so that M >= min_rows and K, N are multiples of `multiple` (zeros add 0)."""
    m, k = a.shape
    n = b.shape[1]
    pad_m = max(min_rows - m, 0)
    pad_k = -k % multiple
    pad_n = -n % multiple
    if pad_m or pad_k:
        a = F.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = F.pad(b, (0, pad_n, 0, pad_k))
    return a.contiguous(), b.contiguous()


@cache
def _int_mm_works(device_type: str) -> bool:
    """Whether `torch._int_mm` runs on this device type (probed once with aligned shapes)."""
    try:
        a = torch.ones(32, 16, dtype=torch.int8, device=device_type)
        b = torch.ones(16, 16, dtype=torch.int8, device=device_type)
        return bool(torch._int_mm(a, b)[0, 0].item() == 16)
    except (RuntimeError, NotImplementedError) as exc:
        log.warning(
            "int8 GEMM (torch._int_mm) is unavailable on %s (%s); INT8 layers use the exact dequantized path",
            device_type,
            str(exc).splitlines()[0][:120],
        )
        return False


@cache
def _numba_kernels():
    try:
        from ditq.formats import _int8_numba as _kernels
    except ImportError as exc:  # pragma: no cover - numba is a declared dependency
        log.warning("numba kernels unavailable (%s); using torch ops on CPU", exc)
        return None
    return _kernels


@dataclass(frozen=True)
class GemmChoice:
    """Which int32 GEMM the CPU path uses, and the measurement that chose it."""

    gemm: str  # "int_mm" or "float"
    reason: str
    int_mm_ms: float | None = None
    float_ms: float | None = None


@cache
def cpu_gemm() -> GemmChoice:
    """Time `torch._int_mm` against the exact float32 path once (256 x 1024 @ 1024 x 1024, best of 3) and keep the
    faster; logged, and recorded by runs and benchmarks."""
    if not _int_mm_works("cpu"):
        return GemmChoice("float", "torch._int_mm does not run on this CPU")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (256, 1024), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (1024, 1024), dtype=torch.int8, generator=g).t()
    times = {}
    for name, fn in (("int_mm", torch._int_mm), ("float", exact_int_matmul)):
        fn(a, b)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn(a, b)
            best = min(best, time.perf_counter() - t0)
        times[name] = best * 1e3
    gemm = "int_mm" if times["int_mm"] <= times["float"] else "float"
    reason = f"measured 256x1024@1024x1024: torch._int_mm {times['int_mm']:.2f} ms, exact float32 {times['float']:.2f} ms"
    log.info("INT8 CPU GEMM: %s (%s)", gemm, reason)
    return GemmChoice(gemm, reason, times["int_mm"], times["float"])


def int8_matmul(a: torch.Tensor, b: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N], exact on every backend (`b` may be a transposed view)."""
    dev = a.device.type
    if kernel == "dequant" or not _int_mm_works(dev):
        return exact_int_matmul(a, b)
    if dev == "cuda":
        m, n = a.shape[0], b.shape[1]
        ap, bp = pad_for_int_mm(a, b, **CUDA_ALIGNMENT)
        return torch._int_mm(ap, bp)[:m, :n]
    if kernel == "auto" and cpu_gemm().gemm == "float":
        return exact_int_matmul(a, b)
    return torch._int_mm(a.contiguous(), b)


def rescale(
    acc: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """int32 [M, N] -> out_dtype: ((acc * x_scale[m]) * w_scale[n]) + bias[n], in float32."""
    y = acc.float() * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


def numba_w8a8(
    x2: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    inv_smooth: torch.Tensor | None,
    kernel: str = "auto",
) -> torch.Tensor:
    """W8A8 of CPU activations [M, K] (bf16 or fp32) with the numba kernels: quantize per token, the int32 GEMM
    against `weight` int8 [N, K], rescale; returns [M, N] in x2's dtype. `bias` and `inv_smooth` are float32."""
    kern = _numba_kernels()
    x2 = x2.contiguous()
    m, k = x2.shape
    n = weight.shape[0]
    inv_smooth = inv_smooth if inv_smooth is not None else _ones(k)
    xq = torch.empty(m, k, dtype=torch.int8)
    xs = torch.empty(m, dtype=torch.float32)
    if x2.dtype == torch.bfloat16:
        kern.quantize_rows_bf16(
            x2.view(torch.int16).numpy().view("uint16"), inv_smooth.numpy(), xq.numpy(), xs.numpy(), 0
        )
    else:
        kern.quantize_rows_f32(x2.numpy(), inv_smooth.numpy(), xq.numpy(), xs.numpy(), 0)
    _count("quantize")
    acc = int8_matmul(xq, weight.t(), "dequant" if kernel == "dequant" else "auto")
    bias = bias if bias is not None else _zeros(n)
    comp = _zeros_i32(n)
    out = torch.empty(m, n, dtype=x2.dtype)
    args = (acc.numpy(), comp.numpy(), xs.numpy(), weight_scale.numpy(), bias.numpy())
    if x2.dtype == torch.bfloat16:
        kern.rescale_to_bf16(*args, out.view(torch.int16).numpy().view("uint16"))
    else:
        kern.rescale_to_f32(*args, out.numpy())
    return out


def numba_available(x2: torch.Tensor) -> bool:
    """Whether the numba path takes these activations: large enough CPU bf16 / fp32 matrices (below ~256k
    elements the thread pool start-up outweighs the saved passes)."""
    return (
        x2.device.type == "cpu"
        and x2.dtype in (torch.bfloat16, torch.float32)
        and x2.numel() >= NUMBA_MIN_ELEMENTS
        and _numba_kernels() is not None
    )


@cache
def _ones(k: int) -> torch.Tensor:
    return torch.ones(k, dtype=torch.float32)


@cache
def _zeros(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float32)


@cache
def _zeros_i32(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int32)


def _cpu_int8_linear(x2, weight, weight_scale, bias, inv_smooth, kernel: str) -> torch.Tensor:
    """The CPU W8A8 linear of 2-D activations (bf16 / fp32), bias in float32."""
    big = (
        x2.numel() >= NUMBA_MIN_ELEMENTS
    )  # below ~256k elements the numba thread pool costs more than it saves
    wanted = kernel == "numba" or (kernel == "auto" and big)
    if wanted and x2.dtype in (torch.bfloat16, torch.float32) and _numba_kernels() is not None:
        return numba_w8a8(x2, weight, weight_scale, bias, inv_smooth, kernel)
    xq, xs = quantize_per_token(x2, inv_smooth)
    gemm = "dequant" if kernel == "dequant" else "auto" if kernel != "torch" else "int_mm"
    acc = int8_matmul(xq, weight.t(), gemm)
    return rescale(acc, xs, weight_scale, bias, x2.dtype)


@torch.library.custom_op("ditq::int8_linear", mutates_args=())
def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    inv_smooth: torch.Tensor | None,
    convrot_group: int,
    kernel: str,
) -> torch.Tensor:
    """W8A8 linear: x [..., K] (bf16 / fp32) against weight int8 [N, K] with fp32 row scales [N] -> [..., N] in
    x's dtype. `inv_smooth` [K] multiplies x before quantization; `convrot_group` > 0 rotates x by the block
    Hadamard of that size first (ConvRot files). CPU implementation (see the module docstring)."""
    _count("int8_linear")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] == 0:
        return x.new_zeros(*shape[:-1], weight.shape[0])
    if convrot_group:
        from ditq.formats.convrot import rotate

        x2 = rotate(x2.float(), convrot_group)
    y = _cpu_int8_linear(x2, weight, weight_scale, None if bias is None else bias.float(), inv_smooth, kernel)
    return y.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


@int8_linear.register_kernel("cuda")
def _int8_linear_cuda(x, weight, weight_scale, bias, inv_smooth, convrot_group, kernel):
    """comfy-kitchen's fused INT8 linear (its CUDA backend, else Triton, else its eager reference)."""
    import comfy_kitchen as ck

    _count("int8_linear")
    if inv_smooth is not None:
        x = x * inv_smooth.to(x.dtype)
    return ck.int8_linear(
        x,
        weight,
        weight_scale,
        None if bias is None else bias.to(x.dtype),
        out_dtype=x.dtype,
        convrot=convrot_group > 0,
        convrot_groupsize=convrot_group or 256,
    )


@int8_linear.register_fake
def _int8_linear_fake(x, weight, weight_scale, bias, inv_smooth, convrot_group, kernel):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
