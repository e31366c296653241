"""The low-rank branch on one layer of every format, against a float64 reference of W + s·BA.

Bound, per token and output (u = 2^-8, bf16's unit roundoff; S = |x| |W|ᵀ, L = (|x| |A|ᵀ) |sB|ᵀ with A and sB the
fused factors):

- the base layer's own error against x Wᵀ + b, W its dequantized weight: weight-only formats round W to bf16
  (≤ u·S); INT8 W8A8 quantizes each token with step Δx = max|x| / 127 (≤ Δx/2 · Σ|W|, as in
  tests/formats/test_int8_linear.py), ConvRot the same on the rotated token and weight; W4A4 with step
  max|x| / 7 (ConvRot W4A4: per rotated token; SVDQuant: per token and group of 64 of x / smooth, against the int4
  residual, the low-rank part being exact);
- the branch: h = xAᵀ rounded to bf16 (≤ u·L), sB rounded to bf16 (≤ u·L), the up-projection rounded before the
  add (≤ u·L);
- two output roundings (the layer's, then the add): ≤ 2u (|y| + S + L).
Every check also asserts that the LoRA moved the output by far more than the bound, so a wrong branch cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ditq.formats.convrot import ConvRotInt8Linear, quantize_convrot, rotate
from ditq.formats.int4_ops import svdq_weight, unpack_int4
from ditq.lora import LayerFrame, apply_lora, read_lora, set_branch_kernel, set_lora_strength, unload_lora

U = 2.0**-8
K, N = 512, 192
FORMATS = ("bf16", "fp8", "int8", "convrot", "q4_k", "q8_0", "nf4", "svdq_w4a4", "convrot_w4a4")
RECIPES = {
    "fp8": {},
    "int8": {"smoothquant": False},
    "q4_k": {},
    "q8_0": {},
    "nf4": {},
    "svdq_w4a4": {"smoothquant": False, "rank": 16},
    "convrot_w4a4": {"smoothquant": False},
}
W4A4 = ("svdq_w4a4", "convrot_w4a4")


class Holder(nn.Module):
    """A model with one layer named `proj`, the name the LoRA files below use."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def make_layer(fmt: str, w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """A bf16-compute layer of format `fmt` quantized from the float32 weight w [N, K] and bias b [N]."""
    from ditq.quant.api import quantize_
    from ditq.quant.recipes import parse_recipe

    if fmt == "convrot":
        q, s = quantize_convrot(w, 256)
        return ConvRotInt8Linear(q, s, b, 256, compute_dtype=torch.bfloat16)
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    model = nn.Sequential(lin).to(torch.bfloat16)
    if fmt != "bf16":
        quantize_(model, parse_recipe(fmt, **RECIPES[fmt]))
    return model[0]


def dequantized(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().double()
    return layer.dequantized_weight(torch.float32).double()


def base_bound(fmt: str, layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    s = x.abs() @ w.abs().t()
    if fmt == "int8":
        dx = x.abs().amax(1, keepdim=True) / 127
        return dx / 2 * w.abs().sum(1)[None, :] + 1e-5 * s
    if fmt == "convrot":
        xr = rotate(x.float(), 256).double()
        wr = (layer.weight.float() * layer.scales[:, None]).double()
        dx = xr.abs().amax(1, keepdim=True) / 127
        return dx / 2 * wr.abs().sum(1)[None, :] + 1e-5 * (xr.abs() @ wr.abs().t()) + 1e-5 * s
    if fmt == "convrot_w4a4":  # int4 per token on the rotated input: step max|xR| / 7
        xr = rotate(x.float(), layer.group_size).double()
        wr = (unpack_int4(layer.weight).float() * layer.weight_scale[:, None]).double()
        dx = xr.abs().amax(1, keepdim=True) / 7
        return dx / 2 * wr.abs().sum(1)[None, :] + 1e-5 * (xr.abs() @ wr.abs().t()) + 1e-5 * s
    if fmt == "svdq_w4a4":  # int4 per token and group of 64 on x / smooth, against the int4 residual only
        xs = x / layer.weight_smooth_factor.double()[None, :]
        dx = (xs.abs().reshape(xs.shape[0], -1, 64).amax(-1) / 7).repeat_interleave(64, dim=1)
        res = svdq_weight(layer.weight, layer.weight_scale).double().abs()
        return (dx / 2) @ res.t() + 1e-5 * (xs.abs() @ res.t()) + 1e-5 * s
    return (U + 1e-5) * s


def full_bound(fmt, layer, x, w, a, sb, ref) -> torch.Tensor:
    """The bound of the module docstring for fused factors a [R, K], sb [N, R] (float64)."""
    s = x.abs() @ w.abs().t()
    low = (x.abs() @ a.abs().t()) @ sb.abs().t()
    return base_bound(fmt, layer, x, w) + 3 * U * low + 2 * U * (ref.abs() + s + low) + 1e-6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _weights(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) / K**0.5
    b = torch.randn(N, generator=gen) * 0.1
    x = torch.randn(3, 11, K, generator=gen)
    x[..., :4] *= 8.0  # a few outlier channels
    return w, b, x.to(torch.bfloat16)


def _lora(
    rank: int, seed: int, alpha: float | None = None, magnitude: float = 1.0
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + seed)
    out = {
        "proj.lora_down.weight": (torch.randn(rank, K, generator=gen) / K**0.5).to(torch.bfloat16),
        "proj.lora_up.weight": (torch.randn(N, rank, generator=gen) * magnitude / rank**0.5).to(
            torch.bfloat16
        ),
    }
    if alpha is not None:
        out["proj.alpha"] = torch.tensor(alpha)
    return out


def _fused_reference(loras: list[tuple[dict, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [R, K], s·B [N, R]) in float64, independently of ditq: ranks concatenated, B scaled by strength · alpha/r."""
    a, sb = [], []
    for state, strength in loras:
        down, up = state["proj.lora_down.weight"].double(), state["proj.lora_up.weight"].double()
        alpha = float(state["proj.alpha"]) if "proj.alpha" in state else down.shape[0]
        a.append(down)
        sb.append(up * strength * alpha / down.shape[0])
    return torch.cat(a), torch.cat(sb, dim=1)


@pytest.mark.parametrize("kernel", ["torch", "numba"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_branch_matches_float64_reference_within_the_format_error(fmt, kernel):
    w, b, x = _weights()
    model = Holder(make_layer(fmt, w, b))
    with torch.no_grad():
        y_base = model(x).double().reshape(-1, N)
    loras = [(_lora(4, 0, alpha=2.0), 0.7), (_lora(8, 1), -1.3), (_lora(16, 2, alpha=24.0), 0.4)]
    for i, (state, strength) in enumerate(loras):
        apply_lora(model, read_lora(state, name=f"l{i}"), strength)
    assert set_branch_kernel(model, kernel) == 1
    assert model.proj.lora.lora_A.shape == (28, K) and model.proj.lora.lora_B.shape == (N, 28)
    with torch.no_grad():
        y = model(x).double().reshape(-1, N)
    x64, wq = x.double().reshape(-1, K), dequantized(model.proj)
    a, sb = _fused_reference(loras)
    ref_base = x64 @ wq.t() + b.double()
    ref = ref_base + (x64 @ a.t()) @ sb.t()
    bound = full_bound(fmt, model.proj, x64, wq, a, sb, ref)
    err = (y - ref).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    # the worst-case bound is loose; the measured error is also far below what the LoRA changes, so a missing,
    # misscaled or transposed branch fails here (W4A4's 4-bit activations alone move the base output by more
    # than 3%: there the branch's own change is what is compared)
    assert _rel(y - y_base, ref - ref_base) < 0.03 < 0.5 < _rel(ref_base, ref), _rel(y - y_base, ref - ref_base)
    if fmt not in W4A4:
        assert _rel(y, ref) < 0.03, _rel(y, ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_strength_zero_and_unloading_are_bit_identical_to_the_base(fmt):
    w, b, x = _weights(1)
    model = Holder(make_layer(fmt, w, b))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(x)
        apply_lora(model, read_lora(_lora(4, 3), name="a"), 0.0)
        assert torch.equal(model(x), base)
        set_lora_strength(model, "a", 1.0)
        assert not torch.equal(model(x), base)
        apply_lora(model, read_lora(_lora(8, 4), name="b"), 0.0)
        set_lora_strength(model, "a", 0.0)
        assert torch.equal(model(x), base)  # several LoRAs, all at 0
        set_lora_strength(model, "b", 2.0)
        unload_lora(model)
        assert torch.equal(model(x), base)
    assert not model.proj._forward_hooks and "lora" not in model.proj._modules
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_unloading_one_lora_leaves_exactly_the_others():
    w, b, x = _weights(2)
    one, two = Holder(make_layer("fp8", w, b)), Holder(make_layer("fp8", w, b))
    with torch.no_grad():
        apply_lora(one, read_lora(_lora(4, 5), name="keep"), 0.8)
        apply_lora(one, read_lora(_lora(8, 6), name="drop"), 1.5)
        unload_lora(one, "drop")
        apply_lora(two, read_lora(_lora(4, 5), name="keep"), 0.8)
        assert torch.equal(one(x), two(x))


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if name.split(".")[0] in ("mm", "addmm", "addmm_", "matmul", "bmm", "linear", "_int_mm"):
            self.calls.append((name, [a.data_ptr() for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_several_loras_run_as_one_low_rank_matmul_on_the_layer_input(fmt):
    w, b, x = _weights(3)
    model = Holder(make_layer(fmt, w, b))
    with torch.no_grad():
        with _CountMatmuls() as base:
            model(x)
        for i in range(4):
            apply_lora(model, read_lora(_lora(16, 10 + i), name=f"l{i}"), 0.5 + i)
        set_branch_kernel(model, "torch")
        with _CountMatmuls() as with_lora:
            model(x)
        set_branch_kernel(model, "numba")
        with _CountMatmuls() as with_numba:
            model(x)
    extra = with_lora.calls[len(base.calls) :]
    assert [c[0].split(".")[0] for c in extra] == ["mm", "addmm_"], extra
    assert extra[0][1][0] == x.data_ptr()  # the down-projection reads the layer's own input, not a copy
    assert [c[0] for c in with_numba.calls] == [
        c[0] for c in base.calls
    ]  # both products in the numba kernels


def test_frames_map_the_lora_into_smoothed_coordinates():
    """A layer storing diag(1/r) W diag(s) that receives x / s (SmoothQuant folded into its neighbours) plus a
    LoRA with LayerFrame(s, r) computes diag(1/r) (W + sBA) x: checked against float64 with the bound above."""
    w, b, x = _weights(4)
    gen = torch.Generator().manual_seed(7)
    s, r = torch.rand(K, generator=gen) * 3 + 0.2, torch.rand(N, generator=gen) * 3 + 0.2
    stored = (w / r[:, None]) * s[None, :]
    layer = make_layer("int8", stored, b / r)
    xs = (x.float() / s).to(torch.bfloat16)
    state = _lora(8, 8, alpha=4.0)
    a, sb = _fused_reference([(state, 1.5)])
    x64, wq = xs.double().reshape(-1, K), dequantized(layer)
    ref = x64 @ wq.t() + (b / r).double() + ((x64 * s.double()) @ a.t()) @ (sb / r.double()[:, None]).t()
    bound = full_bound("int8", layer, x64, wq, a * s.double()[None, :], sb / r.double()[:, None], ref)
    with torch.no_grad():
        base_err = _rel(layer(xs).double().reshape(-1, N), x64 @ wq.t() + (b / r).double())
    for frame, ok in ((LayerFrame(s, r), True), (None, False)):
        model = Holder(layer)
        frames = {"transformer": {"proj": frame}} if frame is not None else None
        apply_lora(model, read_lora(state, name="f"), 1.5, frames=frames)
        with torch.no_grad():
            y = model(xs).double().reshape(-1, N)
        assert bool(((y - ref).abs() <= bound).all()) is ok, float(((y - ref).abs() / bound).max())
        assert (_rel(y, ref) < 2 * base_err) is ok and (_rel(y, ref) > 5 * base_err) is not ok, (
            _rel(y, ref),
            base_err,
        )
        unload_lora(model)


def test_branch_is_out_of_place_when_autograd_records():
    w, b, x = _weights(5)
    model = Holder(make_layer("bf16", w, b))
    apply_lora(model, read_lora(_lora(4, 9), name="g"), 1.0)
    set_branch_kernel(
        model, "torch"
    )  # the numba kernels do not record autograd; torch's in-place path is compared
    with torch.no_grad():
        plain = model(x)
    xg = x.clone().requires_grad_(True)
    y = model(xg)
    y.float().sum().backward()
    assert torch.equal(y.detach(), plain) and xg.grad is not None


class Projections(nn.Module):
    """q, k and v reading one input, as in an attention block (named so that fuse_int8_projections_ fuses them)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = layers

    def forward(self, x):
        return torch.cat([self.to_q(x), self.to_k(x), self.to_v(x)], dim=-1)


def fused_projections(seed: int = 6) -> tuple[Projections, list[torch.Tensor], list[torch.Tensor]]:
    """INT8 q/k/v fused into one GEMM (`ditq.formats.fused`), with each part's dequantized weight and bias."""
    from ditq.formats.fused import fuse_int8_projections_

    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(N, K, generator=gen) / K**0.5 for _ in range(3)]
    bs = [torch.randn(N, generator=gen) * 0.1 for _ in range(3)]
    layers = [make_layer("int8", w, b) for w, b in zip(ws, bs, strict=True)]
    deq = [dequantized(m) for m in layers]
    model = Projections(layers)
    assert fuse_int8_projections_(model) == 1
    return model, deq, [b.double() for b in bs]


def test_branch_on_fused_int8_projections_adds_to_each_part_only():
    """Fused q/k/v parts return slices of one output: each part's branch must add to its own slice, out of place,
    and leave the fused output the other parts read untouched."""
    model, deq, biases = fused_projections()
    _, _, x = _weights(6)
    states = {p: _lora(8, 20 + i, alpha=4.0) for i, p in enumerate(("to_q", "to_k", "to_v"))}
    state = {k.replace("proj", p): v for p, st in states.items() for k, v in st.items()}
    apply_lora(model, read_lora(state, name="qkv"), 0.9)
    with torch.no_grad():
        y = model(x).double().reshape(-1, 3 * N)
    x64 = x.double().reshape(-1, K)
    for i, p in enumerate(("to_q", "to_k", "to_v")):
        a, sb = _fused_reference([({k: v for k, v in states[p].items()}, 0.9)])
        ref_base = x64 @ deq[i].t() + biases[i]
        ref = ref_base + (x64 @ a.t()) @ sb.t()
        part = y[:, i * N : (i + 1) * N]
        bound = full_bound("int8", None, x64, deq[i], a, sb, ref)
        assert bool(((part - ref).abs() <= bound).all()), p
        assert _rel(part, ref) < 0.03 < 0.2 < _rel(ref_base, ref), p


def test_every_quantized_linear_class_has_a_check_here():
    """A new QuantizedLinear (a new format) must be added to FORMATS above, so the branch is checked on it."""
    from ditq.formats import load_all_formats
    from ditq.formats.base import QuantizedLinear

    load_all_formats()

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    w, b, _ = _weights()
    covered = {type(make_layer(fmt, w, b)) for fmt in FORMATS}
    model, _, _ = fused_projections()
    covered |= {type(model.to_q), type(model.to_qkv)}  # checked by the fused-projection test above
    missing = sorted(c.__name__ for c in set(subclasses(QuantizedLinear)) - covered)
    assert not missing, f"no LoRA branch check for {missing}: add its format to FORMATS"
