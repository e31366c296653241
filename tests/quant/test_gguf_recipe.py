"""GGUF recipes end to end on the tiny pipeline, each checked against a reference that does not go through ditq.

The file is read with gguf-py's `GGUFReader` and decoded with `gguf.quants.dequantize`; the source weights are
dequantized here from the FP8 safetensors with `safetensors` (`w.float() * scale[:, None]`, already fused); which
tensor gets which type is written out below from stable-diffusion.cpp's documented rule and ComfyUI-GGUF's F32 rule.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, LlamaFileType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ditq.errors import CheckpointError, ConfigError
from ditq.gguf import quantize as ditq_quantize
from ditq.models.loading import pipeline_info
from ditq.quant.recipes.gguf import GGUFRecipe
from ditq.quant.writer import quantize_pipeline

TRANSFORMERS = ("transformer", "unconditional_transformer")
WEIGHTS = "diffusion_pytorch_model.safetensors"
GGUF_FILE = "diffusion_pytorch_model.gguf"
# stable-diffusion.cpp's Ideogram 4 conversion quantizes exactly these weights
SD_CPP_RULE = re.compile(r"^layers\.\d+\.(adaln_modulation|attention\.(qkv|o)|feed_forward\.w[123])\.weight$")
# ... and llama.cpp's `_M` mixes move v (inside the fused qkv) and the FFN down projection (w2) one level up
MIX_UP = re.compile(r"^layers\.\d+\.(attention\.qkv|feed_forward\.w2)\.weight$")
# (bits per code, relative Frobenius error allowed): llama.cpp's reference quantizer reaches 0.0713 (Q4_K) and
# 0.0361 (Q5_K) on Gaussian weights; the tiny model's uniform weights come out at 0.055 and 0.028.
KQUANT = {Q.Q4_K: (4, 0.08), Q.Q5_K: (5, 0.04), Q.Q8_0: (8, 0.01)}
# Image PSNR (dB) against the FP8 pipeline's image, same prompt and seed. Measured on 2 CPU cores: q4_k 51.8,
# q4_k_m 52.0; the same FP8 pipeline from another seed scores 18.2, so 40 dB leaves ~12 dB of margin for
# platform differences while failing anything that perturbs the image visibly.
PSNR_MIN = 40.0
PROMPT = "a red fox in the snow"
NO_PROGRESS = {"progress": False}


def fp8_reference(component: Path) -> dict[str, np.ndarray]:
    """Every tensor of an official FP8 component as float32, FP8 weights dequantized with their row scales."""
    out = {}
    with safe_open(component / WEIGHTS, "pt") as f:
        keys = set(f.keys())
        for key in keys:
            if key.endswith(".weight_scale"):
                continue
            t = f.get_tensor(key)
            if t.dtype == torch.float8_e4m3fn:
                t = t.float() * f.get_tensor(key[: -len("weight")] + "weight_scale").float()[:, None]
            out[key] = t.float().numpy()
    return out


def expected_type(name: str, shape: tuple[int, ...], base: Q, mix: bool) -> Q:
    if len(shape) <= 1 or math.prod(shape) <= 1024:
        return Q.F32
    if SD_CPP_RULE.match(name):
        wanted = Q.Q5_K if mix and MIX_UP.match(name) and base == Q.Q4_K else base
        return wanted if shape[-1] % 256 == 0 else Q.Q8_0
    return Q.BF16


def numpy_shape(t) -> tuple[int, ...]:
    """gguf-py lists dimensions innermost first; numpy order is the reverse."""
    return tuple(int(d) for d in reversed(t.shape))


def assert_within_kquant_error(decoded: np.ndarray, ref: np.ndarray, qtype: Q, name: str) -> None:
    """Each 32-value sub-block is within 1.5 quantization steps ((max - min) / (2^bits - 1)) of the source (the
    6-bit sub-block scales cost up to half a step more than rounding), and the tensor within the type's usual
    relative Frobenius error."""
    bits, rel_max = KQUANT[qtype]
    blocks = ref.reshape(-1, 32)
    step = (blocks.max(1) - blocks.min(1)) / (2**bits - 1)
    if qtype == Q.Q8_0:  # symmetric: 255 levels over [-absmax, absmax]
        step = 2 * np.abs(blocks).max(1) / 255
    err = np.abs(decoded - ref).reshape(-1, 32).max(1)
    assert (err <= 1.5 * step + 1e-12).all(), f"{name}: {(err / step).max():.2f} steps off"
    rel = np.linalg.norm(decoded - ref) / np.linalg.norm(ref)
    assert rel < rel_max, f"{name}: relative error {rel:.4f}"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def q4k_dir(tiny_fp8_dir, tmp_path_factory) -> Path:
    return quantize_pipeline(
        str(tiny_fp8_dir), "q4_k", tmp_path_factory.mktemp("gguf") / "q4_k", progress=False
    )


@pytest.fixture(scope="module")
def fp8_image(tiny_fp8_dir, tiny_settings) -> np.ndarray:
    from ditq.models.loading import load_pipeline
    from ditq.models.sampling import generate

    return np.asarray(generate(load_pipeline(tiny_fp8_dir), PROMPT, 0, tiny_settings))


def check_gguf_against_source(folder: Path, source: Path, base: Q, mix: bool) -> dict[str, int]:
    """The GGUF files of `folder` hold exactly the source tensors, typed by the rule, with reference bytes."""
    types: dict[str, int] = {}
    for comp in TRANSFORMERS:
        reader = GGUFReader(folder / comp / GGUF_FILE)
        ref = fp8_reference(source / comp)
        assert sorted(t.name for t in reader.tensors) == sorted(ref)
        for t in reader.tensors:
            src = ref[t.name]
            shape = numpy_shape(t)
            assert shape == src.shape, t.name
            assert t.tensor_type == expected_type(t.name, shape, base, mix), t.name
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
            decoded = gguf_dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
            if t.tensor_type == Q.F32:
                np.testing.assert_array_equal(decoded, src, err_msg=t.name)
            elif t.tensor_type == Q.BF16:
                rounded = torch.from_numpy(src).to(torch.bfloat16).float().numpy()
                np.testing.assert_array_equal(decoded, rounded, err_msg=t.name)
            else:
                data = np.asarray(t.data).reshape(shape[0], -1)
                np.testing.assert_array_equal(data, ditq_quantize(src, t.tensor_type), err_msg=t.name)
                assert_within_kquant_error(decoded, src, t.tensor_type, t.name)
    return types


def test_q4_k_file_is_read_by_gguf_py_with_official_names_and_metadata(q4k_dir, tiny_fp8_dir):
    for comp in TRANSFORMERS:
        reader = GGUFReader(q4k_dir / comp / GGUF_FILE)
        fields = {name: f.contents() for name, f in reader.fields.items()}
        assert fields["general.architecture"] == "ideogram"
        assert fields["general.file_type"] in (LlamaFileType.MOSTLY_Q4_K_S, LlamaFileType.MOSTLY_Q4_K_M)
        assert fields["general.quantization_version"] == 2
        names = {t.name for t in reader.tensors}
        # stable-diffusion.cpp recognizes Ideogram 4 by this tensor; ComfyUI-GGUF by the next three
        assert {
            "embed_image_indicator.weight",
            "t_embedding.mlp_in.weight",
            "final_layer.linear.weight",
        } <= names
        assert "layers.0.attention.qkv.weight" in names and "layers.0.attention.o.weight" in names
        assert not any(n.startswith("model.diffusion_model.") or "to_q" in n or "scale" in n for n in names)
    recorded = json.loads((q4k_dir / "ditq.json").read_text())
    assert recorded["formats"]["transformer"] == "gguf" and recorded["variant"] == "q4_k"
    assert not (q4k_dir.parent / "q4_k.partial").exists()


def test_q4_k_tensors_follow_the_rule_and_equal_the_codec_of_the_reference(q4k_dir, tiny_fp8_dir):
    types = check_gguf_against_source(q4k_dir, tiny_fp8_dir, Q.Q4_K, mix=False)
    # per transformer: 2 blocks x (qkv, o, w1, w2, w3, adaLN) quantized; 7 other 2-D weights in bf16
    assert types == {"Q4_K": 24, "BF16": 14, "F32": 46}


def test_q4_k_m_moves_qkv_and_ffn_down_to_q5_k(tiny_fp8_dir, tmp_path):
    out = quantize_pipeline(str(tiny_fp8_dir), "q4_k_m", tmp_path / "q4_k_m", progress=False)
    types = check_gguf_against_source(out, tiny_fp8_dir, Q.Q4_K, mix=True)
    assert types == {"Q4_K": 16, "Q5_K": 8, "BF16": 14, "F32": 46}
    reader = GGUFReader(out / "transformer" / GGUF_FILE)
    assert reader.fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q4_K_M


def test_q4_k_pipeline_loads_and_generates_close_to_fp8(q4k_dir, tiny_settings, fp8_image):
    from ditq.models.loading import load_pipeline
    from ditq.models.sampling import generate

    pipe = load_pipeline(q4k_dir)
    # 2 blocks x (to_q, to_k, to_v, to_out.0, w1, w2, w3, adaln_modulation)
    assert pipeline_info(pipe).formats["transformer"].get("gguf") == 2 * 8
    # the loaded q/k/v rows are gguf-py's decoding of the fused qkv rows
    reader = GGUFReader(q4k_dir / "transformer" / GGUF_FILE)
    qkv = next(t for t in reader.tensors if t.name == "layers.1.attention.qkv.weight")
    decoded = torch.from_numpy(
        gguf_dequantize(np.asarray(qkv.data), qkv.tensor_type).reshape(numpy_shape(qkv))
    )
    attn = pipe.transformer.layers[1].attention
    loaded = torch.cat([m.dequantized_weight(torch.float32) for m in (attn.to_q, attn.to_k, attn.to_v)])
    torch.testing.assert_close(loaded, decoded, rtol=0, atol=0)

    image = np.asarray(generate(pipe, PROMPT, 0, tiny_settings))
    value = psnr(image, fp8_image)
    print(f"q4_k image PSNR vs FP8: {value:.2f} dB")
    assert value > PSNR_MIN


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0])
def test_gguf_linear_weight_is_gguf_py_decoding_bit_for_bit(qtype):
    from ditq.formats.gguf import GGUFLinear

    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((48, 512)) * 0.02).astype(np.float32)
    raw = ditq_quantize(x, qtype)
    layer = GGUFLinear(torch.from_numpy(raw), qtype, None, torch.bfloat16)
    assert (layer.out_features, layer.in_features) == (48, 512)
    np.testing.assert_array_equal(
        layer.dequantized_weight(torch.float32).numpy(), gguf_dequantize(raw, qtype)
    )


def _overhead_gguf(path: Path) -> int:
    """Bytes of a GGUF file that are not tensor data: header, metadata, tensor infos, alignment padding."""
    reader = GGUFReader(path)
    return path.stat().st_size - sum(int(t.n_bytes) for t in reader.tensors)


def _inspect(folder: Path, capsys) -> dict:
    from ditq.cli import main

    assert main(["inspect", str(folder), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_q4_k_files_match_the_prediction_within_header_overhead(q4k_dir, capsys):
    report = _inspect(q4k_dir, capsys)
    assert report["format"] == "gguf"
    for comp in TRANSFORMERS:
        row = report["components"][comp]
        size = row["files"][GGUF_FILE]
        assert size == (q4k_dir / comp / GGUF_FILE).stat().st_size
        predicted = row["predicted_bytes"]  # from the meta-device model's shapes
        assert predicted == row["bytes"]["q4_k"]  # the size table agrees with the folder's prediction
        assert predicted + _overhead_gguf(q4k_dir / comp / GGUF_FILE) == size
        assert size - predicted < 16 * 1024


def test_tensor_type_falls_back_to_q8_0_then_bf16():
    recipe = GGUFRecipe(type="q4_k")
    w1 = "layers.3.feed_forward.w1.weight"
    assert recipe.tensor_type(w1, (12288, 4608)) == (Q.Q4_K, "")
    qtype, note = recipe.tensor_type(w1, (512, 320))  # 320 = 10 x 32, not a multiple of 256
    assert qtype == Q.Q8_0 and "320" in note
    qtype, note = recipe.tensor_type(w1, (512, 300))  # not a multiple of 32 either
    assert qtype == Q.BF16 and "300" in note
    mixed = GGUFRecipe(type="q4_k", mix=True)
    assert mixed.name == "q4_k_m"
    assert mixed.tensor_type("layers.3.attention.qkv.weight", (768, 256))[0] == Q.Q5_K
    assert mixed.tensor_type("layers.3.attention.o.weight", (256, 256))[0] == Q.Q4_K
    assert recipe.tensor_type("layers.3.adaln_modulation.bias", (1024,))[0] == Q.F32
    assert recipe.tensor_type("llm_cond_proj.weight", (4608, 53248))[0] == Q.BF16
    assert recipe.tensor_type("embed_image_indicator.weight", (2, 256))[0] == Q.F32  # <= 1024 elements


def _narrow_ffn(component: Path, width: int) -> None:
    """Rewrite an FP8 transformer with feed-forward width `width` (w1/w3 rows and w2 columns cut)."""
    state = load_file(component / WEIGHTS)
    for key in list(state):
        if re.search(r"feed_forward\.w[13]\.weight(_scale)?$", key):
            state[key] = state[key][:width].contiguous()
        elif re.search(r"feed_forward\.w2\.weight$", key):
            state[key] = state[key][:, :width].contiguous()
    save_file(state, component / WEIGHTS, metadata={"format": "pt"})
    config = json.loads((component / "config.json").read_text())
    config["intermediate_size"] = width
    (component / "config.json").write_text(json.dumps(config))


def test_row_length_not_multiple_of_256_falls_back_to_q8_0_in_a_converted_checkpoint(
    tiny_fp8_copy, tmp_path, caplog, capsys
):
    for comp in TRANSFORMERS:
        _narrow_ffn(tiny_fp8_copy / comp, 320)
    with caplog.at_level(logging.WARNING, logger="ditq.quant.recipes.gguf"):
        out = quantize_pipeline(str(tiny_fp8_copy), "q4_k", tmp_path / "q4_k", progress=False)
    logged = [r.getMessage() for r in caplog.records if "feed_forward.w2" in r.getMessage()]
    assert len(logged) == 4 and all("Q8_0" in m and "320" in m for m in logged)

    reader = GGUFReader(out / "transformer" / GGUF_FILE)
    ref = fp8_reference(tiny_fp8_copy / "transformer")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["layers.0.feed_forward.w1.weight"] == Q.Q4_K  # (320, 256): rows of 256
    w2 = next(t for t in reader.tensors if t.name == "layers.0.feed_forward.w2.weight")
    assert w2.tensor_type == Q.Q8_0
    # Q8_0 bytes are what gguf-py's own (C-exact) Q8_0 quantizer writes
    data = np.asarray(w2.data).reshape(256, -1)
    np.testing.assert_array_equal(data, gguf_quantize(ref[w2.name], Q.Q8_0))
    assert_within_kquant_error(gguf_dequantize(data, Q.Q8_0), ref[w2.name], Q.Q8_0, w2.name)

    # sizes predicted from the config's shapes honour the same fallback
    report = _inspect(out, capsys)
    row = report["components"]["transformer"]
    assert row["predicted_bytes"] == row["bytes"]["q4_k"]
    assert row["predicted_bytes"] + _overhead_gguf(out / "transformer" / GGUF_FILE) == row["files"][GGUF_FILE]

    from ditq.models.loading import load_pipeline

    pipe = load_pipeline(out)  # the Q8_0 rows load into the narrower model
    assert pipe.transformer.layers[0].feed_forward.w2.dequantized_weight().shape == (256, 320)


def _poison(component: Path, key: str, value: float) -> None:
    state = load_file(component / WEIGHTS)
    t = state[key].float()
    t.view(-1)[7] = value
    state[key] = t.to(state[key].dtype)
    save_file(state, component / WEIGHTS, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("component", "key", "value"),
    [
        ("transformer", "layers.1.feed_forward.w3.weight", float("nan")),  # FP8 NaN, a Q4_K tensor
        ("transformer", "layers.0.attention.o.weight_scale", float("inf")),  # scale -> Inf weights
        ("unconditional_transformer", "final_layer.linear.bias", float("-inf")),  # an F32 tensor
    ],
)
def test_nonfinite_source_is_refused_naming_the_tensor(tiny_fp8_copy, tmp_path, component, key, value):
    _poison(tiny_fp8_copy / component, key, value)
    out = tmp_path / "q4_k"
    weight = key.replace("weight_scale", "weight")
    with pytest.raises(CheckpointError, match=re.escape(weight)):
        quantize_pipeline(str(tiny_fp8_copy), "q4_k", out, progress=False)
    assert not out.exists()
    partial = out.with_name("q4_k.partial")
    assert not (partial / "ditq.json").exists()
    assert not (partial / component / ".ditq-done.json").exists()
    assert not (partial / component / GGUF_FILE).exists()
    assert not list(partial.glob(f"{component}/*.part"))


def test_quantizing_an_already_quantized_folder_is_refused(q4k_dir, tmp_path):
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_pipeline(str(q4k_dir), "q4_k", tmp_path / "again", progress=False)
    assert not (tmp_path / "again").exists() and not (tmp_path / "again.partial").exists()


def test_interrupted_conversion_resumes_with_the_finished_transformer(tiny_fp8_dir, tmp_path, monkeypatch):
    import ditq.quant.recipes.gguf as gguf_recipe

    real = gguf_recipe.write_transformer_gguf
    calls: list[str] = []

    def flaky(src, dst, *args, **kwargs):
        calls.append(src.name)
        if src.name == "unconditional_transformer" and calls.count(src.name) == 1:
            raise KeyboardInterrupt  # as if the process were stopped mid-way
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(gguf_recipe, "write_transformer_gguf", flaky)
    out = tmp_path / "q4_k"
    with pytest.raises(KeyboardInterrupt):
        quantize_pipeline(str(tiny_fp8_dir), "q4_k", out, progress=False)
    partial = tmp_path / "q4_k.partial"
    assert not out.exists()
    assert (partial / "transformer" / ".ditq-done.json").is_file()
    assert not (partial / "ditq.json").exists()
    first = (partial / "transformer" / GGUF_FILE).stat()

    quantize_pipeline(str(tiny_fp8_dir), "q4_k", out, progress=False)
    assert calls == ["transformer", "unconditional_transformer", "unconditional_transformer"]
    reused = (out / "transformer" / GGUF_FILE).stat()
    assert (reused.st_ino, reused.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert not partial.exists() and not list(out.rglob(".ditq-done.json"))
    assert (out / "ditq.json").is_file()
    shutil.rmtree(out)
