"""The on-disk INT8 layout: what ComfyUI's and stable-diffusion.cpp's readers expect, read back by ditq's loader."""

from __future__ import annotations

import json

import pytest
import torch

from ditq.errors import CheckpointError
from ditq.formats.base import detect_format
from ditq.formats.int8 import MARKER, Int8Linear, Int8TensorwiseFormat, marker_tensor
from ditq.formats.keys import split_to_fused
from ditq.io.safetensors_io import TensorSource, save_safetensors
from ditq.models.loading import load_transformer
from ditq.models.official import fp8_state_dict
from ditq.quant.api import quantize_
from ditq.quant.calibration import synthetic_inputs
from ditq.quant.int8 import Int8W8A8Config, convert_transformer_int8


def tiny_transformer(seed: int = 0):
    from diffusers import Ideogram4Transformer2DModel

    from ditq.models.tiny import TinySpec, transformer_config

    torch.manual_seed(seed)
    model = Ideogram4Transformer2DModel(**transformer_config(TinySpec())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return model


def write_fp8_component(model, folder):
    folder.mkdir(parents=True)
    model.save_config(folder)
    save_safetensors(folder / "diffusion_pytorch_model.safetensors", split_to_fused(fp8_state_dict(model)))
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8fmt")
    src = write_fp8_component(tiny_transformer(), root / "fp8" / "transformer")
    report = convert_transformer_int8(
        src, root / "int8" / "transformer", None, Int8W8A8Config(), progress=False
    )
    return src, root / "int8" / "transformer", report


def test_int8_file_has_the_comfyui_layout(converted):
    _, dst, report = converted
    st = TensorSource(dst)
    markers = [k[: -len(".comfy_quant")] for k in st.keys() if k.endswith(".comfy_quant")]
    assert sorted(markers) == report.quantized and "layers.0.attention.qkv" in markers
    for m in markers:
        conf = json.loads(bytes(st.get(f"{m}.comfy_quant").tolist()))
        assert conf == {"format": "int8_tensorwise"}
        n, k = st.info(f"{m}.weight").shape
        assert st.info(f"{m}.weight").dtype == torch.int8
        assert st.info(f"{m}.weight_scale").dtype == torch.float32 and st.info(f"{m}.weight_scale").shape == (
            n,
            1,
        )
        assert k % 32 == 0  # stable-diffusion.cpp repacks rows into Q8_0 blocks
    # stable-diffusion.cpp reads the same layers from the file-level metadata; ComfyUI accepts both
    layers = json.loads(st.metadata["_quantization_metadata"])["layers"]
    assert layers == {m: MARKER for m in markers}
    recipe = json.loads(st.metadata["ditq.recipe"])
    assert recipe["format"] == "int8" and recipe["quantized"] == sorted(markers)
    # official fused names, no prefix; protected conditioning layers and unaligned input_proj stay bf16
    assert "layers.0.attention.o.weight" in st and "embed_image_indicator.weight" in st
    assert not any(k.startswith("model.diffusion_model.") or ".to_q." in k for k in st.keys())
    assert st.info("layers.0.adaln_modulation.weight").dtype == torch.bfloat16
    assert st.info("input_proj.weight").dtype == torch.bfloat16 and "input_proj" in report.kept_float


def test_int8_file_loads_and_matches_in_memory_quantization(converted):
    src, dst, _ = converted
    # bf16 like the pipeline: the file's protected layers are bf16, and so are in-memory ones in a bf16 model
    loaded, counts = load_transformer(dst, torch.bfloat16)
    assert counts["int8"] == 16 and isinstance(loaded.layers[1].attention.to_v, Int8Linear)
    ref, _ = load_transformer(src, torch.bfloat16)
    mem = quantize_(ref, Int8W8A8Config(protect=(*Int8W8A8Config().protect, "input_proj")))
    for name, m in mem.named_modules():
        if isinstance(m, Int8Linear):
            other = loaded.get_submodule(name)
            assert torch.equal(m.qweight_t, other.qweight_t) and torch.equal(
                m.weight_scale, other.weight_scale
            )
    kw = synthetic_inputs(loaded.config, text_tokens=8, grid=(4, 4), dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(mem(**kw).sample, loaded(**kw).sample)


def test_int8_format_reads_comfyui_variants():
    fmt = Int8TensorwiseFormat()
    w = torch.randint(-127, 128, (6, 32), dtype=torch.int8)
    flat = {"weight": w, "weight_scale": torch.rand(6)}
    assert detect_format(flat) is not None and detect_format(flat).name == "int8"
    scalar = {"weight": w, "weight_scale": torch.tensor(0.5), "comfy_quant": marker_tensor()}
    assert torch.equal(fmt.dequantize(scalar), w.float() * 0.5)
    assert fmt.build(scalar, torch.float32).weight_scale.shape == (6,)
    rows = fmt.slice_rows("weight_scale", torch.rand(6, 1), 1, 3)
    assert rows.shape == (2, 1)
    rot = {
        "weight": w,
        "weight_scale": torch.rand(6, 1),
        "comfy_quant": marker_tensor({**MARKER, "convrot": True}),
    }
    with pytest.raises(CheckpointError, match="ConvRot"):
        fmt.build(rot, torch.float32)
    bad = {"weight": w, "weight_scale": torch.rand(6, 2)}
    with pytest.raises(CheckpointError, match=r"\[6, 1\]"):
        fmt.dequantize(bad)


def test_converting_an_int8_source_is_refused(converted, tmp_path):
    _, dst, _ = converted
    with pytest.raises(CheckpointError, match="already int8"):
        convert_transformer_int8(dst, tmp_path / "again", None, Int8W8A8Config(), progress=False)


def test_a_bf16_split_layout_source_converts_to_the_same_fused_file(tmp_path):
    model = tiny_transformer(3).to(torch.bfloat16)
    src = tmp_path / "bf16" / "transformer"
    src.mkdir(parents=True)
    model.save_config(src)
    save_safetensors(
        src / "diffusion_pytorch_model.safetensors", dict(model.state_dict())
    )  # to_q/to_k/to_v names
    report = convert_transformer_int8(
        src, tmp_path / "int8" / "transformer", None, Int8W8A8Config(), progress=False
    )
    assert "layers.1.attention.qkv" in report.quantized and "layers.1.attention.o" in report.quantized
    disk, _ = load_transformer(tmp_path / "int8" / "transformer", torch.bfloat16)
    mem = quantize_(
        load_transformer(src, torch.bfloat16)[0],
        Int8W8A8Config(protect=(*Int8W8A8Config().protect, "input_proj")),
    )
    for name, m in mem.named_modules():
        if isinstance(m, Int8Linear):
            assert torch.equal(m.qweight_t, disk.get_submodule(name).qweight_t), name
