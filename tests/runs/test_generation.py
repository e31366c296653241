"""Paired runs: identical noise across variants, resume after interruption, torchrun sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ditq.errors import ConfigError
from ditq.models.sampling import SamplingSettings
from ditq.runs.generation import RunSpec, run_generation
from ditq.runs.manifest import read_jsonl

SETTINGS = SamplingSettings(
    height=64, width=64, steps=2, guidance_schedule=(7.0, 3.0), max_sequence_length=512
)


@pytest.fixture(scope="module")
def nf4_dir(tiny_fp8_dir, tmp_path_factory):
    from ditq.quant.writer import quantize_pipeline

    return quantize_pipeline(str(tiny_fp8_dir), "nf4", tmp_path_factory.mktemp("v") / "nf4", progress=False)


def _spec(variants, **kw):
    return RunSpec(variants=variants, suite="smoke", seeds=(0,), settings=SETTINGS, limit=2, **kw)


def test_paired_noise_is_identical_across_variants(tiny_fp8_dir, nf4_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_generation(run_dir, _spec({"fp8": str(tiny_fp8_dir), "nf4": str(nf4_dir)}), progress=False)
    assert result["generated"] == 4
    recs = read_jsonl(run_dir / "manifest.jsonl")
    by_key = {}
    for r in recs:
        by_key.setdefault((r["prompt_id"], r["seed"]), {})[r["variant"]] = r
    assert len(by_key) == 2
    for pair in by_key.values():
        assert pair["fp8"]["noise_sha256"] == pair["nf4"]["noise_sha256"]
        assert pair["fp8"]["sha256"] != pair["nf4"]["sha256"]  # different weights, different pixels
    run = json.loads((run_dir / "run.json").read_text())
    assert (
        run["variants"]["nf4"]["bytes_on_disk"]["transformer"]
        < run["variants"]["fp8"]["bytes_on_disk"]["transformer"]
    )
    assert run["prompt_ids"] == [
        r["id"] for r in map(json.loads, (run_dir / "prompts.jsonl").read_text().splitlines())
    ]


def test_resume_generates_only_missing_images(tiny_fp8_dir, tmp_path):
    run_dir = tmp_path / "run"
    spec = _spec({"fp8": str(tiny_fp8_dir)}, caption_modes=("json", "raw"))
    first = run_generation(run_dir, spec, progress=False, stop_after=1)
    assert first["generated"] == 1 and first.get("stopped")
    # a crash mid-write leaves a torn line; it must not break the resume
    with open(run_dir / "manifest.jsonl", "a") as f:
        f.write('{"variant": "fp8", "prompt_')
    second = run_generation(run_dir, spec, progress=False)
    assert second["generated"] == 3 and second["skipped"] == 1
    recs = read_jsonl(run_dir / "manifest.jsonl")
    keys = [(r["variant"], r["prompt_id"], r["seed"], r["caption_mode"]) for r in recs]
    assert len(keys) == len(set(keys)) == 4
    third = run_generation(run_dir, spec, progress=False)
    assert third["generated"] == 0


def test_refuses_to_mix_settings(tiny_fp8_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_generation(run_dir, _spec({"fp8": str(tiny_fp8_dir)}), progress=False, stop_after=0)
    other = RunSpec(
        variants={"fp8": str(tiny_fp8_dir)},
        suite="smoke",
        seeds=(0,),
        limit=2,
        settings=SamplingSettings(
            height=64, width=64, steps=3, guidance_schedule=(7.0, 7.0, 3.0), max_sequence_length=512
        ),
    )
    with pytest.raises(ConfigError, match="made with settings"):
        run_generation(run_dir, other, progress=False)
    with pytest.raises(ConfigError, match="made with suite"):
        run_generation(
            run_dir,
            RunSpec(
                variants={"fp8": str(tiny_fp8_dir)}, suite="quick", seeds=(0,), settings=SETTINGS, limit=2
            ),
            progress=False,
        )


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(tiny_fp8_dir, tmp_path):
    pytest.importorskip("torch.distributed")
    common = [
        "--model",
        str(tiny_fp8_dir),
        "--variants",
        "fp8",
        "--suite",
        "smoke",
        "--limit",
        "3",
        "--seeds",
        "0,1",
        "--steps",
        "2",
        "--dtype",
        "fp32",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, "-m", "ditq", "run", *common, "-o", str(one)],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    two = tmp_path / "two"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            "-m",
            "ditq",
            "run",
            *common,
            "-o",
            str(two),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = {(r["prompt_id"], r["seed"]): r["sha256"] for r in read_jsonl(one / "manifest.jsonl")}
    b = {(r["prompt_id"], r["seed"]): r["sha256"] for r in read_jsonl(two / "manifest.jsonl")}
    assert len(a) == 6 and a == b
    assert not list(two.glob("manifest.rank*.jsonl"))
    assert len(read_jsonl(two / "manifest.jsonl")) == 6


def test_each_torchrun_rank_sets_its_own_cuda_device_first(monkeypatch):
    from ditq.runs.generation import rank_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(str(d)))
    assert rank_device("cuda", world=2, local_rank=1) == "cuda:1" and chosen == ["cuda:1"]
    assert rank_device("cuda:0", world=1, local_rank=0) == "cuda:0" and chosen[-1] == "cuda:0"
    assert rank_device("cpu", world=2, local_rank=1) == "cpu" and len(chosen) == 2
