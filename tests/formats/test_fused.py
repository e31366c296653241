"""Fused INT8 projections: q/k/v (and w1/w3) quantize their shared input once and run one GEMM, with outputs equal
bit for bit to the separate layers'; it compiles with fullgraph=True."""

from __future__ import annotations

import torch
from torch import nn

from ditq.formats import int8_ops
from ditq.formats.fused import FusedInt8Linear, Int8Part, fuse_int8_projections_
from ditq.formats.int8 import Int8Linear


class _Attention(nn.Module):
    """The call pattern of diffusers' Ideogram 4 attention: to_q, to_k, to_v on one input."""

    def __init__(self, k: int, n: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        s = torch.rand(k, generator=g) + 0.5
        for name in ("to_q", "to_k", "to_v"):
            setattr(self, name, Int8Linear.from_float(torch.randn(n, k, generator=g), None, s))

    def forward(self, x):
        return self.to_q(x) * self.to_k(x) + self.to_v(x)


def _separate_outputs(attn: _Attention, x: torch.Tensor) -> list[torch.Tensor]:
    return [getattr(attn, n)(x) for n in ("to_q", "to_k", "to_v")]


def test_fused_parts_equal_the_separate_layers_and_quantize_once():
    for shape in ((5, 64), (600, 512)):  # the torch path and the numba path
        attn = _Attention(shape[1], 96, seed=shape[0])
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        int8_ops.CALLS.clear()
        want = _separate_outputs(attn, x)
        assert int8_ops.CALLS["quantize"] == 3 and int8_ops.CALLS["int8_linear"] == 3
        originals = [attn.to_q.dequantized_weight(), attn.to_v.dequantized_weight()]
        assert fuse_int8_projections_(attn) == 1
        assert isinstance(attn.to_qkv, FusedInt8Linear) and isinstance(attn.to_k, Int8Part)
        assert torch.equal(attn.to_q.dequantized_weight(), originals[0])
        assert torch.equal(attn.to_v.dequantized_weight(), originals[1])
        int8_ops.CALLS.clear()
        got = _separate_outputs(attn, x)
        assert int8_ops.CALLS["quantize"] == 1 and int8_ops.CALLS["int8_linear"] == 1
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        assert attn.to_qkv._handover is None  # released once every part took its slice
        # the parts hold no storage: the fused layer's parameters are the only ones
        assert [n for n, _ in attn.named_parameters()] == [
            "to_qkv.weight",
            "to_qkv.weight_scale",
            "to_qkv.inv_smooth",
        ]


def test_a_new_input_is_not_served_the_previous_output():
    attn = _Attention(64, 32, seed=3)
    fuse_int8_projections_(attn)
    x1, x2 = torch.randn(4, 64), torch.randn(4, 64)
    q1 = attn.to_q(x1)
    assert not torch.equal(attn.to_k(x2), attn.to_k(x1))
    x1.mul_(2)  # the same tensor, changed in place: computed anew
    assert not torch.equal(attn.to_q(x1), q1)


def test_fused_projection_compiles_with_fullgraph():
    attn = _Attention(128, 64, seed=4)
    fuse_int8_projections_(attn)
    x = torch.randn(8, 128)
    want = attn(x)
    compiled = torch.compile(attn, fullgraph=True, backend="inductor")
    int8_ops.CALLS.clear()
    assert torch.equal(compiled(x), want)
    assert int8_ops.CALLS["int8_linear"] == 1
