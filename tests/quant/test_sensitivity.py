"""Fragility table: each row's error is what quantizing that layer alone does to the transformer output; budgets pick
the protected set; the CLI writes the ranked CSV."""

from __future__ import annotations

import copy
import csv

import pytest
import torch

from ditq.cli import main
from ditq.errors import ConfigError
from ditq.formats.keys import split_to_fused
from ditq.io.safetensors_io import save_safetensors
from ditq.models.official import fp8_state_dict
from ditq.quant.api import quantize_
from ditq.quant.calibration import CalibrationRecorder, probe_inputs, synthetic_inputs
from ditq.quant.int8 import Int8W8A8Config, SmoothQuantConfig
from ditq.quant.int8.sensitivity import (
    FragilityRow,
    ProtectBudget,
    choose_protected,
    extra_bytes,
    measure_fragility,
    rank,
    read_csv,
    write_csv,
)


def tiny_transformer(seed: int = 0):
    from diffusers import Ideogram4Transformer2DModel

    from ditq.models.tiny import TinySpec, transformer_config

    torch.manual_seed(seed)
    model = Ideogram4Transformer2DModel(**transformer_config(TinySpec())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            if name.endswith("attention_norm1.weight"):  # a few outlier channels
                p[:3] *= 40.0
    return model


def calibrate(models: dict):
    rec = CalibrationRecorder(sample_tokens=32)
    for name, model in models.items():
        rec.attach(model, name)
    with torch.no_grad():
        for name, model in models.items():
            for i, t in enumerate((0.1, 0.4, 0.6, 0.9)):
                kw = synthetic_inputs(
                    model.config,
                    text_tokens=8,
                    grid=(4, 4),
                    timestep=t,
                    seed=i,
                    unconditional=name != "transformer",
                )
                model(**kw)
    rec.detach()
    return rec.result()


@pytest.fixture(scope="module")
def setup():
    models = {"transformer": tiny_transformer(0), "unconditional_transformer": tiny_transformer(1)}
    stats = calibrate(models)
    rows = []
    for name, model in models.items():
        rows += measure_fragility(model, stats, name, SmoothQuantConfig(), progress=False)
    return models, stats, rank(rows)


def _output_error(model, ref, probes) -> float:
    num = den = 0.0
    with torch.no_grad():
        for p in probes:
            kw = probe_inputs(p)
            image = kw["indicator"] == 2
            y, r = model(**kw).sample[image].double(), ref(**kw).sample[image].double()
            num += float(((y - r) ** 2).sum())
            den += float((r**2).sum())
    return num / den


def test_fragility_rows_cover_every_linear_and_rank_by_error(setup):
    models, _, rows = setup
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in models["transformer"].modules())
    assert len(rows) == 2 * n_linear
    assert [r.rank for r in rows] == list(range(1, len(rows) + 1))
    assert all(a.error >= b.error for a, b in zip(rows, rows[1:], strict=False))
    by_name = {(r.transformer, r.module): r for r in rows}
    adaln = by_name[("transformer", "layers.0.adaln_modulation")]
    assert (
        adaln.default_protected and not by_name[("transformer", "layers.0.feed_forward.w2")].default_protected
    )
    qkv = by_name[("transformer", "layers.0.attention.to_k")]
    assert qkv.fused_module == "layers.0.attention.qkv" and qkv.smoothing.startswith("folded")
    assert (
        qkv.extra_bytes
        == extra_bytes(256, 256)
        == 256 * 256 - 4 * 256 - len(b'{"format": "int8_tensorwise"}')
    )


def test_fragility_equals_quantizing_that_layer_alone(setup):
    models, stats, rows = setup
    for row in [r for r in rows if r.smoothing == "none"][:2]:
        ref = models[row.transformer]
        alone = quantize_(
            copy.deepcopy(ref), Int8W8A8Config(protect=()), filter_fn=lambda m, n, t=row.module: n == t
        )
        assert _output_error(alone, ref, stats.probes[row.transformer]) == pytest.approx(row.error, rel=1e-6)


def test_fragility_csv_round_trip(setup, tmp_path):
    _, _, rows = setup
    path = write_csv(rows, tmp_path / "fragility.csv")
    with open(path) as f:
        header = next(csv.reader(f))
    assert header[:3] == ["rank", "transformer", "module"]
    back = read_csv(path)
    assert [(r.transformer, r.module, r.rank) for r in back] == [
        (r.transformer, r.module, r.rank) for r in rows
    ]
    assert all(abs(a.error - b.error) <= 1e-5 * b.error for a, b in zip(back, rows, strict=True))


def _row(tr, module, error, extra=100):
    return FragilityRow(
        tr,
        module,
        module.replace("to_q", "qkv").replace("to_k", "qkv"),
        8,
        8,
        64,
        extra,
        error,
        0.0,
        "none",
        False,
    )


def test_protect_budgets():
    rows = [
        _row("transformer", "layers.0.attention.to_q", 0.5),
        _row("transformer", "layers.0.attention.to_k", 0.4),
        _row("transformer", "layers.0.feed_forward.w2", 0.6),
        _row("unconditional_transformer", "input_proj", 0.05, extra=50),
        _row("transformer", "layers.0.adaln_modulation", 9.0),  # always protected: not a candidate
    ]
    # q and k are one fused qkv tensor: one unit, error 0.9
    assert choose_protected(rows, ProtectBudget(count=1)) == {
        "transformer": ["layers.0.attention.to_q", "layers.0.attention.to_k"]
    }
    assert choose_protected(rows, ProtectBudget.parse("2")) == {
        "transformer": ["layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.feed_forward.w2"]
    }
    assert choose_protected(rows, ProtectBudget.parse("bytes=150")) == {
        "transformer": ["layers.0.feed_forward.w2"],
        "unconditional_transformer": ["input_proj"],
    }
    assert choose_protected(rows, ProtectBudget.parse("error=0.7")) == {
        "transformer": ["layers.0.attention.to_q", "layers.0.attention.to_k"]
    }
    assert choose_protected(rows, ProtectBudget.parse("error=10")) == {}
    with pytest.raises(ConfigError, match="larger than the model"):
        choose_protected(rows, ProtectBudget(count=4))
    with pytest.raises(ConfigError, match="larger than the model"):
        choose_protected(rows, ProtectBudget.parse("bytes=1kb"))
    assert ProtectBudget.parse("bytes=2GB").extra_bytes == 2_000_000_000
    assert ProtectBudget.parse("bytes=1.5MiB").extra_bytes == 1_572_864
    for bad in ("lots", "bytes=2XB", "error=-1", "count=-2"):
        with pytest.raises(ConfigError):
            ProtectBudget.parse(bad)


def test_sensitivity_cli_writes_the_ranked_table(setup, tmp_path):
    models, stats, rows = setup
    for name, model in models.items():
        folder = tmp_path / "model" / name
        folder.mkdir(parents=True)
        model.save_config(folder)
        save_safetensors(
            folder / "diffusion_pytorch_model.safetensors", split_to_fused(fp8_state_dict(model))
        )
    stats_path = stats.save(tmp_path / "stats.safetensors")
    out = tmp_path / "fragility.csv"
    argv = ["sensitivity", str(tmp_path / "model"), "--stats", str(stats_path), "-o", str(out)]
    assert main([*argv, "--dtype", "fp32", "--budget", "count=2"]) == 0
    table = read_csv(out)
    assert len(table) == len(rows) and table[0].rank == 1
    assert {r.transformer for r in table} == {"transformer", "unconditional_transformer"}
    assert main([*argv, "--alpha", "7"]) == 2  # alpha outside [0, 1]: a ConfigError, exit status 2
