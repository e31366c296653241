"""Calibration statistics: checked against statistics computed directly from the inputs; file round trip; the
pipeline path through the CLI (both transformers, per bucket)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ditq.cli import main
from ditq.errors import ConfigError
from ditq.quant.calibration import (
    CalibrationRecorder,
    CalibrationStats,
    calibrate_pipeline,
    importance,
    probe_inputs,
)


class Toy(nn.Module):
    """Two Linears fed the same tensor (one record, one alias) and one fed another."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(6, 3)
        self.c = nn.Linear(4, 2)

    def forward(self, hidden_states, timestep):
        ya, yb = self.a(hidden_states), self.b(hidden_states)
        return self.c(ya) + yb.sum(-1, keepdim=True)


def _record(calls, **kw):
    torch.manual_seed(0)
    model = Toy()
    rec = CalibrationRecorder(buckets=(0.0, 0.5, 1.0), **kw).attach(model, "toy")
    with torch.no_grad():
        for x, t in calls:
            model(x, timestep=torch.tensor([t]))
    rec.detach()
    return model, rec.result({"samples": len(calls)})


def _calls():
    g = torch.Generator().manual_seed(1)
    calls = [(torch.randn(2, 5, 6, generator=g) * (i + 1), t) for i, t in enumerate((0.1, 0.7, 0.3, 0.9))]
    calls[0][0][0, 0] = 0.0  # an all-zero (padding) token is not counted
    return calls


def test_recorder_statistics_match_direct_computation():
    calls = _calls()
    _, stats = _record(calls, sample_tokens=64)
    assert stats.aliases["toy"] == {"b": "a"} and set(stats.modules["toy"]) == {"a", "c"}
    st = stats.get("toy", "b")  # resolved through the alias
    for bucket, members in ((0, (0, 2)), (1, (1, 3))):
        x = torch.cat([calls[i][0].reshape(-1, 6) for i in members])
        x = x[x.abs().amax(1) > 0]
        assert torch.equal(st.absmax[bucket], x.abs().amax(0))
        assert torch.allclose(st.sumsq[bucket], (x.double() ** 2).sum(0))
        assert int(st.count[bucket]) == x.shape[0]
        tok = x.abs().amax(1)
        want = torch.quantile(tok, torch.tensor(stats.quantiles))
        assert torch.allclose(st.token_absmax_quantiles[bucket], want)
    all_x = torch.cat([c[0].reshape(-1, 6) for c in calls])
    all_x = all_x[all_x.abs().amax(1) > 0]
    assert torch.equal(
        st.samples.float(), all_x.to(torch.bfloat16).float()
    )  # fewer tokens than the reservoir
    want_energy = (all_x.double() ** 2).mean(0).float().numpy()
    assert np.allclose(importance(stats, "toy", "b"), want_energy, rtol=1e-6)


def test_reservoir_keeps_a_uniform_sample_of_fixed_size():
    _, stats = _record(_calls(), sample_tokens=7)
    samples = stats.get("toy", "a").samples.float()
    all_x = torch.cat([c[0].reshape(-1, 6) for c in _calls()]).to(torch.bfloat16).float()
    assert samples.shape == (7, 6)
    assert all(any(torch.equal(s, r) for r in all_x) for s in samples)


def test_statistics_file_round_trip(tmp_path):
    _, stats = _record(_calls(), sample_tokens=8)
    stats.meta["captions_sha256"] = "abc"
    path = stats.save(tmp_path / "stats.safetensors")
    back = CalibrationStats.load(path)
    assert back.buckets == (0.0, 0.5, 1.0) and back.aliases == stats.aliases
    assert back.meta["samples"] == 4 and back.meta["captions_sha256"] == "abc"
    assert back.meta["models"]["toy"]["fingerprint"] == stats.meta["models"]["toy"]["fingerprint"]
    for name, st in stats.modules["toy"].items():
        other = back.modules["toy"][name]
        for f in ("absmax", "sumsq", "count", "token_absmax_quantiles", "samples"):
            assert torch.equal(getattr(st, f), getattr(other, f)), f


def test_zero_calibration_samples_and_bad_buckets_are_refused():
    with pytest.raises(ConfigError, match="at least one caption"):
        calibrate_pipeline(None, [])
    with pytest.raises(ConfigError, match="increasing"):
        CalibrationRecorder(buckets=(0.0, 0.5, 0.5, 1.0))


def test_calibrate_cli_records_both_transformers_per_bucket(tmp_path):
    captions = tmp_path / "captions.jsonl"
    lines = [{"caption": {"high_level_description": "a red fox"}}, {"prompt": "a poster that reads OPEN"}]
    captions.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "stats.safetensors"
    argv = ["calibrate", "tiny", "--captions", str(captions), "--samples", "2", "-o", str(out)]
    argv += ["--steps", "4", "--height", "32", "--width", "32", "--buckets", "2", "--sample-tokens", "16"]
    assert main(argv) == 0
    stats = CalibrationStats.load(out)
    assert stats.transformers == ["transformer", "unconditional_transformer"]
    assert stats.meta["samples"] == 2 and len(stats.meta["captions_sha256"]) == 64
    assert stats.buckets == (0.0, 0.5, 1.0) and stats.meta["settings"]["steps"] == 4
    cond, uncond = (
        stats.get("transformer", "llm_cond_proj"),
        stats.get("unconditional_transformer", "llm_cond_proj"),
    )
    assert (
        int(cond.count.sum()) > 0 and int(uncond.count.sum()) == 0
    )  # zeroed text in the unconditional branch
    q = stats.get("transformer", "layers.0.attention.qkv")
    assert q is stats.get("transformer", "layers.0.attention.to_v") and (q.count > 0).all()
    assert not torch.equal(q.absmax, stats.get("unconditional_transformer", "layers.0.attention.to_q").absmax)
    probe = stats.probes["transformer"][0]
    kw = probe_inputs(probe)
    assert (
        kw["encoder_hidden_states"].shape[-1] == 416
        and kw["hidden_states"].shape[:2] == kw["indicator"].shape
    )
    assert len(stats.probes["unconditional_transformer"]) == 2
    with pytest.raises(SystemExit):
        main(["calibrate", "tiny", "--samples", "0"])
    assert main(["calibrate", "tiny", "--captions", str(captions), "--samples", "3", "-o", str(out)]) == 2
