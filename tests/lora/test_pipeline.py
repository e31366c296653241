"""LoRAs on the tiny pipeline in every format: against the float reference, bit-exact where they must be, and
the conditional / unconditional naming.

The reference is the same transformer with every Linear an nn.Linear holding its dequantized weight plus the
LoRA's float64 update, run in float64 (`float_reference`): the quantized model's own error against it is the
format's error (bf16 arithmetic, W8A8 activation rounding). A LoRA applied as a branch must stay within 1.5x that
error of its own reference, while moving the output by far more than that.
"""

from __future__ import annotations

import pytest
import torch

from ditq.errors import CheckpointError, ConfigError
from ditq.lora import (
    LoraSpec,
    applied_loras,
    apply_lora,
    apply_loras,
    read_lora,
    set_lora_strength,
    unload_lora,
)
from ditq.lora.targets import linear_shapes

from .builders import comfy_state, fuse_qkv, kohya_state, peft_state, random_lora, save
from .conftest import VARIANTS, float_reference, rel, run

BRANCHES = ("transformer", "unconditional_transformer")
BLOCK = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
BLOCK += ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaln_modulation")
MODULES = [f"layers.{i}.{m}" for i in range(2) for m in BLOCK] + ["llm_cond_proj", "final_layer.linear"]


def _lora(model, seed: int, magnitude: float = 0.6, rank: int = 4):
    return random_lora(linear_shapes(model), MODULES, rank=rank, seed=seed, magnitude=magnitude)


def _updates(lora, strength: float) -> dict[str, torch.Tensor]:
    return {n: strength * (b.double() @ a.double()) for n, (a, b) in lora.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_on_every_variant_matches_the_float_reference(
    variant, load_variant, transformer_inputs, tmp_path
):
    pipe = load_variant(variant)
    loras = {b: _lora(getattr(pipe, b), seed=i) for i, b in enumerate(BRANCHES)}
    strength = 0.8
    state = {**peft_state(loras["transformer"]), **peft_state(loras[BRANCHES[1]], prefix=f"{BRANCHES[1]}.")}
    refs = {}
    for b in BRANCHES:
        model = getattr(pipe, b)
        refs[b] = (float_reference(model), float_reference(model, _updates(loras[b], strength)))
    base = {b: run(getattr(pipe, b), transformer_inputs[b]) for b in BRANCHES}
    apply_lora(pipe, save(state, tmp_path / "both.safetensors"), strength)
    for b in BRANCHES:
        inputs = transformer_inputs[b]
        y = run(getattr(pipe, b), inputs)
        ref_base, ref = (run(r, inputs, torch.float64) for r in refs[b])
        e_base, e_lora, effect = rel(base[b], ref_base), rel(y, ref), rel(ref_base, ref)
        assert e_lora <= 1.5 * e_base + 1e-3, (b, e_lora, e_base)
        assert effect > 10 * e_lora, (b, effect, e_lora)


def test_strength_zero_and_unloading_give_the_base_image_bit_for_bit(load_variant, tmp_path):
    from ditq.models.sampling import SamplingSettings, generate

    settings = SamplingSettings(
        height=64, width=64, steps=2, guidance_schedule=(7.0, 3.0), max_sequence_length=64
    )
    pipe = load_variant("int8")
    path = save(kohya_state(fuse_qkv(_lora(pipe.transformer, 3))), tmp_path / "style.safetensors")

    def image() -> bytes:
        return generate(pipe, "a red fox in the snow", 0, settings).tobytes()

    base = image()
    apply_lora(pipe, path, 0.0)
    assert image() == base
    set_lora_strength(pipe, "style", 1.0)
    assert image() != base
    unload_lora(pipe, "style")
    assert image() == base
    assert not applied_loras(pipe)
    assert not any(".lora." in n for b in BRANCHES for n, _ in getattr(pipe, b).named_parameters())


def test_every_file_layout_fused_or_split_gives_the_same_output(load_variant, transformer_inputs, tmp_path):
    pipe = load_variant("q4_k")
    lora = _lora(pipe.transformer, 4)
    states = {
        "peft-split": peft_state(lora),
        "peft-fused": peft_state(fuse_qkv(lora)),
        "kohya-split": kohya_state(lora),
        "kohya-fused": kohya_state(fuse_qkv(lora)),
        "comfy-split": comfy_state(lora),
        "comfy-fused": comfy_state(fuse_qkv(lora), prefix="model.diffusion_model."),
    }
    outputs = {}
    for name, state in states.items():
        apply_lora(pipe, save(state, tmp_path / f"{name}.safetensors"), 0.9)
        outputs[name] = run(pipe.transformer, transformer_inputs["transformer"])
        unload_lora(pipe, name)
    first = outputs["peft-split"]
    assert all(torch.equal(y, first) for y in outputs.values()), [
        n for n, y in outputs.items() if not torch.equal(y, first)
    ]


def test_files_name_the_conditional_the_unconditional_or_both(load_variant, transformer_inputs, tmp_path):
    pipe = load_variant("fp8")
    base = {b: run(getattr(pipe, b), transformer_inputs[b]) for b in BRANCHES}
    lora = _lora(pipe.transformer, 5)

    def changed(spec) -> dict[str, bool]:
        apply_lora(pipe, spec)
        out = {b: not torch.equal(run(getattr(pipe, b), transformer_inputs[b]), base[b]) for b in BRANCHES}
        unload_lora(pipe)
        return out

    uncond = save(kohya_state(lora, prefix="lora_uncond_"), tmp_path / "uncond.safetensors")
    assert changed(LoraSpec(path=str(uncond))) == {"transformer": False, "unconditional_transformer": True}
    bare = save(peft_state(fuse_qkv(lora), prefix=""), tmp_path / "bare.safetensors")
    assert changed(LoraSpec(path=str(bare))) == {"transformer": True, "unconditional_transformer": False}
    assert changed(LoraSpec(path=str(bare), unprefixed="both")) == dict.fromkeys(BRANCHES, True)
    sdcpp = save(comfy_state(lora, prefix="model.diffusion_model.uncond."), tmp_path / "sdcpp.safetensors")
    assert changed(LoraSpec(path=str(sdcpp))) == {"transformer": False, "unconditional_transformer": True}


def test_several_loras_with_strengths_and_unloading_one(load_variant, transformer_inputs, tmp_path):
    pipe, alone = load_variant("nf4"), load_variant("nf4")
    inputs = transformer_inputs["transformer"]
    a, b = _lora(pipe.transformer, 6, magnitude=0.4), _lora(pipe.transformer, 7, magnitude=0.4, rank=8)
    pa = save(peft_state(a), tmp_path / "a.safetensors")
    pb = save(kohya_state(fuse_qkv(b)), tmp_path / "b.safetensors")
    both = {n: _updates(a, 0.5)[n] + _updates(b, -1.2)[n] for n in MODULES}
    ref_base, ref = float_reference(pipe.transformer), float_reference(pipe.transformer, both)
    base = run(pipe.transformer, inputs)
    applied = apply_loras(pipe, [f"{pa}:0.5", f"{pb}:-1.2"])
    assert [x.name for x in applied] == ["a", "b"] and pipe.transformer.layers[
        0
    ].attention.to_q.lora.rank == 12
    y = run(pipe.transformer, inputs)
    e_base = rel(base, run(ref_base, inputs, torch.float64))
    assert rel(y, run(ref, inputs, torch.float64)) <= 1.5 * e_base + 1e-3
    set_lora_strength(pipe, "a", 0.0)
    assert pipe.transformer.layers[0].attention.to_q.lora.rank == 8  # a strength-0 LoRA takes no rank
    set_lora_strength(pipe, "a", 0.5)
    unload_lora(pipe, "a")
    apply_lora(alone, pb, -1.2)
    assert torch.equal(run(pipe.transformer, inputs), run(alone.transformer, inputs))
    assert set(applied_loras(pipe)) == {"b"} and applied_loras(pipe)["b"].strength == -1.2


def test_a_lora_that_does_not_fit_changes_nothing(load_variant, transformer_inputs, tmp_path):
    pipe = load_variant("int8")
    base = run(pipe.transformer, transformer_inputs["transformer"])
    good = _lora(pipe.transformer, 8)
    a, b = good["layers.1.feed_forward.w2"]
    state = {**peft_state(good), **peft_state({"layers.0.feed_forward.w1": (a, b)}, prefix=f"{BRANCHES[1]}.")}
    with pytest.raises(
        CheckpointError, match="unconditional_transformer.layers.0.feed_forward.w1 does not fit"
    ):
        apply_lora(pipe, save(state, tmp_path / "bad.safetensors"))
    assert not applied_loras(pipe) and torch.equal(
        run(pipe.transformer, transformer_inputs["transformer"]), base
    )
    path = save(peft_state(good), tmp_path / "good.safetensors")
    apply_lora(pipe, path)
    with pytest.raises(ConfigError, match="already applied"):
        apply_lora(pipe, path)
    with pytest.raises(ConfigError, match="no LoRA named 'other'"):
        set_lora_strength(pipe, "other", 1.0)
    with pytest.raises(ConfigError, match="finite"):
        set_lora_strength(pipe, "good", float("nan"))
    with pytest.raises(CheckpointError, match="no LoRA factor fits"):
        apply_lora(pipe, read_lora({"text_encoder.x.lora_A.weight": torch.zeros(1, 1)}, name="te"))
