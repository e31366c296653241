"""--offload, --compile, --attention and the @attn8 variant suffix on the generating verbs, on the tiny model."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from ditq.cli import main
from ditq.errors import ConfigError
from ditq.models.execution import ExecutionOptions, split_variant
from ditq.models.sampling import SamplingSettings
from ditq.runs.variant import resolve_policy


def test_variant_suffix_names_the_model_and_how_it_runs():
    assert split_variant("int8") == ("int8", {})
    assert split_variant("int8@attn8") == ("int8", {"attention": "int8"})
    assert split_variant("int8+q4_k@attn8") == ("int8+q4_k", {"attention": "int8"})
    with pytest.raises(ConfigError, match=r"unknown suffix @fast; known: @attn8"):
        split_variant("int8@fast")
    with pytest.raises(ConfigError, match="no variant name"):
        split_variant("@attn8")


def test_auto_asks_the_planner_on_cuda_and_is_none_on_the_host(monkeypatch):
    calls = []

    def choose_policy(model, settings, device):
        calls.append((model, settings.height, device))
        return "group"

    plan = types.ModuleType("ditq.quant.plan")
    plan.choose_policy = choose_policy
    monkeypatch.setitem(sys.modules, "ditq.quant.plan", plan)
    settings = SamplingSettings(height=512, width=512)
    assert (
        resolve_policy(ExecutionOptions(device="cuda:1", offload="auto"), "variants/q4_k", settings)
        == "group"
    )
    assert calls == [("variants/q4_k", 512, "cuda:1")]
    assert resolve_policy(ExecutionOptions(device="cpu", offload="auto"), "tiny", settings) == "none"
    assert resolve_policy(ExecutionOptions(device="cuda", offload="model"), "tiny", settings) == "model"
    assert len(calls) == 1


def test_generate_offload_policies_give_the_same_image_and_are_recorded(tiny_fp8_dir, tmp_path):
    pixels = {}
    for policy in ("none", "encoder", "auto"):
        args = ["generate", "--model", str(tiny_fp8_dir), "--prompt", "a red fox", "--steps", "2"]
        assert main([*args, "--offload", policy, "-o", str(tmp_path / policy)]) == 0
        image = Image.open(tmp_path / policy / "000_s0.png")
        pixels[policy] = np.asarray(image)
        assert image.text["offload"] == ("none" if policy == "auto" else policy)  # auto: none on the CPU
    assert np.array_equal(pixels["none"], pixels["encoder"]) and np.array_equal(
        pixels["none"], pixels["auto"]
    )


def test_run_records_the_policy_and_execution_per_variant(tiny_fp8_dir, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_fp8_dir), "--limit", "1", "--steps", "1", "--offload", "group"]
    assert main([*args, "-o", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["execution"]["offload"] == "group" and run["execution"]["attention"] == "sdpa"
    fp8 = run["variants"]["fp8"]
    assert fp8["offload"] == "group" and fp8["execution"]["compile"] is False and fp8["attention"] == "sdpa"
    (rec,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert rec["offload"] == "group"
    # the same image as without offloading
    assert main([*args[:-1], "none", "-o", str(tmp_path / "none")]) == 0
    (none,) = [json.loads(line) for line in (tmp_path / "none" / "manifest.jsonl").read_text().splitlines()]
    assert none["sha256"] == rec["sha256"]


def test_attn8_variant_on_the_cpu_is_refused_before_any_image(tiny_fp8_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "run",
        "--model",
        str(tiny_fp8_dir),
        "--variants",
        "fp8,fp8@attn8",
        "--limit",
        "1",
        "--steps",
        "1",
    ]
    assert main([*args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "variant fp8@attn8" in err and "needs a CUDA GPU" in err
    assert not (out / "manifest.jsonl").exists()
    code = main(
        ["generate", "--model", str(tiny_fp8_dir), "--prompt", "x", "--attention", "int8", "-o", str(out)]
    )
    assert code == 2 and "--attention int8: INT8 attention needs a CUDA GPU" in capsys.readouterr().err


def test_attn8_variant_runs_the_base_folder_with_int8_attention(tiny_fp8_dir, tmp_path, monkeypatch, capsys):
    """With the INT8 kernel stood in by SDPA (the processor's own test holds it equal to diffusers'), the suffix
    reaches the loader and the variant's image is the base variant's: same folder, same pixels."""
    import ditq.models.attention as attention

    monkeypatch.setattr(attention, "int8_attention_available", lambda device: (True, ""))
    seen = []
    real = attention.set_attention

    def spy(pipe, kind, kernel=None):
        seen.append(kind)
        return real(pipe, kind, attention.sdpa_kernel if kind == "int8" else kernel)

    monkeypatch.setattr(attention, "set_attention", spy)  # the loader imports it at call time
    out = tmp_path / "run"
    args = [
        "run",
        "--model",
        str(tiny_fp8_dir),
        "--variants",
        "fp8,fp8@attn8",
        "--limit",
        "1",
        "--steps",
        "1",
    ]
    assert main([*args, "--offload", "none", "-o", str(out)]) == 0
    assert seen == ["int8"]
    recs = {
        json.loads(line)["variant"]: json.loads(line)
        for line in (out / "manifest.jsonl").read_text().splitlines()
    }
    assert recs["fp8@attn8"]["path"].startswith("images/fp8@attn8/")
    run = json.loads((out / "run.json").read_text())
    assert (
        run["variants"]["fp8@attn8"]["attention"] == "int8" and run["variants"]["fp8"]["attention"] == "sdpa"
    )
    assert run["variants"]["fp8@attn8"]["model"] == str(tiny_fp8_dir)
    a, b = (np.asarray(Image.open(out / recs[v]["path"])) for v in ("fp8", "fp8@attn8"))
    assert np.array_equal(a, b)  # the processor around SDPA computes what diffusers' does
    # a resume that would run a variant with another kernel is refused, naming it
    capsys.readouterr()
    assert main([*args, "--attention", "int8", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "variant 'fp8' was made with attention sdpa, not int8" in err


def test_calibrate_under_each_offload_policy_records_the_same_statistics(tiny_fp8_dir, tmp_path):
    from safetensors.torch import load_file

    captions = tmp_path / "c.jsonl"
    captions.write_text(
        json.dumps({"prompt": "a red fox"}) + "\n" + json.dumps({"prompt": "a sign: OPEN"}) + "\n"
    )
    stats = {}
    for policy in ("none", "encoder", "group", "model"):
        out = tmp_path / f"{policy}.safetensors"
        argv = ["calibrate", str(tiny_fp8_dir), "--captions", str(captions), "--samples", "2", "--steps", "2"]
        assert main([*argv, "--sample-tokens", "16", "--offload", policy, "-o", str(out)]) == 0
        stats[policy] = load_file(str(out))
    assert len(stats["none"]) > 10
    for policy in ("encoder", "group", "model"):
        assert stats[policy].keys() == stats["none"].keys(), policy
        for key, ref in stats["none"].items():
            assert torch.equal(stats[policy][key], ref), (policy, key)
