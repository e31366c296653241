"""Offload policies on the tiny model (CPU): every policy computes the image of `none` bit for bit, cached
conditionings are the live ones, the text encoder is not on the device while the transformers run, and casting a
quantized model keeps its storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditq.models.placement import (
    POLICIES,
    TWO_PHASE,
    apply_policy,
    encode_all,
    load_device,
    load_parts,
    release,
)

PROMPT = "a red fox in the snow"


def _image(folder, settings, policy: str, cond=None, spy=None):
    from ditq.models.loading import load_pipeline
    from ditq.models.sampling import generate

    pipe = load_pipeline(str(folder), device=load_device(policy, "cpu"), parts=load_parts(policy))
    apply_policy(pipe, policy, "cpu")
    if spy is not None:
        spy(pipe)
    try:
        return np.asarray(generate(pipe, PROMPT, 0, settings, cond=cond))
    finally:
        release(pipe)


@pytest.fixture(scope="module")
def reference(tiny_fp8_dir, tiny_settings):
    return _image(tiny_fp8_dir, tiny_settings, "none")


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "none"])
def test_every_policy_gives_the_image_of_none(policy, tiny_fp8_dir, tiny_settings, reference):
    """Through diffusers' own hooks (model, sequential and block-level group offloading) and the two-phase
    encode: the same pixels. While either transformer runs, the text encoder is absent (the two-phase policies) or
    is what the transformer's offload hook moves off the device before it runs (model offloading; accelerate skips
    the move when the device is the CPU itself)."""
    cond = None
    if policy in TWO_PHASE:
        cond = encode_all(str(tiny_fp8_dir), [PROMPT], tiny_settings, "cpu", torch.bfloat16)[PROMPT]
    seen = []

    def spy(pipe):
        def check(_module, _args, _kwargs):
            if pipe.text_encoder is None:
                seen.append("absent")
            else:  # model offloading: the transformer's hook offloads the text encoder before it runs
                hook = pipe.transformer._hf_hook
                seen.append(
                    "offloaded first" if hook.prev_module_hook.model is pipe.text_encoder else "resident"
                )

        for name in ("transformer", "unconditional_transformer"):
            getattr(pipe, name).register_forward_pre_hook(check, with_kwargs=True)

    got = _image(tiny_fp8_dir, tiny_settings, policy, cond, spy)
    assert np.array_equal(got, reference)
    assert len(seen) == 2 * tiny_settings.steps
    assert set(seen) == ({"absent"} if policy in TWO_PHASE else {"offloaded first"})


def test_cached_conditionings_give_the_image_of_live_encoding(
    tiny_fp8_dir, tiny_settings, reference, tmp_path
):
    """Written to a run folder's embedding cache and read back: the same tensors, the same image."""
    from ditq.runs.embeddings import EmbeddingCache, ensure_embeddings

    cache = EmbeddingCache(tmp_path)
    keys = ensure_embeddings(cache, str(tiny_fp8_dir), [PROMPT], tiny_settings, "cpu", torch.bfloat16)
    cached = cache.get(keys[PROMPT])
    live = encode_all(str(tiny_fp8_dir), [PROMPT], tiny_settings, "cpu", torch.bfloat16)[PROMPT]
    assert torch.equal(cached.text, live.text) and cached.text.dtype == live.text.dtype
    assert (cached.text_tokens, tuple(cached.grid)) == (live.text_tokens, tuple(live.grid))
    assert np.array_equal(_image(tiny_fp8_dir, tiny_settings, "encoder", cached), reference)


@pytest.mark.parametrize("fmt", ["fp8", "int8", "q4_k", "nf4", "svdq_w4a4", "convrot_w4a4"])
def test_casting_a_quantized_model_changes_only_its_compute_dtype(fmt):
    """`.to(torch.bfloat16)` / `.half()` / `.float()` leave every stored tensor's bytes and logical dtype as they
    were; only the compute dtype follows."""
    from ditq.formats.base import QuantizedLinear
    from ditq.quant.api import quantize_
    from ditq.quant.recipes import parse_recipe

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    options = {"smoothquant": False} if fmt in ("int8", "svdq_w4a4", "convrot_w4a4") else {}
    quantize_(model, parse_recipe(fmt, **options))
    layers = [m for m in model if isinstance(m, QuantizedLinear)]
    assert layers, fmt

    def storage(layer):
        return {n: (layer.stored(n).dtype, layer.stored(n).clone()) for n in layer._logical}

    before = [storage(m) for m in layers]
    for cast, dtype in (
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.half(), torch.float16),
    ):
        cast(model)
        for layer, old in zip(layers, before, strict=True):
            new = storage(layer)
            assert new.keys() == old.keys()
            for name, (dt, t) in new.items():
                assert dt == old[name][0] and torch.equal(
                    t.view(torch.uint8), old[name][1].view(torch.uint8)
                ), name
            assert layer.compute_dtype == dtype
