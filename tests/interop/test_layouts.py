"""Layout detection from file headers, and clear errors for files no loader would read."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditq.errors import CheckpointError
from ditq.interop.imports import import_transformer, inspect_source
from ditq.interop.layouts import LAYOUTS, detect, read_checkpoint, validate

from .builders import (
    official_file,
    to_split,
    write_comfy_fp8_mixed,
    write_comfy_fp8_scaled,
    write_comfy_int8,
    write_official_nf4,
    write_sdcpp_gguf,
    write_sharded,
)


@pytest.fixture(scope="module")
def files(tiny_fp8_dir, float_states, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    state = float_states["transformer"]
    src = official_file(tiny_fp8_dir, "transformer")
    write_sharded(src, root / "sharded")
    write_official_nf4(state, root / "nf4.safetensors")
    write_comfy_fp8_scaled(state, root / "fp8_scaled.safetensors")
    write_comfy_fp8_mixed(state, root / "fp8_mixed.safetensors")
    write_comfy_int8(state, root / "int8.safetensors", convrot=False)
    write_comfy_int8(state, root / "int8_convrot.safetensors", convrot=True)
    write_sdcpp_gguf(state, root / "sdcpp.gguf")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, root / "bf16.safetensors")
    return {
        "official-fp8": [src, root / "sharded"],
        "official-nf4": [root / "nf4.safetensors"],
        "comfyui-fp8": [root / "fp8_scaled.safetensors", root / "fp8_mixed.safetensors"],
        "comfyui-int8": [root / "int8.safetensors", root / "int8_convrot.safetensors"],
        "sdcpp-gguf": [root / "sdcpp.gguf"],
        "bf16": [root / "bf16.safetensors"],
        "root": root,
    }


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_detect_recognizes_each_layout(files, layout):
    for path in files[layout]:
        ckpt = read_checkpoint(path)
        validate(ckpt)
        assert detect(ckpt).name == layout, path


def test_unknown_layout_names_every_layout_tried_and_what_it_lacked(files):
    with pytest.raises(CheckpointError) as err:
        inspect_source(files["bf16"][0])
    msg = str(err.value)
    for name in LAYOUTS:
        assert name in msg
    assert "official-fp8: no F8_E4M3 Linear weights" in msg and "sdcpp-gguf: not a GGUF file" in msg
    assert "official-nf4: no bitsandbytes" in msg and "comfyui-int8: no I8" in msg


def test_wrong_from_says_what_is_missing(files):
    with pytest.raises(CheckpointError, match=r"not in the comfyui-int8 layout: no I8"):
        inspect_source(files["comfyui-fp8"][0], "comfyui-int8")


def _rewritten(src, dst, edit):
    raw = load_file(src)
    edit(raw)
    save_file(raw, dst)
    return dst


def test_mixed_fused_and_split_keys_are_refused(files, tmp_path):
    def edit(raw):
        split = to_split({k: v for k, v in raw.items() if k.startswith("layers.1.")})
        for k in [k for k in raw if k.startswith("layers.1.")]:
            del raw[k]
        raw.update(split)

    path = _rewritten(files["official-fp8"][0], tmp_path / "mixed.safetensors", edit)
    with pytest.raises(CheckpointError, match="mixes fused"):
        inspect_source(path)


def test_scale_without_weight_is_refused(files, tmp_path):
    path = _rewritten(
        files["official-fp8"][0],
        tmp_path / "orphan.safetensors",
        lambda r: r.pop("layers.0.feed_forward.w1.weight"),
    )
    with pytest.raises(CheckpointError, match=r"layers.0.feed_forward.w1.weight_scale has no weight"):
        inspect_source(path)


def test_quantized_weight_without_scale_is_refused(files, tmp_path):
    path = _rewritten(
        files["official-fp8"][0],
        tmp_path / "unscaled.safetensors",
        lambda r: r.pop("layers.0.attention.o.weight_scale"),
    )
    with pytest.raises(CheckpointError, match=r"layers.0.attention.o.weight is F8_E4M3 but has no"):
        inspect_source(path)


def test_nf4_state_without_packed_weight_is_refused(files, tmp_path):
    path = _rewritten(
        files["official-nf4"][0],
        tmp_path / "nf4.safetensors",
        lambda r: r.pop("layers.0.feed_forward.w2.weight"),
    )
    with pytest.raises(CheckpointError, match=r"has no packed weight layers.0.feed_forward.w2.weight"):
        inspect_source(path)


def test_partial_prefix_is_refused(files, tmp_path):
    def edit(raw):
        raw["input_proj.bias"] = raw.pop("model.diffusion_model.input_proj.bias")

    path = _rewritten(files["comfyui-int8"][0], tmp_path / "partial.safetensors", edit)
    with pytest.raises(CheckpointError, match="only some tensor names carry"):
        inspect_source(path)


def test_int8_layer_without_marker_or_metadata_is_refused(files, tmp_path):
    raw = load_file(files["comfyui-int8"][0])
    raw.pop("model.diffusion_model.layers.0.feed_forward.w1.comfy_quant")
    save_file(raw, tmp_path / "nomarker.safetensors")  # and no _quantization_metadata
    with pytest.raises(
        CheckpointError, match=r"layers.0.feed_forward.w1.weight is int8 but has no comfy_quant"
    ):
        import_transformer(tmp_path / "nomarker.safetensors", tmp_path / "out")


def test_convrot_group_size_that_is_not_a_power_of_four_is_refused(files, tmp_path):
    from ditq.models.loading import load_transformer

    def edit(raw):
        key = "model.diffusion_model.layers.0.feed_forward.w1.comfy_quant"
        conf = b'{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 128}'
        raw[key] = torch.tensor(list(conf), dtype=torch.uint8)

    path = _rewritten(files["comfyui-int8"][1], tmp_path / "g128.safetensors", edit)
    comp = tmp_path / "comp"
    import_transformer(path, comp)
    shutil.copy2(files["official-fp8"][0].parent / "config.json", comp / "config.json")
    with pytest.raises(CheckpointError, match="not a power of 4"):
        load_transformer(comp)


@pytest.mark.parametrize(
    ("cond", "uncond"),
    [
        ("ideogram4-q4_k.gguf", "ideogram4-q4_k_unconditional.gguf"),
        ("ideogram4-Q8_0.gguf", "ideogram4_uncond-Q8_0.gguf"),
        ("ideogram4_fp8_scaled.safetensors", "ideogram4_unconditional_fp8_scaled.safetensors"),
        ("ideogram4_int8.safetensors", None),
    ],
)
def test_unconditional_twin_is_found_by_name(tmp_path, cond, uncond):
    from ditq.interop.imports import find_unconditional

    (tmp_path / cond).touch()
    if uncond:
        (tmp_path / uncond).touch()
    (tmp_path / "unrelated_unconditional.gguf").touch()
    found = find_unconditional(tmp_path / cond)
    assert (found.name if found else None) == uncond


def test_unsupported_comfy_formats_and_dtypes_are_named(tmp_path):
    marker = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    w1 = "layers.0.feed_forward.w1"
    save_file(
        {
            f"{w1}.weight": torch.zeros(8, 32, dtype=torch.uint8),
            f"{w1}.weight_scale": torch.zeros(8, 4, dtype=torch.float8_e4m3fn),
            f"{w1}.weight_scale_2": torch.tensor(1.0),
            f"{w1}.comfy_quant": marker,
            "layers.0.feed_forward.w2.weight": torch.zeros(4, 8, dtype=torch.float8_e5m2),
        },
        tmp_path / "nvfp4.safetensors",
    )
    with pytest.raises(CheckpointError, match=r"weights: 1 F8_E5M2, 1 U8; comfy_quant formats: nvfp4"):
        inspect_source(tmp_path / "nvfp4.safetensors")
