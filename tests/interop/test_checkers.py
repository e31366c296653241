"""The loader-rule checker: ditq's GGUF and INT8 exports pass; deliberately broken files fail with the right rule."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from ditq.interop.checkers import COMFYUI, COMFYUI_GGUF, SDCPP, check_gguf, check_int8
from ditq.interop.export import export

from .builders import PREFIX, rewrite_gguf, rewrite_safetensors

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def gguf_export(ditq_q4k_dir, tmp_path_factory):
    return export(ditq_q4k_dir, tmp_path_factory.mktemp("gguf-export"), "sdcpp")


@pytest.fixture(scope="module")
def int8_export(ditq_int8_dir, tmp_path_factory):
    return export(ditq_int8_dir, tmp_path_factory.mktemp("int8-export"), "comfyui")


@pytest.fixture(scope="module")
def config(ditq_q4k_dir):
    return ditq_q4k_dir / "transformer" / "config.json"


def rules(violations) -> set[tuple[str, str]]:
    return {(v.loader, v.rule) for v in violations}


def test_ditq_gguf_export_passes_and_gguf_reader_reads_it(gguf_export, ditq_q4k_dir, config):
    assert gguf_export.violations == []
    for comp, path in gguf_export.files.items():
        assert check_gguf(path, ("sdcpp", "comfyui"), config) == []
        reader = gguf.GGUFReader(path)
        arch = reader.get_field("general.architecture")
        assert bytes(arch.parts[arch.data[-1]]).decode() == "ideogram"
        ours = {t.name: t for t in gguf.GGUFReader(next((ditq_q4k_dir / comp).glob("*.gguf"))).tensors}
        for t in reader.tensors:
            assert not t.name.startswith("model.") and ".to_q." not in t.name
            if len(t.shape) == 1 or t.n_elements <= 1024:
                assert t.tensor_type == Q.F32, t.name
            expected = (
                Q.Q4_K
                if t.name.startswith("layers.") and t.name.endswith("weight") and t.data.ndim == 2
                else None
            )
            if expected is not None and ("norm" not in t.name):
                assert t.tensor_type == Q.Q4_K, t.name
            assert np.array_equal(np.asarray(t.data), np.asarray(ours[t.name].data)), t.name
    names = {t.name for t in gguf.GGUFReader(gguf_export.files["transformer"]).tensors}
    assert "embed_image_indicator.weight" in names and "layers.0.attention.qkv.weight" in names


def _edit_type(name, qtype):
    def edit(t):
        data, _ = t[name]
        dense = gguf.quants.dequantize(data, t[name][1]) if t[name][1] != Q.F32 else data
        t[name] = (gguf.quants.quantize(dense.astype(np.float32), qtype), qtype)

    return edit


def _drop(name):
    return lambda t: t.pop(name)


def _prefix_all_but(keep):
    def edit(t):
        for name in list(t):
            if name != keep:
                t[PREFIX + name] = t.pop(name)

    return edit


def _shrink_bias(t):
    data, qtype = t["final_layer.linear.bias"]
    t["final_layer.linear.bias"] = (data[:8].copy(), qtype)


def _split_qkv(t):
    for name in [n for n in t if ".attention.o." in n]:
        t[name.replace(".attention.o.", ".attention.to_out.0.")] = t.pop(name)
    for name in [n for n in t if n.endswith("attention.qkv.weight")]:
        data, qtype = t.pop(name)
        for part, rows in zip("qkv", np.split(data, 3, axis=0), strict=True):
            t[name.replace("qkv", f"to_{part}")] = (np.ascontiguousarray(rows), qtype)


GGUF_CASES = {  # edit, architecture, expected (loader, rule) pairs, a phrase of the expected message
    "no-indicator": (
        _drop("embed_image_indicator.weight"),
        "keep",
        {(SDCPP, "detect"), (SDCPP, "missing")},
        "no tensor 'embed_image_indicator.weight'",
    ),
    "arch-ideogram4": (None, "ideogram4", {(COMFYUI_GGUF, "detect")}, "general.architecture is 'ideogram4'"),
    "no-arch-no-keys": (
        _drop("t_embedding.mlp_in.weight"),
        None,
        {(COMFYUI_GGUF, "detect")},
        "no general.architecture and no t_embedding.mlp_in.weight",
    ),
    "norm-bf16": (
        _edit_type("layers.0.ffn_norm1.weight", Q.BF16),
        "keep",
        {(COMFYUI_GGUF, "f32")},
        "1-D tensor stored as BF16",
    ),
    "embedding-mlp-q8": (
        _edit_type("t_embedding.mlp_in.weight", Q.Q8_0),
        "keep",
        {(SDCPP, "quantized-outside-rule")},
        "Q8_0, but sd.cpp's Ideogram 4 rule keeps it float",
    ),
    "wrong-shape": (
        _shrink_bias,
        "keep",
        {(SDCPP, "shape"), (COMFYUI_GGUF, "shape")},
        "shape [8], expected [16]",
    ),
    "split-names": (
        _split_qkv,
        "keep",
        {(SDCPP, "split-names"), (COMFYUI_GGUF, "split-names")},
        "diffusers split names",
    ),
    "partial-prefix": (
        _prefix_all_but("input_proj.bias"),
        "keep",
        {(SDCPP, "prefix"), (COMFYUI_GGUF, "prefix")},
        "only some tensor names carry",
    ),
    "short-prefix": (
        lambda t: [t.__setitem__("diffusion_model." + k, t.pop(k)) for k in list(t)],
        "keep",
        {(SDCPP, "prefix"), (COMFYUI_GGUF, "prefix")},
        "ComfyUI strips only 'model.diffusion_model.'",
    ),
    "prefixed": (
        _prefix_all_but(None),
        "keep",
        {(SDCPP, "prefix"), (SDCPP, "detect")},
        "stable-diffusion.cpp reads bare names",
    ),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_broken_gguf_fails_the_right_rule(case, gguf_export, config, tmp_path):
    edit, arch, expected, phrase = GGUF_CASES[case]
    path = rewrite_gguf(gguf_export.files["transformer"], tmp_path / f"{case}.gguf", edit, arch)
    violations = check_gguf(path, ("sdcpp", "comfyui"), config)
    found = rules(violations)
    assert expected <= found, (case, found)
    assert any(phrase in str(v) for v in violations), [str(v) for v in violations]
    if case == "prefixed":
        assert not {r for r in found if r[0] == COMFYUI_GGUF}, "ComfyUI-GGUF strips a full prefix"
    if case == "embedding-mlp-q8":
        assert check_gguf(path, ("sdcpp",), config, quantize_all=True) == []


def test_truncated_gguf_is_unreadable(gguf_export, tmp_path):
    data = gguf_export.files["transformer"].read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) // 2])
    assert {r for _, r in rules(check_gguf(bad))} == {"unreadable"}


def test_official_shapes_are_checked_by_default(gguf_export):
    found = check_gguf(gguf_export.files["transformer"], ("sdcpp",))
    assert any(
        v.rule == "shape" and v.tensor == "input_proj.weight" and "[4608, 128]" in v.message for v in found
    )


# -------------------------------------------------------------------------------------------------- INT8


def test_ditq_int8_export_passes_both_loaders(int8_export, ditq_int8_dir):
    assert int8_export.violations == []
    path = int8_export.files["transformer"]
    assert check_int8(path, ("comfyui", "sdcpp"), ditq_int8_dir / "transformer") == []
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        recipe = json.loads(meta["ditq.recipe"])
        layers = json.loads(meta["_quantization_metadata"])["layers"]
        for module in recipe["quantized"]:
            assert f.get_tensor(f"{PREFIX}{module}.weight").dtype == torch.int8
            assert f.get_tensor(f"{PREFIX}{module}.weight_scale").shape[1] == 1
            assert layers[PREFIX + module] == {"format": "int8_tensorwise"}
        for module, reason in recipe["kept_float"].items():
            assert f.get_tensor(f"{PREFIX}{module}.weight").dtype == torch.bfloat16, (module, reason)
    assert all(k.startswith(PREFIX) for k in keys)
    assert any("adaln_modulation" in m for m in recipe["kept_float"])


def _marker(conf):
    raw = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    return torch.tensor(list(raw), dtype=torch.uint8)


W1 = f"{PREFIX}layers.0.feed_forward.w1"


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


def _pop(*keys):
    def edit(t):
        for k in keys:
            t.pop(k)

    return edit


def _unlist(module):
    def edit(meta):
        q = json.loads(meta["_quantization_metadata"])
        q["layers"].pop(module)
        meta["_quantization_metadata"] = json.dumps(q)

    return edit


def _relist(module, conf):
    def edit(meta):
        q = json.loads(meta["_quantization_metadata"])
        q["layers"][module] = conf
        meta["_quantization_metadata"] = json.dumps(q)

    return edit


G64 = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64}


def _int8_adaln(t):
    w = t[f"{PREFIX}layers.0.adaln_modulation.weight"].float()
    s = w.abs().amax(dim=1, keepdim=True) / 127
    t[f"{PREFIX}layers.0.adaln_modulation.weight"] = torch.round(w / s).to(torch.int8)
    t[f"{PREFIX}layers.0.adaln_modulation.weight_scale"] = s
    t[f"{PREFIX}layers.0.adaln_modulation.comfy_quant"] = _marker({"format": "int8_tensorwise"})


def _int8_embedding(t):
    w = t[f"{PREFIX}embed_image_indicator.weight"].float()
    t[f"{PREFIX}embed_image_indicator.weight"] = torch.zeros_like(w, dtype=torch.int8)
    t[f"{PREFIX}embed_image_indicator.weight_scale"] = torch.ones(w.shape[0], 1)
    t[f"{PREFIX}embed_image_indicator.comfy_quant"] = _marker({"format": "int8_tensorwise"})


INT8_CASES = {
    "marker-only-in-metadata": (_pop(f"{W1}.comfy_quant"), None, {(SDCPP, "marker")}, {COMFYUI}),
    "no-marker-no-metadata": (
        _pop(f"{W1}.comfy_quant"),
        _unlist(W1),
        {(SDCPP, "marker"), (COMFYUI, "marker")},
        set(),
    ),
    "wrong-format": (
        _set(f"{W1}.comfy_quant", _marker({"format": "int8_blockwise"})),
        None,
        {(SDCPP, "marker")},
        set(),
    ),
    "bad-json": (
        _set(f"{W1}.comfy_quant", _marker(b"{format")),
        None,
        {(SDCPP, "marker"), (COMFYUI, "marker")},
        set(),
    ),
    "group-not-power-of-4": (
        _set(
            f"{W1}.comfy_quant",
            _marker({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 128}),
        ),
        None,
        {(SDCPP, "marker"), (COMFYUI, "marker")},
        set(),
    ),
    "group-64": (
        _set(f"{W1}.comfy_quant", _marker(G64)),
        _relist(W1, G64),
        {(SDCPP, "marker")},
        {COMFYUI},
    ),
    "group-without-convrot": (
        _set(f"{W1}.comfy_quant", _marker({"format": "int8_tensorwise", "convrot_groupsize": 256})),
        None,
        {(SDCPP, "marker")},
        set(),
    ),
    "flat-scale": (
        lambda t: t.__setitem__(f"{W1}.weight_scale", t[f"{W1}.weight_scale"].reshape(-1).clone()),
        None,
        {(SDCPP, "scale"), (COMFYUI, "scale")},
        set(),
    ),
    "scalar-scale": (_set(f"{W1}.weight_scale", torch.tensor(0.01)), None, {(SDCPP, "scale")}, {COMFYUI}),
    "bf16-scale": (
        lambda t: t.__setitem__(f"{W1}.weight_scale", t[f"{W1}.weight_scale"].to(torch.bfloat16)),
        None,
        {(SDCPP, "scale"), (COMFYUI, "scale")},
        set(),
    ),
    "int8-embedding": (_int8_embedding, None, {(SDCPP, "int8"), (COMFYUI, "int8")}, set()),
    "orphan-scale": (
        _set(f"{PREFIX}input_proj.weight_scale", torch.ones(256, 1)),
        None,
        {(SDCPP, "orphan"), (COMFYUI, "orphan")},
        set(),
    ),
    "int8-marker-on-bf16": (
        _set(f"{PREFIX}layers.0.adaln_modulation.comfy_quant", _marker({"format": "int8_tensorwise"})),
        None,
        {(SDCPP, "marker"), (COMFYUI, "marker")},
        set(),
    ),
    "recipe-kept-layer-int8": (_int8_adaln, None, {("ditq", "recipe")}, set()),
    "marker-disagrees-with-metadata": (
        _set(f"{W1}.comfy_quant", _marker({"format": "int8_tensorwise", "convrot": False})),
        None,
        {(COMFYUI, "metadata")},
        set(),
    ),
}


@pytest.mark.parametrize("case", list(INT8_CASES))
def test_broken_int8_fails_the_right_rule(case, int8_export, ditq_int8_dir, tmp_path):
    edit, edit_meta, expected, clean = INT8_CASES[case]
    path = rewrite_safetensors(
        int8_export.files["transformer"], tmp_path / f"{case}.safetensors", edit, edit_meta
    )
    found = rules(check_int8(path, ("comfyui", "sdcpp"), ditq_int8_dir / "transformer"))
    assert expected <= found, (case, found)
    for loader in clean:
        assert not {r for r in found if r[0] == loader}, (case, found)
