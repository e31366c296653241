"""`ditq quantize --recipe int8 --protect N`: the same bf16 set with or without a precomputed fragility table."""

from __future__ import annotations

import json

import pytest

from ditq.cli import main


def _kept(folder):
    summary = json.loads((folder / "ditq.json").read_text())["summary"]
    return {tr: {m for m, why in s["kept_bf16"].items() if why == "protected"} for tr, s in summary.items()}


@pytest.mark.slow
def test_protect_budget_measures_fragility_when_no_table(tiny_fp8_dir, tmp_path):
    stats = tmp_path / "stats.safetensors"
    assert main(["calibrate", str(tiny_fp8_dir), "--samples", "1", "-o", str(stats)]) == 0
    table = tmp_path / "fragility.csv"
    assert main(["sensitivity", str(tiny_fp8_dir), "--stats", str(stats), "-o", str(table)]) == 0
    common = ["quantize", str(tiny_fp8_dir), "--recipe", "int8", "--stats", str(stats), "--protect", "2"]
    assert main([*common, "--fragility", str(table), "-o", str(tmp_path / "a")]) == 0
    assert main([*common, "-o", str(tmp_path / "b")]) == 0
    a, b = _kept(tmp_path / "a"), _kept(tmp_path / "b")
    assert a == b
    defaults = {"adaln_proj", "t_embedding.mlp_in", "t_embedding.mlp_out"}
    extra = sum(
        len({m for m in mods - defaults if not m.endswith("adaln_modulation")}) for mods in a.values()
    )
    assert extra == 2  # the budget: two layers (fused units) beyond the always-protected ones
