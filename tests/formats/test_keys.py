"""Fused <-> split key layouts, per-row scales, prefixes, and packed row slicing (NF4, GGUF) through the formats."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ditq.errors import CheckpointError
from ditq.formats.gguf import QTYPE_SUFFIX, GGUFBlockFormat
from ditq.formats.int8 import Int8TensorwiseFormat, marker_tensor
from ditq.formats.keys import (
    add_prefix,
    detect_layout,
    find_prefix,
    fused_module_name,
    fused_to_split,
    split_module_name,
    split_to_fused,
    strip_prefix,
)
from ditq.formats.nf4 import NF4Format

H, K = 8, 64


def _fused_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "layers.0.attention.qkv.weight": torch.randn(3 * H, K, generator=g).to(torch.float8_e4m3fn),
        "layers.0.attention.qkv.weight_scale": torch.rand(3 * H, generator=g),
        "layers.0.attention.o.weight": torch.randn(H, H, generator=g),
        "layers.0.attention.o.weight_scale": torch.rand(H, 1, generator=g),
        "layers.0.attention.norm_q.weight": torch.rand(4, generator=g),
        "layers.0.feed_forward.w1.weight": torch.randn(16, K, generator=g),
        "input_proj.bias": torch.randn(H, generator=g),
    }


def test_fused_to_split_slices_rows_of_weights_and_scales():
    g = torch.Generator().manual_seed(0)
    fused = _fused_state(g)
    split = fused_to_split(add_prefix(fused, "model.diffusion_model."))
    w = fused["layers.0.attention.qkv.weight"].view(torch.uint8)
    s = fused["layers.0.attention.qkv.weight_scale"]
    for i, part in enumerate("qkv"):
        rows = slice(i * H, (i + 1) * H)
        assert torch.equal(split[f"layers.0.attention.to_{part}.weight"].view(torch.uint8), w[rows])
        assert torch.equal(split[f"layers.0.attention.to_{part}.weight_scale"], s[rows])
    assert torch.equal(
        split["layers.0.attention.to_out.0.weight_scale"], fused["layers.0.attention.o.weight_scale"]
    )
    assert "layers.0.attention.norm_q.weight" in split and "input_proj.bias" in split
    assert not any(k.startswith("model.") for k in split)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_split_to_fused_round_trip_is_lossless(prefix):
    fused = _fused_state(torch.Generator().manual_seed(1))
    back = split_to_fused(fused_to_split(fused), prefix=prefix)
    assert set(back) == {prefix + k for k in fused}
    for k, v in fused.items():
        got = back[prefix + k]
        assert got.dtype == v.dtype and torch.equal(got.view(torch.uint8), v.view(torch.uint8))
    assert find_prefix(back) == prefix
    assert {strip_prefix(k) for k in back} == set(fused)


def test_comfy_markers_are_copied_to_each_part_and_back():
    marker = marker_tensor({"format": "int8_tensorwise"})
    state = {
        "layers.0.attention.qkv.weight": torch.randint(-127, 128, (3 * H, K), dtype=torch.int8),
        "layers.0.attention.qkv.weight_scale": torch.rand(3 * H, 1),
        "layers.0.attention.qkv.comfy_quant": marker,
    }
    fmt = Int8TensorwiseFormat()
    split = fused_to_split(state, row_slicer=fmt.slice_rows)
    for part in "qkv":
        assert torch.equal(split[f"layers.0.attention.to_{part}.comfy_quant"], marker)
        assert split[f"layers.0.attention.to_{part}.weight_scale"].shape == (H, 1)
    back = split_to_fused(split, row_joiner=fmt.join_rows)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_module_names_map_both_ways():
    assert split_module_name("layers.3.attention.qkv") == [f"layers.3.attention.to_{p}" for p in "qkv"]
    assert split_module_name("layers.3.attention.o") == ["layers.3.attention.to_out.0"]
    assert fused_module_name("layers.3.attention.to_v") == "layers.3.attention.qkv"
    assert fused_module_name("layers.3.attention.to_out.0") == "layers.3.attention.o"
    assert fused_module_name("final_layer.linear") == "final_layer.linear"


def test_mixed_fused_and_split_names_are_refused():
    names = ["layers.0.attention.qkv.weight", "layers.1.attention.to_q.weight"]
    with pytest.raises(CheckpointError, match="mixes fused"):
        detect_layout(names)
    assert detect_layout(["input_proj.weight"]) == "neutral"


def test_split_to_fused_names_the_missing_part():
    split = fused_to_split(_fused_state(torch.Generator().manual_seed(2)))
    del split["layers.0.attention.to_k.weight"]
    with pytest.raises(CheckpointError, match="to_k.weight is missing"):
        split_to_fused(split)


def test_partial_prefix_is_refused():
    assert find_prefix(["a.weight", "b.weight"]) == ""
    with pytest.raises(CheckpointError, match="only some tensor names"):
        find_prefix(["model.diffusion_model.a.weight", "b.weight"])


def test_nf4_rows_slice_and_join_through_the_format():
    """qkv packed by bitsandbytes itself: each slice dequantizes to exactly the rows of the whole."""
    from bitsandbytes.functional import QuantState, dequantize_4bit, quantize_4bit

    w = torch.randn(3 * H, K, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    packed, qs = quantize_4bit(w, blocksize=64, quant_type="nf4")
    tensors = {"weight": packed, **{f"weight.{k}": v for k, v in qs.as_dict(packed=True).items()}}
    whole = dequantize_4bit(packed, qs).float()
    fmt = NF4Format()
    state = {f"layers.0.attention.qkv.{s}": t for s, t in tensors.items()}
    split = fused_to_split(state, row_slicer=fmt.slice_rows)
    for i, part in enumerate("qkv"):
        prefix = f"layers.0.attention.to_{part}."
        mine = {k[len(prefix) :]: v for k, v in split.items() if k.startswith(prefix)}
        part_qs = QuantState.from_dict(
            {k[len("weight.") :]: v for k, v in mine.items() if k != "weight"}, torch.device("cpu")
        )
        assert tuple(part_qs.shape) == (H, K)
        assert torch.equal(dequantize_4bit(mine["weight"], part_qs).float(), whole[i * H : (i + 1) * H])
    joined = split_to_fused(split, row_joiner=fmt.join_rows)
    for k, v in state.items():
        assert torch.equal(joined[k], v), k


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_gguf_rows_slice_and_join_through_the_format(qtype):
    """Raw GGUF rows sliced per projection decode (with gguf-py) to exactly the rows of the whole."""
    from ditq.gguf import quantize

    q = gguf.GGMLQuantizationType[qtype]
    w = np.random.default_rng(4).standard_normal((3 * H, 256)).astype(np.float32)
    raw = torch.from_numpy(quantize(w, q))
    whole = gguf.quants.dequantize(raw.numpy(), q)
    state = {
        "layers.0.attention.qkv.weight": raw,
        f"layers.0.attention.qkv.{QTYPE_SUFFIX}": torch.tensor(int(q)),
    }
    fmt = GGUFBlockFormat()
    split = fused_to_split(state, row_slicer=fmt.slice_rows)
    for i, part in enumerate("qkv"):
        rows = split[f"layers.0.attention.to_{part}.weight"]
        assert int(split[f"layers.0.attention.to_{part}.{QTYPE_SUFFIX}"]) == int(q)
        np.testing.assert_array_equal(gguf.quants.dequantize(rows.numpy(), q), whole[i * H : (i + 1) * H])
    joined = split_to_fused(split, row_joiner=fmt.join_rows)
    assert torch.equal(joined["layers.0.attention.qkv.weight"], raw)
    mixed = dict(split)
    mixed[f"layers.0.attention.to_v.{QTYPE_SUFFIX}"] = torch.tensor(int(gguf.GGMLQuantizationType.Q6_K))
    with pytest.raises(CheckpointError, match="differ"):
        split_to_fused(mixed, row_joiner=fmt.join_rows)
