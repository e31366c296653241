"""`quantize_` in every format: on an Ideogram 4 transformer it holds what `quantize_pipeline` writes for the same
recipe; on any other model it quantizes its Linear layers (or says it quantized nothing); FP8Recipe writes the
official layout from a float checkpoint."""

from __future__ import annotations

import logging

import pytest
import torch

import ditq
from ditq.errors import ConfigError
from ditq.formats.base import QuantizedLinear
from ditq.io.safetensors_io import TensorSource
from ditq.models.loading import load_transformer
from ditq.quant.calibration import synthetic_inputs
from ditq.quant.recipes import FP8Recipe, GGUFRecipe, NF4Recipe

RECIPES = [GGUFRecipe(type="q4_k"), GGUFRecipe(type="q5_k", mix=True), GGUFRecipe(type="q8_0"), NF4Recipe()]


@pytest.fixture(scope="module")
def written(tiny_fp8_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return {r.name: ditq.quantize_pipeline(tiny_fp8_dir, r, root / r.name, progress=False) for r in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_in_memory_equals_the_written_folder(recipe, written, tiny_fp8_dir):
    for comp in ("transformer", "unconditional_transformer"):
        mem, _ = load_transformer(tiny_fp8_dir / comp, torch.bfloat16)
        ditq.quantize_(mem, recipe)
        disk, _ = load_transformer(written[recipe.name] / comp, torch.bfloat16)
        record = ditq.quantization_record(mem)
        assert record.quantized and record.config["name"] == recipe.name
        for name, m in mem.named_modules():
            other = disk.get_submodule(name)
            assert type(m) is type(other), name
            if isinstance(m, QuantizedLinear | torch.nn.Linear):
                w = (
                    m.dequantized_weight(torch.float32)
                    if isinstance(m, QuantizedLinear)
                    else m.weight.float()
                )
                v = (
                    other.dequantized_weight(torch.float32)
                    if isinstance(other, QuantizedLinear)
                    else other.weight.float()
                )
                assert torch.equal(w, v), name
        kw = synthetic_inputs(mem.config, unconditional=comp != "transformer", dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(mem(**kw, return_dict=False)[0], disk(**kw, return_dict=False)[0])


def _generic_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))


@pytest.mark.parametrize(
    ("recipe", "tolerance"),
    [
        (GGUFRecipe(type="q8_0"), 0.01),
        (GGUFRecipe(type="q4_k"), 0.12),
        (NF4Recipe(), 0.15),
        (FP8Recipe(), 0.05),
        (ditq.Int8Recipe(smoothquant=False), 0.03),
    ],
    ids=lambda r: getattr(r, "name", ""),
)
def test_any_model_gets_its_linear_layers_quantized(recipe, tolerance):
    model = _generic_model()
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).double()
        ditq.quantize_(model, recipe)
        out = model(x).double()
    assert set(ditq.quantization_record(model).quantized) == {"0", "2"}
    assert all(isinstance(model[i], QuantizedLinear) for i in (0, 2))
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < tolerance


def test_a_config_that_quantizes_nothing_says_so(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(40, 40))  # 40 is no multiple of any block size
    with caplog.at_level(logging.WARNING, logger="ditq.quant.api"):
        ditq.quantize_(model, NF4Recipe())
    assert "quantized 0 of 1 eligible" in caplog.text and "block size" in caplog.text


def test_quantizing_twice_is_refused():
    model = _generic_model()
    ditq.quantize_(model, NF4Recipe())
    with pytest.raises(ConfigError, match="already has"):
        ditq.quantize_(model, GGUFRecipe(type="q4_k"))


def test_fp8_recipe_writes_the_official_layout_from_a_float_checkpoint(tiny_pipe, tiny_fp8_dir, tmp_path):
    float_dir = tmp_path / "float"
    tiny_pipe.save_pretrained(float_dir)  # diffusers split names, float32
    out = ditq.quantize_pipeline(float_dir, FP8Recipe(), tmp_path / "fp8", progress=False)
    for comp in ("transformer", "unconditional_transformer"):
        ours, official = TensorSource(out / comp), TensorSource(tiny_fp8_dir / comp)
        assert set(ours.keys()) == set(official.keys())
        for key in official.keys():
            assert ours.info(key).dtype == official.info(key).dtype, key
            assert torch.equal(ours.get(key), official.get(key)), key
