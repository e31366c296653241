"""The loader refuses a tensor whose stored dtype is not the one its layout uses, naming the file, the tensor and
both dtypes; every variant ditq writes still loads.

The attack: a safetensors header (or a GGUF tensor table) rewritten so that a tensor's dtype says F16 where the
layout stores BF16, I8 where it stores F8_E4M3, ...: the sizes match, the bytes are the same, every number changes.
Each case below rewrites exactly the header field (`relabel`) or re-encodes one tensor's values in another dtype
(`reencode`), then loads.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ditq.errors import CheckpointError
from ditq.models.loading import load_pipeline, load_transformer

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def variants(tiny_fp8_dir, tmp_path_factory):
    """{variant: pipeline folder}: the official-layout tiny model and every layout ditq writes from it (built once,
    read-only: copy before changing)."""
    from ditq.quant.recipes import ConvRotW4A4Recipe, Int8Recipe, SVDQuantRecipe
    from ditq.quant.writer import quantize_pipeline

    recipes = {
        "int8": Int8Recipe(smoothquant=False),
        "nf4": "nf4",
        "q4_k": "q4_k",
        "svdq_w4a4": SVDQuantRecipe(smoothquant=False),
        "convrot_w4a4": ConvRotW4A4Recipe(smoothquant=False),
    }
    root = tmp_path_factory.mktemp("dtype-variants")
    built = {"fp8": tiny_fp8_dir}
    for name, recipe in recipes.items():
        built[name] = quantize_pipeline(str(tiny_fp8_dir), recipe, root / name, progress=False)
    return built


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def relabel(path: Path, key: str, code: str) -> str:
    """Rewrite tensor `key`'s header dtype to the safetensors name `code` (same element size), data untouched;
    returns the old name."""
    header, data = read_header(path)
    old = header[key]["dtype"]
    header[key]["dtype"] = code
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return old


def reencode(path: Path, key: str, dtype: torch.dtype) -> None:
    """Store tensor `key`'s values in `dtype` (another size: the file is rewritten), metadata kept."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    state = load_file(path)
    state[key] = state[key].to(dtype)
    save_file(state, path, metadata=metadata)


def _refused(call, file: Path, key: str, got: str, want: str) -> str:
    with pytest.raises(CheckpointError) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(f"{file}: tensor {key} is {got}"), msg
    assert want in msg.split(f" is {got}", 1)[1], msg
    return msg


# (variant, tensor, new header dtype, stored dtype name as torch and safetensors name it)
RELABELLED = [
    ("fp8", "layers.0.attention.norm_q.weight", "F16", "bfloat16 (BF16)"),
    ("fp8", "layers.1.ffn_norm2.weight", "F16", "bfloat16 (BF16)"),
    ("fp8", "layers.0.attention.qkv.weight_scale", "I32", "float32 (F32)"),
    ("fp8", "layers.0.adaln_modulation.bias", "F16", "bfloat16 (BF16)"),
    ("fp8", "embed_image_indicator.weight", "F16", "bfloat16 (BF16)"),
    ("int8", "layers.0.attention.qkv.weight_scale", "I32", "float32 (F32)"),
    ("int8", "layers.0.attention.qkv.comfy_quant", "I8", "uint8 (U8)"),
    ("int8", "layers.0.attention.qkv.weight", "U8", "int8 (I8)"),
    ("int8", "layers.0.adaln_modulation.weight", "F16", "bfloat16 (BF16)"),  # kept in bf16 by the recipe
    ("int8", "layers.0.attention_norm1.weight", "F16", "bfloat16 (BF16)"),
    ("nf4", "layers.0.feed_forward.w1.weight", "I8", "uint8 (U8)"),
    ("nf4", "layers.0.feed_forward.w1.weight.absmax", "I32", "float32 (F32)"),
    ("nf4", "layers.0.feed_forward.w1.weight.quant_map", "U32", "float32 (F32)"),
    ("nf4", "layers.0.feed_forward.w1.weight.quant_state.bitsandbytes__nf4", "I8", "uint8 (U8)"),
    ("nf4", "layers.0.ffn_norm1.weight", "F16", "bfloat16 (BF16)"),
    ("svdq_w4a4", "layers.0.feed_forward.w1.weight_scale", "F16", "bfloat16 (BF16)"),
    ("svdq_w4a4", "layers.0.feed_forward.w1.weight_proj_down", "F16", "bfloat16 (BF16)"),
    ("svdq_w4a4", "layers.0.feed_forward.w1.weight_smooth_factor", "F16", "bfloat16 (BF16)"),
    ("svdq_w4a4", "layers.0.feed_forward.w1.weight", "U8", "int8 (I8)"),
    ("convrot_w4a4", "layers.0.feed_forward.w1.weight_scale", "I32", "float32 (F32)"),
    ("convrot_w4a4", "layers.0.feed_forward.w1.comfy_quant", "I8", "uint8 (U8)"),
    ("convrot_w4a4", "layers.0.attention.norm_k.weight", "F16", "bfloat16 (BF16)"),
]
NAMES = {
    "F16": "float16 (F16)",
    "I32": "int32 (I32)",
    "I8": "int8 (I8)",
    "U8": "uint8 (U8)",
    "U32": "uint32 (U32)",
}


@pytest.mark.parametrize(("variant", "key", "code", "want"), RELABELLED, ids=lambda v: str(v))
def test_a_relabelled_header_dtype_is_refused_naming_the_tensor_and_both_dtypes(
    variants, tmp_path, variant, key, code, want
):
    folder = _copy(variants[variant], tmp_path)
    file = folder / "transformer" / WEIGHTS
    header, _ = read_header(file)
    assert key in header, sorted(header)  # the case names a tensor the variant really stores
    relabel(file, key, code)
    _refused(lambda: load_transformer(folder / "transformer"), file, key, NAMES[code], want)


def test_an_fp8_weight_relabelled_int8_is_refused(tiny_fp8_dir, tmp_path):
    """E4M3 -> I8 would otherwise read as an INT8 layer (int8 weight, fp32 row scales): no INT8 layout leaves a
    layer without its comfy_quant marker."""
    folder = _copy(tiny_fp8_dir, tmp_path)
    file, key = folder / "transformer" / WEIGHTS, "layers.1.feed_forward.w2.weight"
    relabel(file, key, "I8")
    msg = _refused(lambda: load_transformer(folder / "transformer"), file, key, "int8", "comfy_quant marker")
    assert "F8_E4M3" in msg


def test_an_fp8_weight_relabelled_e5m2_names_the_format_dtype(tiny_fp8_dir, tmp_path):
    folder = _copy(tiny_fp8_dir, tmp_path)
    file, key = folder / "transformer" / WEIGHTS, "layers.0.attention.o.weight"
    relabel(file, key, "F8_E5M2")
    _refused(
        lambda: load_transformer(folder / "transformer"),
        file,
        key,
        "float8_e5m2 (F8_E5M2)",
        "float8_e4m3fn (F8_E4M3) in the official FP8 layout",
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_fp8_scale_re_encoded_in_16_bits_is_refused(tiny_fp8_dir, tmp_path, dtype):
    folder = _copy(tiny_fp8_dir, tmp_path)
    file, key = folder / "transformer" / WEIGHTS, "layers.0.feed_forward.w3.weight_scale"
    reencode(file, key, dtype)
    got = {torch.bfloat16: "bfloat16 (BF16)", torch.float16: "float16 (F16)"}[dtype]
    _refused(lambda: load_transformer(folder / "transformer"), file, key, got, "float32 (F32)")


def test_the_text_encoder_goes_through_the_same_rules(tiny_fp8_dir, tmp_path):
    folder = _copy(tiny_fp8_dir, tmp_path)
    file = folder / "text_encoder" / "model.safetensors"
    header, _ = read_header(file)
    norm = next(k for k in header if k.endswith("input_layernorm.weight"))
    scale = next(k for k in header if k.endswith("mlp.down_proj.weight_scale"))
    assert header[norm]["dtype"] == "BF16" and header[scale]["dtype"] == "F32"
    relabel(file, norm, "F16")
    _refused(lambda: load_pipeline(folder, parts="encoder"), file, norm, "float16 (F16)", "bfloat16 (BF16)")
    relabel(file, norm, "BF16")
    relabel(file, scale, "I32")
    _refused(lambda: load_pipeline(folder, parts="encoder"), file, scale, "int32 (I32)", "float32 (F32)")


# ------------------------------------------------------------------------------------------ plain float folders


@pytest.fixture(scope="module")
def float_transformer(tiny_pipe, tmp_path_factory) -> Path:
    """The tiny transformer as diffusers' `save_pretrained` writes it: float32, split names, no quantized layer."""
    folder = tmp_path_factory.mktemp("float") / "transformer"
    tiny_pipe.transformer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_plain_float_folder_loads_in_any_one_float_dtype(float_transformer, tmp_path, dtype):
    folder = _copy(float_transformer, tmp_path)
    file = folder / WEIGHTS
    state = load_file(file)
    save_file({k: v.to(dtype) for k, v in state.items()}, file)
    model, counts = load_transformer(folder, torch.float32)
    assert counts == {"float": counts["float"]}
    # the values are the stored ones, read in the dtype the header names (an independent decode: numpy's)
    header, data = read_header(file)
    entry = header["layers.0.attention.norm_q.weight"]
    begin, end = entry["data_offsets"]
    raw = np.frombuffer(data[begin:end], dtype={torch.float32: "<f4", torch.float16: "<f2"}.get(dtype, "<u2"))
    want = (
        raw.astype(np.float32) if dtype != torch.bfloat16 else (raw.astype(np.uint32) << 16).view(np.float32)
    )
    assert np.array_equal(model.layers[0].attention.norm_q.weight.detach().numpy(), want)


def test_one_tensor_off_a_plain_float_folders_dtype_is_refused(float_transformer, tmp_path):
    folder = _copy(float_transformer, tmp_path)
    file, key = folder / WEIGHTS, "layers.1.attention.norm_k.weight"
    reencode(file, key, torch.float16)
    msg = _refused(lambda: load_transformer(folder), file, key, "float16 (F16)", "float32 (F32)")
    assert re.search(r"the other \d+ floating tensors of this component are float32", msg), msg


# ---------------------------------------------------------------------------------------------------- GGUF


def _gguf_file(folder: Path) -> Path:
    (path,) = sorted((folder / "transformer").glob("*.gguf"))
    return path


def relabel_gguf(path: Path, name: str, qtype) -> None:
    """Rewrite one tensor's ggml type in the file's tensor table, in place (same bytes per element)."""
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    (tensor,) = [t for t in reader.tensors if t.name == name]
    type_part = tensor.field.parts[tensor.field.data[-2]]  # name, n_dims, dims, type, offset
    assert int(type_part[0]) == int(tensor.tensor_type)
    type_part[0] = int(qtype)
    reader.data.flush()


def _large_bf16(path: Path) -> str:
    import gguf

    reader = gguf.GGUFReader(path)
    return next(
        t.name
        for t in reader.tensors
        if t.tensor_type == gguf.GGMLQuantizationType.BF16 and int(np.prod(t.shape)) > 1024
    )


def test_a_ditq_gguf_float_tensor_relabelled_f16_is_refused(variants, tmp_path):
    from gguf import GGMLQuantizationType as Q

    folder = _copy(variants["q4_k"], tmp_path)
    path = _gguf_file(folder)
    name = _large_bf16(path)
    relabel_gguf(path, name, Q.F16)
    with pytest.raises(CheckpointError) as info:
        load_transformer(folder / "transformer")
    msg = str(info.value)
    assert msg.startswith(
        f"{path}: tensor {name} is GGUF F16; ditq's GGUF writer stores the unquantized tensors"
    ), msg
    assert msg.endswith("of more than 1024 elements as BF16"), msg


def test_a_foreign_gguf_keeps_its_own_float_type_but_refuses_one_tensor_off_it(tiny_fp8_dir, tmp_path):
    """A stable-diffusion.cpp-style file (no metadata, every unquantized tensor BF16, 1-D ones too) loads; one
    BF16 tensor relabelled F16 is refused, 2-D or 1-D."""
    from gguf import GGMLQuantizationType as Q
    from interop.builders import float_state, write_sdcpp_gguf

    comp = tmp_path / "transformer"
    comp.mkdir()
    shutil.copy2(tiny_fp8_dir / "transformer" / "config.json", comp / "config.json")
    path = comp / "ideogram4-Q8_0.gguf"
    write_sdcpp_gguf(float_state(tiny_fp8_dir / "transformer" / WEIGHTS), path)
    _, counts = load_transformer(comp)
    assert counts["gguf"] > 0
    name = _large_bf16(path)
    relabel_gguf(path, name, Q.F16)
    with pytest.raises(
        CheckpointError, match=rf"^{re.escape(str(path))}: tensor {re.escape(name)} is GGUF F16; "
    ):
        load_transformer(comp)
    relabel_gguf(path, name, Q.BF16)
    relabel_gguf(path, "layers.0.attention.norm_q.weight", Q.F16)
    with pytest.raises(
        CheckpointError,
        match=r"tensor layers\.0\.attention\.norm_q\.weight is GGUF F16; the other \d+ 16-bit float tensors of this file are BF16",
    ):
        load_transformer(comp)


# ---------------------------------------------------------------------------------------- no false positives


@pytest.mark.parametrize("variant", ["fp8", "int8", "nf4", "q4_k", "svdq_w4a4", "convrot_w4a4"])
def test_every_variant_ditq_writes_loads_unchanged(variants, variant):
    pipe = load_pipeline(variants[variant])
    assert pipe.transformer is not None and pipe.text_encoder is not None
