"""Round trips on the tiny pipeline: files written the way each tool writes them are imported, loaded and generated
with, and compared to the FP8 source (identical where the layout is lossless); ditq's exports come back identical.

Two comparisons per lossy layout:
- transformer outputs on fixed random inputs against an independent reference: the tiny float model holding the
  weights as the tool itself decodes them (bitsandbytes, gguf-py, ComfyUI's `q * scale` and un-rotation). This is
  exact for weight-only formats; INT8 differs only by the per-token activation quantization of W8A8.
- the generated image against the FP8 source's image, by PSNR. Measured on this machine (64x64, 2 steps, fp32):
  NF4 39 dB, ComfyUI FP8 per-tensor 51 dB, INT8 W8A8 (plain / ConvRot) 53 dB, GGUF Q8_0 61 dB, Q4_K 55 dB. The
  thresholds sit about 6 dB below those (room for other BLAS / CPU kernels) and far above what a wrong load gives:
  a ConvRot file read without undoing the rotation scores 12 dB.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import torch

from ditq.interop.checkers import check_gguf
from ditq.interop.export import export
from ditq.interop.imports import build_pipeline
from ditq.interop.layouts import detect, read_checkpoint
from ditq.models.loading import load_transformer

from .builders import (
    comfy_int8_reference,
    fp8_per_tensor_reference,
    gguf_reference,
    nf4_reference,
    official_file,
    psnr,
    regular_hadamard,
    transformer_from_state,
    write_comfy_fp8_mixed,
    write_comfy_fp8_scaled,
    write_comfy_int8,
    write_fp8_variant,
    write_official_nf4,
    write_sdcpp_gguf,
    write_sharded,
)
from .conftest import TRANSFORMERS

PSNR_MIN = {"nf4": 33.0, "fp8-per-tensor": 45.0, "int8": 46.0, "gguf": 48.0}


def outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample.double()


def check_transformers(folder, tiny_pipe, inputs, reference, rtol: float) -> None:
    """Each imported transformer against the tiny float model holding `reference(component)` weights."""
    for comp in TRANSFORMERS:
        model, _ = load_transformer(folder / comp, dtype=torch.float32)
        ref = transformer_from_state(getattr(tiny_pipe, comp), reference(comp))
        a, b = outputs(model, inputs[comp]), outputs(ref, inputs[comp])
        err = float((a - b).norm() / b.norm())
        assert err <= rtol, (comp, err)


def test_official_fp8_sharded_and_column_scales_are_identical(
    tiny_fp8_dir, tmp_path, generate_image, source_image
):
    write_sharded(official_file(tiny_fp8_dir, "transformer"), tmp_path / "sharded", shards=3)
    uncond = tmp_path / "uncond.safetensors"
    write_fp8_variant(
        official_file(tiny_fp8_dir, "unconditional_transformer"),
        uncond,
        "scale_weight",
        column=True,
        split=False,
        prefix="",
    )
    assert detect(read_checkpoint(tmp_path / "sharded")).name == "official-fp8"
    out = build_pipeline(tmp_path / "sharded", tiny_fp8_dir, tmp_path / "pipe", uncond=uncond)
    assert len(list((out / "transformer").glob("*.safetensors"))) == 3
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert np.array_equal(generate_image(out), source_image)


def test_split_and_prefixed_fp8_are_identical(tiny_fp8_dir, tmp_path, generate_image, source_image):
    split, prefixed = tmp_path / "split.safetensors", tmp_path / "prefixed.safetensors"
    write_fp8_variant(official_file(tiny_fp8_dir, "transformer"), split, "weight_scale", False, True, "")
    write_fp8_variant(
        official_file(tiny_fp8_dir, "unconditional_transformer"),
        prefixed,
        "weight_scale",
        False,
        True,
        "model.diffusion_model.",
    )
    out = build_pipeline(split, tiny_fp8_dir, tmp_path / "pipe", "official-fp8", uncond=prefixed)
    assert np.array_equal(generate_image(out), source_image)


def test_official_nf4_from_bitsandbytes(
    tiny_fp8_dir, float_states, tiny_pipe, transformer_inputs, tmp_path, generate_image, source_image
):
    files = {
        "transformer": tmp_path / "ideogram4_nf4.safetensors",
        "unconditional_transformer": tmp_path / "ideogram4_nf4_unconditional.safetensors",
    }
    for comp, path in files.items():
        write_official_nf4(float_states[comp], path)
    out = build_pipeline(files["transformer"], tiny_fp8_dir, tmp_path / "pipe", "official-nf4")
    refs = {c: nf4_reference(p) for c, p in files.items()}  # the twin file was found by its name
    check_transformers(out, tiny_pipe, transformer_inputs, refs.__getitem__, rtol=1e-5)
    assert psnr(generate_image(out), source_image) >= PSNR_MIN["nf4"]


def test_comfyui_fp8_scaled_and_mixed(
    tiny_fp8_dir, float_states, tiny_pipe, transformer_inputs, tmp_path, generate_image, source_image
):
    legacy, mixed = tmp_path / "ideogram4_fp8_scaled.safetensors", tmp_path / "mixed.safetensors"
    write_comfy_fp8_scaled(float_states["transformer"], legacy)
    write_comfy_fp8_mixed(float_states["unconditional_transformer"], mixed)
    out = build_pipeline(legacy, tiny_fp8_dir, tmp_path / "pipe", "comfyui-fp8", uncond=mixed)
    refs = {
        "transformer": fp8_per_tensor_reference(legacy),
        "unconditional_transformer": fp8_per_tensor_reference(mixed),
    }
    # The E4M3 bytes and scales are kept: ditq computes exactly what ComfyUI's dequantization gives.
    check_transformers(out, tiny_pipe, transformer_inputs, refs.__getitem__, rtol=1e-6)
    rewritten = read_checkpoint(out / "transformer")
    assert not [n for n in rewritten.tensors if "scaled_fp8" in n or "comfy_quant" in n or "scale_input" in n]
    assert rewritten.tensors["layers.0.attention.qkv.weight_scale"].shape == (768,)
    assert psnr(generate_image(out), source_image) >= PSNR_MIN["fp8-per-tensor"]


def test_comfyui_int8_plain_and_convrot(
    tiny_fp8_dir, float_states, tiny_pipe, transformer_inputs, tmp_path, generate_image, source_image
):
    from ditq.formats.convrot import ConvRotInt8Linear

    plain, rotated = tmp_path / "ideogram4_int8.safetensors", tmp_path / "ideogram4_int8_convrot.safetensors"
    write_comfy_int8(float_states["transformer"], plain, convrot=False)
    layers = write_comfy_int8(float_states["unconditional_transformer"], rotated, convrot=True)
    assert any(c.get("convrot") for c in layers.values()) and any(
        not c.get("convrot") for c in layers.values()
    )
    out = build_pipeline(plain, tiny_fp8_dir, tmp_path / "pipe", "auto", uncond=rotated)
    refs = {
        "transformer": comfy_int8_reference(plain),
        "unconditional_transformer": comfy_int8_reference(rotated),
    }
    model, _ = load_transformer(out / "unconditional_transformer", dtype=torch.float32)
    rot = [m for m in model.modules() if isinstance(m, ConvRotInt8Linear)]
    assert rot, "ConvRot layers must run with rotated activations"
    # Weights: ditq's view of the rotated file equals ComfyUI's un-rotated dequantization.
    w_ref = refs["unconditional_transformer"]["layers.0.feed_forward.w1.weight"]
    w_ditq = model.layers[0].feed_forward.w1.dequantized_weight(torch.float32)
    assert float((w_ditq - w_ref).abs().max()) <= 1e-5 * float(w_ref.abs().max()), float(
        (w_ditq - w_ref).abs().max()
    )
    # Outputs: W8A8 differs from the dequantized-weight float model only by per-token activation rounding.
    check_transformers(out, tiny_pipe, transformer_inputs, refs.__getitem__, rtol=0.02)
    assert psnr(generate_image(out), source_image) >= PSNR_MIN["int8"]


def test_convrot_layer_matches_an_independent_w8a8_computation():
    """x -> x R (regular Hadamard per group of 256) -> per-token int8 -> integer GEMM -> both scales: exact."""
    from ditq.formats.convrot import ConvRotInt8Linear

    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 512, generator=g, dtype=torch.float64)
    h = torch.from_numpy(regular_hadamard(256))
    w_rot = (w.reshape(48, 2, 256) @ h.T).reshape(48, 512)
    s_w = w_rot.abs().amax(dim=1, keepdim=True) / 127
    q = torch.round(w_rot / s_w).clamp(-128, 127).to(torch.int8)
    layer = ConvRotInt8Linear(q, s_w.float(), None, 256, kernel="torch")
    x = torch.randn(7, 512, generator=g)
    x_rot = (x.double().reshape(7, 2, 256) @ h).reshape(7, 512).float().double()
    s_x = x_rot.abs().amax(dim=1, keepdim=True) / 127
    q_x = torch.round(x_rot / s_x).clamp(-127, 127)
    ref = (q_x @ q.double().T) * s_x * s_w.double().T.float().double()
    assert torch.allclose(layer(x).double(), ref, rtol=1e-5, atol=1e-6)


def test_sdcpp_gguf_without_metadata(
    tiny_fp8_dir, float_states, tiny_pipe, transformer_inputs, tmp_path, generate_image, source_image
):
    cond, uncond = tmp_path / "ideogram4-Q8_0.gguf", tmp_path / "ideogram4_uncond-Q4_K.gguf"
    write_sdcpp_gguf(float_states["transformer"], cond, "Q8_0")
    write_sdcpp_gguf(float_states["unconditional_transformer"], uncond, "Q4_K")
    reader = gguf.GGUFReader(cond)
    assert [f for f in reader.fields if not f.startswith("GGUF.")] == []
    assert check_gguf(cond, ("sdcpp",), tiny_fp8_dir / "transformer") == []
    out = build_pipeline(cond, tiny_fp8_dir, tmp_path / "pipe", "sdcpp-gguf", uncond=uncond)
    assert (out / "unconditional_transformer" / "diffusion_pytorch_model.gguf").is_file()
    refs = {"transformer": gguf_reference(cond), "unconditional_transformer": gguf_reference(uncond)}
    # diffusers' torch block decoders and gguf-py's numpy ones agree to float32 rounding.
    check_transformers(out, tiny_pipe, transformer_inputs, refs.__getitem__, rtol=1e-5)
    assert psnr(generate_image(out), source_image) >= PSNR_MIN["gguf"]


def test_gguf_export_comes_back_identical(ditq_q4k_dir, tiny_fp8_dir, tmp_path, generate_image, source_image):
    result = export(ditq_q4k_dir, tmp_path / "comfy", "comfyui", prefix="model.diffusion_model.")
    assert result.violations == []
    names = [t.name for t in gguf.GGUFReader(result.files["transformer"]).tensors]
    assert all(n.startswith("model.diffusion_model.") for n in names)
    assert result.files["unconditional_transformer"].name == "ideogram4-q4_k_unconditional.gguf"
    out = build_pipeline(result.files["transformer"], tiny_fp8_dir, tmp_path / "pipe")  # twin found by name
    record = json.loads((out / "ditq.json").read_text())
    assert record["imported"]["unconditional_transformer"]["layout"] == "sdcpp-gguf"
    image = generate_image(out)
    assert np.array_equal(image, generate_image(ditq_q4k_dir))
    assert psnr(image, source_image) >= PSNR_MIN["gguf"]


def test_int8_export_comes_back_identical(
    ditq_int8_dir, tiny_fp8_dir, tmp_path, generate_image, source_image
):
    from safetensors.torch import load_file

    result = export(ditq_int8_dir, tmp_path / "comfy", "comfyui")
    assert result.violations == []
    # Read the way ComfyUI reads it: the same weights as ditq's folder, dequantized independently.
    mine = load_file(ditq_int8_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    theirs = comfy_int8_reference(result.files["transformer"])
    for key, value in mine.items():
        if key.endswith(".weight") and value.dtype == torch.int8:
            scale = mine[key[: -len("weight")] + "weight_scale"]
            assert torch.equal(theirs[key], (value.double() * scale.double()).float()), key
    out = build_pipeline(result.files["transformer"], tiny_fp8_dir, tmp_path / "pipe")
    image = generate_image(out)
    assert np.array_equal(image, generate_image(ditq_int8_dir))
    assert psnr(image, source_image) >= PSNR_MIN["int8"]
