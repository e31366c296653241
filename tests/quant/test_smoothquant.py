"""SmoothQuant: the folds are exact, α search beats plain W8A8 on outlier channels, and on a tiny transformer with
trained-DiT-like outlier channels the output error orders plain W8A8 > SmoothQuant > SmoothQuant + protection."""

from __future__ import annotations

import copy

import pytest
import torch

from ditq.errors import ConfigError
from ditq.formats.int8 import Int8Linear
from ditq.quant.api import quantization_record, quantize_
from ditq.quant.calibration import CalibrationRecorder, ModuleStats, probe_inputs, synthetic_inputs
from ditq.quant.int8 import DEFAULT_PROTECT, Int8W8A8Config, SmoothQuantConfig
from ditq.quant.int8.sensitivity import ProtectBudget, choose_protected, measure_fragility
from ditq.quant.int8.smoothquant import (
    fold_into_norm,
    scale_columns,
    scale_rows,
    search_alpha,
    smooth_groups,
    w8a8_relative_error,
)

OUTLIER_GAINS = (20.0, 50.0, 100.0)


def tiny_transformer(seed: int = 0):
    from diffusers import Ideogram4Transformer2DModel

    from ditq.models.tiny import TinySpec, transformer_config

    torch.manual_seed(seed)
    model = Ideogram4Transformer2DModel(**transformer_config(TinySpec())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return model


def with_outliers(model, seed: int = 0):
    """Three hidden channels per norm 20-100x larger, as in trained DiTs: the norm weight grows and the next
    Linear's input columns shrink by the same factor, so the float function is unchanged."""
    g = torch.Generator().manual_seed(seed)
    pairs = [(model.llm_cond_norm, [model.llm_cond_proj])]
    for blk in model.layers:
        pairs.append((blk.attention_norm1, [blk.attention.to_q, blk.attention.to_k, blk.attention.to_v]))
        pairs.append((blk.ffn_norm1, [blk.feed_forward.w1, blk.feed_forward.w3]))
    gains = torch.tensor(OUTLIER_GAINS)
    with torch.no_grad():
        for norm, linears in pairs:
            ch = torch.randperm(norm.weight.shape[0], generator=g)[: len(gains)]
            norm.weight[ch] *= gains
            for lin in linears:
                lin.weight[:, ch] /= gains
    return model


def calibrate(model, name: str = "transformer"):
    rec = CalibrationRecorder(sample_tokens=64).attach(model, name)
    with torch.no_grad():
        for i, t in enumerate((0.1, 0.3, 0.6, 0.9, 0.15, 0.4, 0.7, 0.95)):
            model(**synthetic_inputs(model.config, text_tokens=16, grid=(8, 8), timestep=t, seed=i))
    rec.detach()
    return rec.result()


def output_error(model, ref, stats, name: str = "transformer") -> float:
    num = den = 0.0
    with torch.no_grad():
        for p in stats.probes[name]:
            kw = probe_inputs(p)
            image = kw["indicator"] == 2
            y, r = model(**kw).sample[image].double(), ref(**kw).sample[image].double()
            num += float(((y - r) ** 2).sum())
            den += float((r**2).sum())
    return num / den


@pytest.fixture(scope="module")
def outlier_model():
    model = with_outliers(tiny_transformer())
    return model, calibrate(model)


def test_every_fold_in_the_group_table_is_exact():
    model = tiny_transformer(1).double()
    kw = synthetic_inputs(model.config, text_tokens=8, grid=(4, 4), dtype=torch.float64)
    with torch.no_grad():
        ref = model(**kw).sample
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        g = torch.Generator().manual_seed(0)
        folded = 0
        for group in smooth_groups(linears):
            if group.fold is None:
                continue
            k = model.get_submodule(group.linears[0]).in_features
            s = (torch.rand(k, generator=g, dtype=torch.float64) * 9.9 + 0.1).float().double()
            kind, target = group.fold
            tgt = model.get_submodule(target)
            if kind == "norm":
                tgt.weight.copy_(fold_into_norm(tgt.weight, s))
            else:
                tgt.weight.copy_(scale_rows(tgt.weight, s))
            for name in group.linears:
                lin = model.get_submodule(name)
                lin.weight.copy_(scale_columns(lin.weight, s))
            folded += 1
        assert folded == 2 * 4 + 1  # per block: qkv, o, w1+w3, w2; and llm_cond_proj
        assert torch.allclose(model(**kw).sample, ref, rtol=1e-9, atol=1e-9)
    names = {g.name: g for g in smooth_groups(linears)}
    assert names["layers.0.attention.qkv"].linears == tuple(f"layers.0.attention.to_{p}" for p in "qkv")
    assert names["layers.0.attention.o"].fold == ("rows", "layers.0.attention.to_v")
    assert names["final_layer.linear"].fold is None


def test_alpha_search_migrates_outliers_and_never_loses_to_plain():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=g)
    x[:, :4] *= 60.0
    w = torch.randn(64, 128, generator=g) / 10
    stats = ModuleStats(
        absmax=x.abs().amax(0, keepdim=True),
        sumsq=(x.double() ** 2).sum(0, keepdim=True),
        count=torch.tensor([256]),
        token_absmax_quantiles=torch.zeros(1, 5),
        samples=x[:64].to(torch.bfloat16),
    )
    choice = search_alpha([w], stats, [i / 10 for i in range(11)])
    assert choice.alpha is not None and 0.2 <= choice.alpha <= 0.9
    assert choice.error < choice.plain_error / 5
    assert choice.errors["none"] == pytest.approx(w8a8_relative_error(w, stats.samples.float()))
    fixed = search_alpha([w], stats, [0.3], alpha=0.5)
    assert fixed.alpha == 0.5 and set(fixed.errors) == {"none", "0.5"}
    with pytest.raises(Exception, match="input channels"):
        search_alpha([torch.randn(4, 64)], stats, [0.5], where="layers.9.attention.qkv")


def test_qkv_share_one_folded_smoothing_vector(outlier_model):
    model, stats = outlier_model
    q = quantize_(copy.deepcopy(model), SmoothQuantConfig(), stats=stats)
    group = quantization_record(q).details["groups"]["layers.0.attention.qkv"]
    assert group["mode"] == "folded" and group["fold"] == "norm:layers.0.attention_norm1"
    assert group["error"] < group["plain_error"]
    att = q.layers[0].attention
    assert all(isinstance(m, Int8Linear) and m.inv_smooth is None for m in (att.to_q, att.to_k, att.to_v))
    s = model.layers[0].attention_norm1.weight / q.layers[0].attention_norm1.weight  # the one s, recovered
    for name in ("to_q", "to_k"):  # to_v's rows also carry 1/s of to_out's smoothing
        w = getattr(model.layers[0].attention, name).weight.detach() * s.detach()[None, :]
        assert torch.allclose(getattr(att, name).dequantized_weight(), w, atol=float(w.abs().max()) / 100)
    assert isinstance(q.layers[0].adaln_modulation, torch.nn.Linear)  # protected by default


def test_output_error_plain_gt_smoothquant_gt_smoothquant_with_protection(outlier_model):
    model, stats = outlier_model
    plain = output_error(quantize_(copy.deepcopy(model), Int8W8A8Config()), model, stats)
    sq = quantize_(copy.deepcopy(model), SmoothQuantConfig(), stats=stats)
    smooth = output_error(sq, model, stats)
    # protect the two most fragile layers the SmoothQuant recipe still quantizes
    kept = tuple(quantization_record(sq).details["kept_float"])
    rows = measure_fragility(model, stats, "transformer", SmoothQuantConfig(), progress=False)
    chosen = choose_protected(rows, ProtectBudget(count=2), always=(*DEFAULT_PROTECT, *kept))["transformer"]
    assert len(chosen) == 2 and not set(chosen) & set(kept)
    config = SmoothQuantConfig(base=Int8W8A8Config(protect=(*DEFAULT_PROTECT, *chosen)))
    both = output_error(quantize_(copy.deepcopy(model), config, stats=stats), model, stats)
    assert plain > 50 * smooth, (plain, smooth)
    assert smooth > 1.2 * both, (smooth, both)


def test_smoothquant_config_validation():
    with pytest.raises(ConfigError, match="alpha must be in"):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="alpha_grid"):
        SmoothQuantConfig(alpha_grid=(0.5, -0.1))
    with pytest.raises(ConfigError, match="unfoldable"):
        SmoothQuantConfig(unfoldable="fold")
    with pytest.raises(ConfigError, match="protect"):
        Int8W8A8Config(protect="layers.*")
    with pytest.raises(ConfigError, match="statistics"):
        quantize_(tiny_transformer(), SmoothQuantConfig())


def test_prepare_calibrate_convert_and_refuse_requantizing():
    model = with_outliers(tiny_transformer(2), seed=2)
    ref = copy.deepcopy(model)
    quantize_(model, SmoothQuantConfig(step="prepare"))
    with torch.no_grad():
        for i, t in enumerate((0.2, 0.5, 0.8)):
            model(**synthetic_inputs(model.config, timestep=t, seed=i))
    quantize_(model, SmoothQuantConfig(alpha=0.5))
    assert quantization_record(model).details["alpha"]["layers.1.feed_forward.w1+w3"] == 0.5
    kw = synthetic_inputs(model.config, timestep=0.3, seed=9)
    with torch.no_grad():
        y, r = model(**kw).sample, ref(**kw).sample
    assert float(((y - r) ** 2).sum() / (r**2).sum()) < 1e-3
    with pytest.raises(ConfigError, match="already has"):
        quantize_(model, Int8W8A8Config())
