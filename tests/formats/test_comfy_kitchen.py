"""ditq's CPU INT8 path agrees with comfy-kitchen's eager backend (the reference of the kernels ditq runs on CUDA):
activation codes within one rounding step, outputs within bf16 rounding, plain and ConvRot.

comfy-kitchen's eager quantizer divides in the input's dtype, so bf16 activations round to a neighbouring code now
and then (ditq divides in float32, like comfy-kitchen's CUDA kernels); from float32 activations the codes are the
same and the outputs agree to float32 rounding, so bf16 outputs agree within one bf16 rounding."""

from __future__ import annotations

import pytest
import torch

ck = pytest.importorskip("comfy_kitchen")

from ditq.formats.convrot import ConvRotInt8Linear, quantize_convrot  # noqa: E402
from ditq.formats.int8 import Int8Linear  # noqa: E402
from ditq.formats.int8_ops import quantize_per_token  # noqa: E402


def _eager():
    return ck.registry.is_available("eager") and not torch.cuda.is_available()


pytestmark = pytest.mark.skipif(
    not _eager(), reason="compares against comfy-kitchen's eager backend on the CPU"
)


def _activations(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4
    x[:, :3] *= 30  # outlier channels
    return x.to(torch.bfloat16)


def _close_in_bf16(layer, x: torch.Tensor, **ck_args) -> None:
    """Outputs from float32 activations agree to float32 rounding; cast to bf16, within one bf16 rounding."""
    xf = x.float()
    bias = None if layer.bias is None else layer.bias.float()
    ours = layer(xf)
    theirs = ck.int8_linear(xf, layer.weight, layer.scales, bias, out_dtype=torch.float32, **ck_args)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))
    a, b = ours.to(torch.bfloat16).float(), theirs.to(torch.bfloat16).float()
    assert ((a - b).abs() <= 2**-7 * b.abs() + 1e-6).all()  # at most one bf16 ulp apart


def test_activation_codes_within_one_rounding_step():
    x = _activations(48, 256, seed=0)
    q, s = quantize_per_token(x)
    cq, cs = ck.quantize_int8_rowwise(x)
    assert torch.allclose(s, cs.reshape(-1).float(), rtol=1e-6, atol=0)
    assert int((q.int() - cq.int()).abs().max()) <= 1
    assert float((q != cq).float().mean()) < 0.05  # ties and bf16 division only


def test_int8_linear_equals_comfy_kitchen_within_bf16():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(96, 256, generator=g), torch.randn(96, generator=g)
    layer = Int8Linear.from_float(w, b, compute_dtype=torch.bfloat16)
    _close_in_bf16(layer, _activations(40, 256, seed=2))


def test_convrot_layer_equals_comfy_kitchen_within_bf16():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 512, generator=g)
    q, s = quantize_convrot(w, 256)
    cq, cs = torch.ops.comfy_kitchen.quantize_int8_convrot_weight(w, 256)
    assert int((q.int() - cq.int()).abs().max()) <= 1  # the same rotated weight codes
    layer = ConvRotInt8Linear(q, s.reshape(-1), None, 256, compute_dtype=torch.bfloat16)
    _close_in_bf16(layer, _activations(24, 512, seed=4), convrot=True, convrot_groupsize=256)
