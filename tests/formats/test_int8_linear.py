"""Int8Linear against a float64 reference and the int8 quantization error bound; backends agree bit for bit.

Bound, per token x [K] and output n: with x̂ = x + e, |e_k| <= Δx/2 and ŵ = w + f, |f_nk| <= Δw_n/2,
x̂·ŵ - x·w = e·w + x·f + e·f, so |err_n| <= Σ_k (|x_k| Δw_n/2 + |w_nk| Δx/2 + Δx Δw_n/4), where Δx = max|x|/127
(per token) and Δw_n = max_k |w_nk|/127 (per row). The float32 rescale adds a few ulps of |y|: covered by a
1e-5 · Σ|x||w| slack.
"""

from __future__ import annotations

import pytest
import torch

from ditq.formats.int8 import Int8Linear
from ditq.formats.int8_ops import (
    CUDA_ALIGNMENT,
    exact_int_matmul,
    pad_for_int_mm,
    quantize_per_token,
    quantize_weight_per_channel,
)


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case |y_q - y| [T, N] for float64 x [T, K], w [N, K] (see module docstring)."""
    dx = x.abs().amax(dim=1, keepdim=True) / 127  # [T, 1]
    dw = w.abs().amax(dim=1) / 127  # [N]
    ax, aw = x.abs(), w.abs()
    k = x.shape[1]
    bound = ax.sum(1, keepdim=True) * dw[None, :] / 2 + dx * aw.sum(1)[None, :] / 2 + k * dx * dw[None, :] / 4
    return bound + 1e-5 * ax @ aw.t()


def _heavy_tailed(t: int, k: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(t, k, generator=gen, dtype=torch.float64)
    x[:, :3] *= 50.0  # outlier channels
    if t > 1:
        x[0] = 0.0  # an all-zero token
    return x


@pytest.mark.parametrize("shape", [(1, 5, 3), (33, 72, 40), (17, 3000, 24)])
@pytest.mark.parametrize("smooth", [False, True])
def test_int8_linear_error_within_quantization_bound(shape, smooth):
    t, k, n = shape
    gen = torch.Generator().manual_seed(k + n)
    x = _heavy_tailed(t, k, gen)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) * torch.rand(
        n, 1, generator=gen, dtype=torch.float64
    )
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    s = (torch.rand(k, generator=gen, dtype=torch.float64) + 0.5) if smooth else None
    x, w, b = x.float().double(), w.float().double(), b.float().double()  # what the float32 layer receives
    lin = Int8Linear.from_float(w.float(), b.float(), None if s is None else s.float())
    y = lin(x.float()).double()
    ref = x @ w.t() + b
    if s is None:
        bound = _bound(x, w)
    else:  # the layer quantizes x/s and w*s (float32 smoothing vector)
        sf = s.float().double()
        bound = _bound(x / sf, w * sf)
    err = (y - ref).abs()
    bound = bound + 1e-6 * b.abs()  # the float32 bias add
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(err.max()) > 0  # it did quantize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_backends_agree_exactly(dtype):
    gen = torch.Generator().manual_seed(1)
    w, b, s = (
        torch.randn(48, 2100, generator=gen),
        torch.randn(48, generator=gen),
        torch.rand(2100, generator=gen) + 0.5,
    )
    x = (torch.randn(3, 7, 2100, generator=gen) * 3).to(dtype)
    for smooth in (None, s):
        lin = Int8Linear.from_float(w, b, smooth)
        outs = {}
        for kernel in ("numba", "torch", "dequant"):
            lin.kernel = kernel
            outs[kernel] = lin(x)
        assert outs["torch"].dtype == dtype and outs["torch"].shape == (3, 7, 48)
        assert torch.equal(outs["numba"], outs["torch"])
        assert torch.equal(outs["dequant"], outs["torch"])


def test_exact_int_matmul_matches_int_mm_at_extremes():
    a = torch.full((20, 4100), 127, dtype=torch.int8)
    a[1] = -127
    b = torch.full((4100, 16), -127, dtype=torch.int8)
    b[:, 3] = 127
    ref = a.long() @ b.long()
    assert torch.equal(exact_int_matmul(a, b).long(), ref)
    assert torch.equal(torch._int_mm(a, b).long(), ref)


def test_pad_for_int_mm_follows_cuda_shape_rules_without_changing_the_product():
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(-127, 128, (5, 13), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (13, 6), generator=gen, dtype=torch.int8)
    ap, bp = pad_for_int_mm(a, b, **CUDA_ALIGNMENT)
    assert ap.shape[0] >= 17 and ap.shape[1] % 8 == 0 and bp.shape[1] % 8 == 0 and ap.shape[1] == bp.shape[0]
    assert torch.equal(torch._int_mm(ap, bp)[:5, :6].long(), a.long() @ b.long())


def test_int8_linear_smoothing_is_fused_into_activation_quantization():
    gen = torch.Generator().manual_seed(3)
    w, x, s = (
        torch.randn(8, 64, generator=gen),
        torch.randn(10, 64, generator=gen),
        torch.rand(64, generator=gen) + 0.5,
    )
    fused = Int8Linear.from_float(w, smooth=s, kernel="torch")(x)
    inv = 1.0 / s
    explicit = Int8Linear.from_float(w * s, kernel="torch")(x * inv)
    assert torch.equal(fused, explicit)


def test_int8_linear_reference_quantizers():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    q, scale = quantize_per_token(x)
    assert q.tolist() == [[64, -127, 32], [0, 0, 0]]
    assert scale[0].item() == pytest.approx(2.0 / 127) and scale[1].item() == 1.0
    wq, ws = quantize_weight_per_channel(torch.tensor([[0.0, 0.0], [3.0, -1.0]]))
    assert wq.tolist() == [[0, 0], [127, -42]] and ws.tolist()[0] == 1.0


def test_int8_linear_stays_float32_inside_and_handles_empty_input():
    lin = Int8Linear.from_float(torch.randn(4, 8), torch.randn(4), torch.rand(8) + 0.5)
    lin.to(torch.bfloat16)
    assert lin.scales.dtype == lin.smoothing.dtype == torch.float32 and lin.bias.dtype == torch.bfloat16
    assert lin.qweight_t.dtype == torch.int8 and lin.weight.shape == (4, 8)
    assert lin(torch.zeros(0, 8, dtype=torch.bfloat16)).shape == (0, 4)
    y = lin(torch.zeros(2, 8, dtype=torch.bfloat16))
    assert torch.equal(y.float(), lin.bias.to(torch.bfloat16).float().expand(2, 4))


def test_numba_and_torch_quantizers_agree_on_large_inputs(monkeypatch):
    from ditq.formats import int8_ops as linear

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 1024, generator=gen) * torch.rand(300, 1, generator=gen) * 10
    cs = torch.rand(1024, generator=gen) + 0.5
    for t in (x, x.to(torch.bfloat16)):
        fast = linear.quantize_rows(t, cs)  # >= NUMBA_MIN_ELEMENTS: the numba kernel
        monkeypatch.setattr(linear, "NUMBA_MIN_ELEMENTS", 1 << 40)
        slow = linear.quantize_rows(t, cs)
        monkeypatch.undo()
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def test_missing_int8_gemm_falls_back_exactly_and_logs_once(monkeypatch, caplog):
    from ditq.formats import int8_ops as linear

    lin = Int8Linear.from_float(torch.randn(24, 40), kernel="torch")
    x = torch.randn(5, 40)
    want = lin(x)

    def no_int_mm(*args, **kwargs):
        raise RuntimeError("_int_mm: not implemented for this device")

    linear._int_mm_works.cache_clear()
    monkeypatch.setattr(torch, "_int_mm", no_int_mm)
    try:
        with caplog.at_level("WARNING", logger="ditq.formats.int8_ops"):
            assert torch.equal(lin(x), want) and torch.equal(lin(x), want)
        assert sum("unavailable" in r.message for r in caplog.records) == 1
    finally:
        monkeypatch.undo()
        linear._int_mm_works.cache_clear()
