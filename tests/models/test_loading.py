"""The official FP8 layout: saved from the tiny pipeline, loaded back through the real path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ditq.formats.fp8 import Fp8Linear
from ditq.models.loading import load_pipeline, pipeline_info
from ditq.models.sampling import generate


def _reference_state(path, linear_modules):
    """Independent reading of an FP8 file: dequantize by hand and split the fused attention keys."""
    raw = load_file(path)
    out = {}
    for key, value in raw.items():
        if key.endswith(".weight_scale"):
            continue
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and value.dtype == torch.float8_e4m3fn:
            value = value.to(torch.float64) * raw[module + ".weight_scale"].to(torch.float64)[:, None]
        value = value.to(torch.float32)
        if ".attention.qkv." in key:
            q, k, v = value.chunk(3, dim=0)
            for name, part in zip(("to_q", "to_k", "to_v"), (q, k, v), strict=True):
                out[key.replace("qkv", name)] = part
        elif ".attention.o." in key:
            out[key.replace(".attention.o.", ".attention.to_out.0.")] = value
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def loaded_fp32(tiny_fp8_dir):
    return load_pipeline(tiny_fp8_dir, dtype=torch.float32)


def test_load_pipeline_fp8_weights_stay_e4m3(loaded_fp32):
    for name in ("transformer", "unconditional_transformer"):
        model = getattr(loaded_fp32, name)
        fp8 = [m for m in model.modules() if isinstance(m, Fp8Linear)]
        assert len(fp8) == sum(1 for m in model.modules() if isinstance(m, (torch.nn.Linear, Fp8Linear)))
        assert all(m.weight.dtype == torch.float8_e4m3fn for m in fp8)
        assert all(m.weight_scale.dtype == torch.float32 for m in fp8)
    assert pipeline_info(loaded_fp32).formats["text_encoder"]["fp8"] > 0


def test_load_pipeline_matches_independent_dequantization(
    loaded_fp32, tiny_fp8_dir, tiny_pipe, tiny_settings
):
    import copy

    ref = copy.copy(tiny_pipe)
    for name in ("transformer", "unconditional_transformer"):
        model = copy.deepcopy(getattr(tiny_pipe, name))
        state = _reference_state(tiny_fp8_dir / name / "diffusion_pytorch_model.safetensors", None)
        missing, unexpected = model.load_state_dict(state, strict=True)
        assert not missing and not unexpected
        setattr(ref, name, model)
    te = copy.deepcopy(tiny_pipe.text_encoder)
    raw = load_file(tiny_fp8_dir / "text_encoder" / "model.safetensors")
    te_state = {}
    for key, value in raw.items():
        if key.endswith(".weight_scale"):
            continue
        if value.dtype == torch.float8_e4m3fn:
            value = value.double() * raw[key.rsplit(".", 1)[0] + ".weight_scale"].double()[:, None]
        te_state[key] = value.float()
    te.load_state_dict(te_state, strict=True)
    ref.text_encoder = te
    vae = copy.deepcopy(tiny_pipe.vae)
    vae.load_state_dict(
        {
            k: v.float()
            for k, v in load_file(tiny_fp8_dir / "vae" / "diffusion_pytorch_model.safetensors").items()
        }
    )
    ref.vae = vae
    ref = type(tiny_pipe)(**{k: getattr(ref, k) for k in tiny_pipe.components})
    ref.set_progress_bar_config(disable=True)

    a = np.asarray(generate(ref, "a lighthouse at dusk", 3, tiny_settings), dtype=np.int16)
    b = np.asarray(generate(loaded_fp32, "a lighthouse at dusk", 3, tiny_settings), dtype=np.int16)
    # Same math up to float32 summation order (dequantize-then-matmul in float64 vs float32): pixels agree to 1 level.
    assert np.abs(a - b).max() <= 1
    assert (a != b).mean() < 0.01


def test_fp8_linear_matches_bf16_dequantized_reference(tiny_fp8_dir):
    from ditq.models.loading import load_transformer

    model, _ = load_transformer(tiny_fp8_dir / "transformer", dtype=torch.bfloat16)
    layer = model.layers[0].feed_forward.w2
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(7, layer.in_features, generator=torch.Generator().manual_seed(0))
    w64 = layer.weight.double() * layer.weight_scale.double()[:, None]
    ref = x.double() @ w64.T
    out = layer(x.to(torch.bfloat16)).double()
    # bf16 rounding of inputs, weights and the result: relative error well under 2^-6 per output on average
    rel = (out - ref).norm() / ref.norm()
    assert rel < 2**-7, rel


def test_fp8_scaled_mm_path_matches_quantized_activation_reference():
    from ditq.formats.fp8 import FP8_MAX, quantize_fp8_rowwise

    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g)
    q, s = quantize_fp8_rowwise(w)
    layer = Fp8Linear(q, s, None, torch.bfloat16, compute="scaled_mm")
    x = torch.randn(5, 64, generator=g)
    xs = (x.abs().amax(1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    xq = (x / xs).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).double() * xs.double()
    ref = xq @ (q.double() * s.double()[:, None]).T
    out = layer(x.to(torch.bfloat16)).double()
    assert ((out - ref).norm() / ref.norm()) < 2**-7


def test_generate_is_deterministic(loaded_fp32, tiny_settings):
    a = np.asarray(generate(loaded_fp32, "a red fox", 11, tiny_settings))
    b = np.asarray(generate(loaded_fp32, "a red fox", 11, tiny_settings))
    c = np.asarray(generate(loaded_fp32, "a red fox", 12, tiny_settings))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_unconditional_transformer_runs_on_image_tokens(loaded_fp32, tiny_settings):
    calls = {}

    def hook(name):
        def fn(module, args, kwargs):
            calls.setdefault(name, []).append(kwargs["hidden_states"].shape[1])

        return fn

    handles = [
        getattr(loaded_fp32, n).register_forward_pre_hook(hook(n), with_kwargs=True)
        for n in ("transformer", "unconditional_transformer")
    ]
    try:
        generate(loaded_fp32, "x", 0, tiny_settings)
    finally:
        for h in handles:
            h.remove()
    image_tokens = (64 // 4) ** 2
    assert calls["unconditional_transformer"] == [image_tokens] * tiny_settings.steps
    assert calls["transformer"] == [512 + image_tokens] * tiny_settings.steps


def test_the_vision_tower_is_never_loaded(tiny_fp8_dir):
    from ditq.models.loading import load_text_encoder

    model, _ = load_text_encoder(tiny_fp8_dir / "text_encoder", torch.bfloat16, "cpu")
    assert not hasattr(model, "visual") and not any(
        n.startswith("visual") for n, _ in model.named_parameters()
    )
    assert all(p.device.type == "cpu" for p in model.parameters())  # nothing left on the meta device
