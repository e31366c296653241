"""The W4A4 formats (SVDQuant, ConvRot) against comfy-kitchen's eager backend, the reference of the CUDA kernels
ditq calls: nibble packing bit for bit, weight and activation codes, layer outputs; the low-rank branch on planted
outlier channels against a float64 reference; fused-qkv slicing, format detection, markers and refusals, fake
tensors and torch.compile."""

from __future__ import annotations

import json

import pytest
import torch

from ditq.errors import CheckpointError
from ditq.formats.base import detect_format
from ditq.formats.convrot_w4a4 import ConvRotW4A4Format, ConvRotW4A4Linear, quantize_convrot_w4a4
from ditq.formats.int4_ops import pack_int4, quantize_groups_int4, unpack_int4
from ditq.formats.int8 import Int8Linear, marker_tensor
from ditq.formats.svdquant import SVDQuantFormat, SVDQuantLinear, low_rank, quantize_svdq

ck = pytest.importorskip("comfy_kitchen")
from comfy_kitchen.backends.eager.svdquant import _pack_int4_row_major  # noqa: E402

eager_only = pytest.mark.skipif(
    not ck.registry.is_available("eager") or torch.cuda.is_available(),
    reason="compares against comfy-kitchen's eager backend on the CPU",
)


def _activations(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (torch.rand(m, 1, generator=g) * 4 + 0.1)
    x[:, :3] *= 30  # outlier channels
    return x


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_int4_packing_is_comfy_kitchens_bit_for_bit():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(6, 4)[:, torch.randperm(64)]
    packed = pack_int4(codes)
    assert torch.equal(packed, _pack_int4_row_major(codes))
    assert torch.equal(unpack_int4(packed), codes)
    assert packed.shape == (6, 32) and packed.dtype == torch.int8
    # byte = low nibble (even column) | high nibble (odd column) << 4
    assert int(pack_int4(torch.tensor([[-1, 2]], dtype=torch.int8)).view(torch.uint8)) == 0x2F


@eager_only
def test_svdquant_activation_codes_equal_comfy_kitchen():
    x = _activations(40, 256, seed=0)
    smooth = torch.rand(256, generator=torch.Generator().manual_seed(1)) + 0.5
    down = torch.randn(256, 16, generator=torch.Generator().manual_seed(2))
    q, ascales, lora = ck.quantize_svdquant_w4a4(x, smooth, down)
    codes, scale = quantize_groups_int4(x / smooth)
    assert torch.equal(pack_int4(codes), q[:40])  # from float32 the codes are identical
    assert torch.allclose(scale, ascales[:, :40].t(), rtol=1e-6, atol=0)
    assert torch.allclose(x @ down, lora[:40], rtol=1e-5, atol=1e-4)
    # bf16 activations: comfy-kitchen's eager reference divides in bf16, ditq (like its CUDA kernel) in float32
    xb = x.to(torch.bfloat16)
    qb, _, _ = ck.quantize_svdquant_w4a4(xb, smooth.to(torch.bfloat16), down.to(torch.bfloat16))
    ours, _ = quantize_groups_int4(xb.float() / smooth.to(torch.bfloat16).float())
    diff = (unpack_int4(qb[:40]).int() - ours.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.05


@eager_only
@pytest.mark.parametrize("rank", [0, 16])
def test_svdquant_layer_equals_comfy_kitchen(rank):
    w, b = _weight(96, 256, seed=3), torch.randn(96, generator=torch.Generator().manual_seed(4))
    smooth = torch.rand(256, generator=torch.Generator().manual_seed(5)) + 0.5
    layer = SVDQuantLinear.from_float(w, b, smooth, rank, compute_dtype=torch.float32)
    assert layer.weight.shape == (96, 128) and layer.weight_scale.shape == (4, 96)
    assert layer.weight_proj_down.shape == (256, rank) and layer.weight_proj_up.shape == (96, rank)
    x = _activations(24, 256, seed=6)
    theirs = _ck_svdquant(x, layer, b)
    ours = layer(x)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))
    # bf16 in and out, as the pipelines run it: comfy-kitchen's eager reference rounds its activation codes in
    # bf16 (ditq and the CUDA kernel in float32), so both are held to the float64 layer instead
    xb = x.to(torch.bfloat16)
    ref = xb.double() @ w.double().t() + b.double()
    ours_bf16 = layer.to(torch.bfloat16)(xb)
    assert ours_bf16.dtype == torch.bfloat16
    assert _rel(ours_bf16, ref) <= 1.05 * _rel(_ck_svdquant(xb, layer, b), ref)


def _ck_svdquant(x: torch.Tensor, layer: SVDQuantLinear, bias: torch.Tensor | None) -> torch.Tensor:
    """comfy-kitchen's eager SVDQuant layer, in the dtype of x."""
    dt = x.dtype
    q, ascales, lora = ck.quantize_svdquant_w4a4(
        x, layer.weight_smooth_factor.to(dt), layer.weight_proj_down.to(dt)
    )
    out = ck.scaled_mm_svdquant_w4a4(
        q,
        layer.weight,
        ascales,
        layer.weight_scale.to(dt),
        lora,
        layer.weight_proj_up.to(dt),
        None if bias is None else bias.to(dt),
    )
    return out[: x.shape[0]]


@eager_only
def test_svdquant_effective_weight_equals_comfy_kitchens_dequantize():
    from comfy_kitchen.tensor import TensorCoreSVDQuantW4A4Layout

    w = _weight(64, 128, seed=7)
    t = quantize_svdq(w, torch.rand(128, generator=torch.Generator().manual_seed(8)) + 0.5, 16)
    params = TensorCoreSVDQuantW4A4Layout.Params(
        scale=t["weight_scale"].float(),
        orig_dtype=torch.float32,
        orig_shape=(64, 128),
        proj_down=t["weight_proj_down"].float(),
        proj_up=t["weight_proj_up"].float(),
        smooth_factor=t["weight_smooth_factor"].float(),
    )
    theirs = TensorCoreSVDQuantW4A4Layout.dequantize(t["weight"], params)
    ours = SVDQuantFormat().dequantize(t)
    assert _rel(ours, theirs) < 1e-5
    assert _rel(ours, w) < 0.1


@eager_only
def test_convrot_w4a4_codes_and_layer_equal_comfy_kitchen():
    w, b = _weight(80, 512, seed=9), torch.randn(80, generator=torch.Generator().manual_seed(10))
    t = quantize_convrot_w4a4(w, 256)
    cq, cs = ck.quantize_convrot_w4a4_weight(w, 256, 64)
    assert torch.equal(t["weight"], cq)
    assert torch.allclose(t["weight_scale"], cs, rtol=1e-6, atol=0)
    layer = ConvRotW4A4Linear(t["weight"], t["weight_scale"], b, 256, torch.float32)
    back = ck.dequantize_convrot_w4a4_weight(cq, cs, 256, 64)
    assert torch.allclose(layer.dequantized_weight(), back, rtol=1e-5, atol=1e-6)
    x = _activations(24, 512, seed=11)
    theirs = ck.convrot_w4a4_linear(x, cq, cs, b, 256, 64)
    assert torch.allclose(layer(x), theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))
    xb = x.to(torch.bfloat16)  # bf16: each is held to the float64 layer (the eager reference rotates in bf16)
    ref = xb.double() @ w.double().t() + b.double()
    theirs_bf16 = ck.convrot_w4a4_linear(xb, cq, cs, b.to(torch.bfloat16), 256, 64)
    assert _rel(layer.to(torch.bfloat16)(xb), ref) <= 1.05 * _rel(theirs_bf16, ref)


def test_low_rank_branch_absorbs_planted_outlier_channels():
    """8 input channels carry weights 40x the rest: without the branch their per-group scales crush the other 56
    weights of their groups; a rank-32 branch keeps them in bf16 and the residual quantizes finely."""
    g = torch.Generator().manual_seed(12)
    w = torch.randn(192, 512, generator=g) * 0.02
    outliers = torch.tensor([5, 70, 140, 200, 260, 333, 400, 480])
    w[:, outliers] *= 40
    x = torch.randn(128, 512, generator=g)
    ref = x.double() @ w.double().t()
    errors = {}
    for rank in (0, 32):
        layer = SVDQuantLinear.from_float(w, rank=rank, compute_dtype=torch.float32)
        errors[rank] = _rel(layer(x), ref)
    assert errors[32] < 0.5 * errors[0], errors
    # the branch is the best rank-32 approximation: its leftover is the float64 SVD's tail
    up, v = low_rank(w, 32)
    tail = torch.linalg.svdvals(w.double())[32:]
    assert abs(float((w.double() - up.double() @ v.double().t()).norm()) - float(tail.norm())) < 1e-4


def test_randomized_low_rank_matches_exact_svd_on_a_wide_weight():
    g = torch.Generator().manual_seed(13)
    w = (torch.randn(2304, 40, generator=g) @ torch.randn(40, 2304, generator=g)) + 0.01 * torch.randn(
        2304, 2304, generator=g
    )
    up, v = low_rank(w, 32)
    exact = float(torch.linalg.svdvals(w.double())[32:].norm())
    assert float((w - up @ v.t()).norm()) < 1.01 * exact
    assert torch.equal(up, low_rank(w, 32)[0])  # seeded: reproducible


@pytest.mark.parametrize("fmt", ["svdq", "convrot"])
def test_fused_qkv_parts_compute_the_fused_rows(fmt):
    w = _weight(3 * 64, 256, seed=14)
    b = torch.randn(192, generator=torch.Generator().manual_seed(15))
    if fmt == "svdq":
        tensors, f = quantize_svdq(w, torch.rand(256) + 0.5, 16), SVDQuantFormat()
    else:
        tensors, f = quantize_convrot_w4a4(w, 256), ConvRotW4A4Format()
    tensors["bias"] = b
    x = _activations(10, 256, seed=16)
    fused = f.build(tensors, torch.float32)(x)
    parts = [{s: f.slice_rows(s, t, i, 3) for s, t in tensors.items()} for i in range(3)]
    outs = [f.build(p, torch.float32)(x) for p in parts]
    assert torch.equal(torch.cat(outs, dim=1), fused)
    joined = {s: f.join_rows(s, [p[s] for p in parts]) for s in tensors}
    assert all(torch.equal(joined[s], tensors[s]) for s in tensors)


def test_formats_are_detected_from_their_markers_and_int8_stays_int8():
    w = _weight(64, 256, seed=17)
    assert detect_format(quantize_svdq(w, None, 16)).name == "int4_svdquant"
    assert detect_format(quantize_convrot_w4a4(w, 64)).name == "int4_convrot"
    i8 = Int8Linear.from_float(w)
    tensors = {"weight": i8.weight, "weight_scale": i8.scales[:, None], "comfy_quant": marker_tensor()}
    assert detect_format(tensors).name == "int8"


def test_markers_are_comfyuis_json():
    t = quantize_convrot_w4a4(_weight(16, 128, seed=18), 64)
    want = json.dumps({"format": "convrot_w4a4", "convrot_groupsize": 64}).encode()
    assert bytes(t["comfy_quant"].tolist()) == want
    s = quantize_svdq(_weight(16, 128, seed=18), None, 8)
    conf = json.loads(bytes(s["comfy_quant"].tolist()))
    assert conf == {"format": "svdquant_w4a4", "group_size": 64, "rank": 8, "act_unsigned": False}


def _with_marker(tensors: dict, **conf) -> dict:
    out = dict(tensors)
    out["comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    return out


def test_unsupported_markers_and_bad_shapes_are_refused_by_name():
    w = _weight(32, 256, seed=19)
    c = quantize_convrot_w4a4(w, 256)
    with pytest.raises(CheckpointError, match="linear_dtype is 'int8'"):
        ConvRotW4A4Format().build(
            _with_marker(c, format="convrot_w4a4", convrot_groupsize=256, linear_dtype="int8"), torch.float32
        )
    with pytest.raises(CheckpointError, match="not a power of 4"):
        ConvRotW4A4Format().build(_with_marker(c, format="convrot_w4a4", convrot_groupsize=32), torch.float32)
    layer = ConvRotW4A4Format().build(
        _with_marker(c, format="convrot_w4a4", params={"convrot_groupsize": 64}), torch.float32
    )
    assert layer.group_size == 64  # read under "params" too, as ComfyUI does
    s = quantize_svdq(w, None, 8)
    with pytest.raises(CheckpointError, match="act_unsigned"):
        SVDQuantFormat().build(_with_marker(s, format="svdquant_w4a4", act_unsigned=True), torch.float32)
    bad = dict(s, weight_scale=s["weight_scale"].t().contiguous())
    with pytest.raises(
        CheckpointError, match=r"weight_scale is torch.bfloat16 \[32, 4\], expected .*\[4, 32\]"
    ):
        SVDQuantFormat().build(bad, torch.float32)


def test_storage_keeps_its_dtypes_through_to_and_offload_moves():
    layer = SVDQuantLinear.from_float(_weight(32, 128, seed=20), torch.randn(32), rank=8)
    layer.to(torch.float16)
    assert layer.weight_scale.dtype == torch.bfloat16 and layer.weight.dtype == torch.int8
    assert layer.bias.dtype == torch.float16 and layer.compute_dtype == torch.float16
    assert all(not p.requires_grad for p in layer.parameters())
    assert {n for n, _ in layer.named_parameters()} >= {"weight", "weight_scale", "weight_proj_down"}


@pytest.mark.parametrize("fmt", ["svdq", "convrot"])
def test_fake_tensors_and_fullgraph_compile(fmt):
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = _weight(64, 256, seed=21)
    layer = (
        SVDQuantLinear.from_float(w, rank=16, compute_dtype=torch.float32)
        if fmt == "svdq"
        else ConvRotW4A4Linear.from_float(w, compute_dtype=torch.float32)
    )
    x = _activations(5, 256, seed=22).reshape(1, 5, 256)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        y = layer(mode.from_tensor(x))
        assert y.shape == (1, 5, 64)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), layer(x))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["svdq", "convrot"])
def test_cuda_kernels_agree_with_the_cpu_path(fmt):
    w = _weight(256, 512, seed=23)
    x = _activations(300, 512, seed=24).to(torch.bfloat16)
    if fmt == "svdq":
        layer = SVDQuantLinear.from_float(w, torch.randn(256), torch.rand(512) + 0.5, 32, torch.bfloat16)
    else:
        layer = ConvRotW4A4Linear.from_float(w, torch.randn(256), 256, torch.bfloat16)
    want = layer(x).float()
    got = layer.to("cuda")(x.cuda()).float().cpu()
    assert _rel(got, want) < 2e-2
