"""Reading LoRA files: every layout to the same factors, the prefix table, alpha, and the refusals naming the key."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from ditq.errors import CheckpointError, ConfigError
from ditq.lora import LoraSpec, apply_lora, parse_lora_spec, read_lora
from ditq.lora.names import DOTTED_PREFIXES, FLAT_PREFIXES
from ditq.lora.targets import config_linear_shapes, resolve

from .builders import comfy_state, fuse_qkv, kohya_state, peft_state, random_lora, save, update

MODULES = [
    "layers.0.attention.to_q",
    "layers.0.attention.to_k",
    "layers.0.attention.to_v",
    "layers.0.attention.to_out.0",
    "layers.1.feed_forward.w1",
    "layers.1.feed_forward.w2",
    "layers.1.adaln_modulation",
    "final_layer.linear",
]


@pytest.fixture(scope="module")
def shapes(tiny_fp8_dir):
    return config_linear_shapes(tiny_fp8_dir / "transformer")


@pytest.fixture(scope="module")
def canonical(shapes):
    return random_lora(shapes, MODULES, rank=4, seed=1)


def _updates(lora, branch, shapes) -> dict[str, torch.Tensor]:
    factors, missing = resolve(lora, branch, shapes)
    assert not missing, missing
    return {n: f.up.double() * f.scale @ f.down.double() for n, f in factors.items()}


LAYOUTS = {
    "peft": lambda c: peft_state(c),
    "peft-fused": lambda c: peft_state(fuse_qkv(c)),
    "kohya": lambda c: kohya_state(c),
    "kohya-fused": lambda c: kohya_state(fuse_qkv(c)),
    "onetrainer": lambda c: kohya_state(c, prefix="lora_transformer_"),
    "comfy": lambda c: comfy_state(c),
    "comfy-fused": lambda c: comfy_state(fuse_qkv(c), prefix="model.diffusion_model."),
    "ai-toolkit": lambda c: peft_state(fuse_qkv(c), prefix="diffusion_model."),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_reads_to_the_same_updates(layout, canonical, shapes, tmp_path):
    path = save(LAYOUTS[layout](canonical), tmp_path / f"{layout}.safetensors")
    lora = read_lora(path)
    assert lora.name == layout and not lora.unknown and list(lora.branches) == ["transformer"]
    got = _updates(lora, "transformer", shapes)
    assert sorted(got) == sorted(MODULES)
    for name in MODULES:
        assert torch.equal(got[name], update(canonical, name)), (
            name
        )  # bit for bit: the alphas are powers of 2


@pytest.mark.parametrize("layout", ["ai-toolkit", "comfy-fused", "kohya-dotted"])
def test_updates_agree_with_diffusers_own_ideogram4_converter(layout, canonical, shapes):
    """diffusers 0.42.1 converts ai-toolkit / ComfyUI-style Ideogram 4 LoRAs itself (block layers only, alpha folded
    into the factors): its B A per layer is ditq's scale · B A."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_ideogram4_lora_to_diffusers as convert,
    )

    blocks = {n: ab for n, ab in canonical.items() if n.startswith("layers.")}
    state = {
        "ai-toolkit": lambda: peft_state(fuse_qkv(blocks), prefix="diffusion_model."),
        "comfy-fused": lambda: comfy_state(fuse_qkv(blocks), alpha=2.0),
        "kohya-dotted": lambda: comfy_state(fuse_qkv(blocks), prefix="", alpha=16.0),
    }[layout]()
    theirs = convert(dict(state))
    mine = _updates(read_lora(state), "transformer", shapes)
    assert len(theirs) == 2 * len(mine)
    for name, delta in mine.items():
        a = theirs[f"transformer.{name}.lora_A.weight"].double()
        b = theirs[f"transformer.{name}.lora_B.weight"].double()
        torch.testing.assert_close(delta, b @ a, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("prefix,branch", [*DOTTED_PREFIXES, *FLAT_PREFIXES])
def test_every_prefix_names_its_transformer(prefix, branch, canonical):
    name = "layers.1.feed_forward.w2"
    module = name.replace(".", "_") if prefix in dict(FLAT_PREFIXES) else name
    a, b = canonical[name]
    lora = read_lora({f"{prefix}{module}.lora_down.weight": a, f"{prefix}{module}.lora_up.weight": b})
    assert list(lora.branches) == [branch] and list(lora.branches[branch]) == [module]


def test_unprefixed_keys_go_to_the_conditional_transformer_unless_both(canonical, shapes):
    state = peft_state(canonical, prefix="")
    assert list(read_lora(state).branches) == ["transformer"]
    both = read_lora(state, unprefixed="both")
    assert list(both.branches) == ["transformer", "unconditional_transformer"]
    assert _updates(both, "unconditional_transformer", shapes).keys() == set(MODULES)
    with pytest.raises(ConfigError, match="unprefixed"):
        read_lora(state, unprefixed="uncond")


def test_one_file_for_both_transformers(canonical, shapes):
    other = random_lora(shapes, MODULES[:3], rank=2, seed=5)
    state = {**kohya_state(canonical), **kohya_state(other, prefix="lora_uncond_")}
    lora = read_lora(state)
    assert set(_updates(lora, "transformer", shapes)) == set(MODULES)
    got = _updates(lora, "unconditional_transformer", shapes)
    assert set(got) == set(MODULES[:3]) and torch.equal(got[MODULES[0]], update(other, MODULES[0]))


def test_alpha_scales_as_the_tools_define_it(canonical):
    a, b = canonical["layers.1.feed_forward.w2"]  # rank 4
    m = "transformer.layers.1.feed_forward.w2"
    plain = {f"{m}.lora_A.weight": a, f"{m}.lora_B.weight": b}
    assert read_lora(plain).branches["transformer"]["layers.1.feed_forward.w2"].scale == 1.0
    kohya = {**plain, f"{m}.alpha": torch.tensor(3.0)}
    assert read_lora(kohya).branches["transformer"]["layers.1.feed_forward.w2"].scale == 3.0 / 4
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})}
    assert read_lora(plain, metadata=meta).branches["transformer"]["layers.1.feed_forward.w2"].scale == 2.0
    pattern = {"transformer.lora_alpha": 8, "transformer.alpha_pattern": {"feed_forward.w2": 1}}
    meta = {"lora_adapter_metadata": json.dumps(pattern)}
    assert read_lora(plain, metadata=meta).branches["transformer"]["layers.1.feed_forward.w2"].scale == 0.25
    rs = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 6, "transformer.use_rslora": True})}
    assert read_lora(plain, metadata=rs).branches["transformer"][
        "layers.1.feed_forward.w2"
    ].scale == 6 / math.sqrt(4)


def test_a_file_on_disk_reads_its_metadata(canonical, tmp_path):
    meta = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 2})}
    path = save(peft_state(canonical), tmp_path / "style.safetensors", metadata=meta)
    lora = read_lora(path)
    assert lora.path == path and lora.branches["transformer"]["layers.0.attention.to_q"].scale == 0.5


def _bad(canonical, mutate) -> dict[str, torch.Tensor]:
    state = peft_state({"layers.1.feed_forward.w2": canonical["layers.1.feed_forward.w2"]})
    mutate(state)
    return state


A_KEY = "transformer.layers.1.feed_forward.w2.lora_A.weight"
B_KEY = "transformer.layers.1.feed_forward.w2.lora_B.weight"


def _set(key, value):
    return lambda s: s.__setitem__(key, value)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda s: s.__setitem__(B_KEY, s[B_KEY][:, :3].contiguous()), "wrong rank.*lora_A.*lora_B"),
        (lambda s: s[B_KEY].__setitem__((0, 0), float("nan")), f"{B_KEY}.*non-finite"),
        (lambda s: s[A_KEY].__setitem__((1, 2), float("inf")), f"{A_KEY}.*non-finite"),
        (lambda s: s.pop(B_KEY), f"{A_KEY} has no matching up"),
        (lambda s: s.pop(A_KEY), f"{B_KEY} has no matching down"),
        (lambda s: s.__setitem__(A_KEY, s[A_KEY].reshape(-1)), f"{A_KEY} is .* expected a 2-D"),
        (lambda s: s.__setitem__(A_KEY, s[A_KEY].to(torch.int8)), f"{A_KEY} is torch.int8"),
        (_set("transformer.layers.1.feed_forward.w2.alpha", torch.tensor(float("nan"))), "alpha is nan"),
        (_set("transformer.layers.1.feed_forward.w2.alpha", torch.ones(2)), r"alpha has shape \[2\]"),
        (
            _set("transformer.layers.1.feed_forward.w2.lora_down.weight", torch.zeros(4, 512)),
            "both give the down",
        ),
        (
            _set("diffusion_model.layers.1.feed_forward.w2.lora_A.weight", torch.zeros(4, 512)),
            f"{A_KEY} and diffusion_model.layers.1.feed_forward.w2.lora_A.weight both give the down",
        ),
    ],
)
def test_bad_files_are_refused_naming_the_key(canonical, mutate, match):
    with pytest.raises(CheckpointError, match=match):
        read_lora(_bad(canonical, mutate))


def test_one_layer_named_twice_is_refused(canonical, shapes):
    a, b = canonical["layers.1.feed_forward.w2"]
    state = {
        **peft_state({"layers.1.feed_forward.w2": (a, b)}, prefix="transformer."),
        **peft_state({"layers.1.feed_forward.w2": (a, b)}, prefix=""),
    }
    with pytest.raises(CheckpointError, match="given twice"):
        read_lora(state)
    fused_and_split = {
        **peft_state(fuse_qkv({k: canonical[k] for k in MODULES[:3]})),
        **peft_state(canonical),
    }
    with pytest.raises(CheckpointError, match="both adapt transformer layer layers.0.attention.to_q"):
        resolve(read_lora(fused_and_split), "transformer", shapes)


def test_a_lora_that_does_not_fit_its_layer_is_refused(canonical, shapes):
    a, b = canonical["layers.1.feed_forward.w2"]  # w2 is 512 -> 256; w1 is 256 -> 512
    lora = read_lora(peft_state({"layers.1.feed_forward.w1": (a, b)}))
    with pytest.raises(
        CheckpointError, match=r"transformer.layers.1.feed_forward.w1 does not fit .*\[r, 256\]"
    ):
        resolve(lora, "transformer", shapes)
    qkv_a, qkv_b = fuse_qkv({k: canonical[k] for k in MODULES[:3]})["layers.0.attention.qkv"]
    lora = read_lora(peft_state({"layers.0.attention.qkv": (qkv_a, qkv_b[:-3])}))
    with pytest.raises(CheckpointError, match="attention.qkv does not fit .*to_q\\+.*to_k\\+.*to_v"):
        resolve(lora, "transformer", shapes)


def test_dora_and_pickles_and_corrupt_files_are_refused(canonical, tmp_path):
    meta = {"lora_adapter_metadata": json.dumps({"transformer.use_dora": True})}
    with pytest.raises(CheckpointError, match="DoRA"):
        read_lora(peft_state(canonical), metadata=meta)
    pickle = tmp_path / "lora.pt"
    torch.save(peft_state(canonical), pickle)
    with pytest.raises(CheckpointError, match="pickle"):
        read_lora(pickle)
    broken = save(peft_state(canonical), tmp_path / "broken.safetensors")
    broken.write_bytes(broken.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        read_lora(broken)
    with pytest.raises(CheckpointError, match="no such LoRA file"):
        read_lora(tmp_path / "missing.safetensors")


def test_unknown_keys_are_listed_and_refused_when_strict(canonical, load_variant, caplog):
    extra = {
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
        "transformer.layers.0.attention.to_q.dora_scale": torch.ones(1, 256),
        "transformer.layers.0.feed_forward.w1.lokr_w1": torch.ones(4, 4),
        "transformer.layers.9.feed_forward.w1.lora_A.weight": torch.zeros(4, 256),
        "transformer.layers.9.feed_forward.w1.lora_B.weight": torch.zeros(512, 4),
        "something_else": torch.zeros(1),
    }
    lora = read_lora({**peft_state(canonical), **extra}, name="extra")
    reasons = dict(lora.unknown)
    assert set(reasons) == set(extra) - {k for k in extra if "layers.9" in k}
    assert "text-encoder" in reasons[next(k for k in extra if k.startswith("lora_te"))]
    assert "DoRA" in reasons["transformer.layers.0.attention.to_q.dora_scale"]
    pipe = load_variant("fp8")
    with pytest.raises(CheckpointError, match=r"5 key\(s\) not applied \(strict\).*layers.9.feed_forward.w1"):
        apply_lora(pipe, lora, strict=True)
    assert not any(n for n, _ in pipe.transformer.named_parameters() if ".lora." in n)  # nothing changed
    with caplog.at_level(logging.WARNING, logger="ditq.lora"):
        applied = apply_lora(pipe, lora)
    assert len(applied.unknown) == 5 and "not applied" in caplog.text and "something_else" in caplog.text
    assert set(applied.layers["transformer"]) == set(MODULES)


def test_lora_spec_parses_path_and_strength():
    assert parse_lora_spec("style.safetensors:0.8") == LoraSpec(path="style.safetensors", strength=0.8)
    assert parse_lora_spec("a/b.safetensors:-1.5").strength == -1.5
    assert parse_lora_spec("C:/loras/x.safetensors").path == "C:/loras/x.safetensors"
    assert parse_lora_spec("odd:name.safetensors").path == "odd:name.safetensors"
    assert parse_lora_spec("x.safetensors").label == "x"
    for bad in ("x.safetensors:nan", "x.safetensors:inf", ""):
        with pytest.raises(ConfigError):
            parse_lora_spec(bad)
    with pytest.raises(ConfigError, match="strength"):
        LoraSpec(path="x", strength="strong")
    with pytest.raises(ConfigError, match="unprefixed"):
        LoraSpec(path="x", unprefixed="all")
