"""Pinned metric weights: sha256 recorded per weight file, and `--expect-hash` refusing any other weights."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from ditq.cli import main
from ditq.errors import ConfigError
from ditq.metrics import evaluate_run
from ditq.metrics.lpips import LPIPS
from ditq.metrics.preference import ClipScore, HPSv2, weight_paths
from ditq.metrics.weights import check_expected, hash_weights, parse_expected_hashes, sha256_file


@pytest.fixture
def run_dir(tmp_path, write_jsonl):
    rng = np.random.default_rng(0)
    root = tmp_path / "run"
    manifest = []
    for variant in ("fp8", "int8"):
        path = f"images/{variant}/json/p_s0.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / path)
        manifest.append(
            {"variant": variant, "prompt_id": "p", "seed": 0, "caption_mode": "json", "path": path}
        )
    run = {"prompt_ids": ["p"], "seeds": [0], "caption_modes": ["json"], "reference_variant": "fp8"}
    (root / "run.json").write_text(json.dumps(run | {"variants": {"fp8": {}, "int8": {}}}))
    write_jsonl(root / "prompts.jsonl", [{"id": "p", "prompt": "a kite"}])
    write_jsonl(root / "manifest.jsonl", manifest)
    return root


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sha256_and_reuse_of_unchanged_files(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(os.urandom(3 << 20) * 3)  # more than one 8 MiB chunk
    assert sha256_file(path) == _sha(path)
    (first,) = hash_weights([path])
    assert first.sha256 == _sha(path) and first.bytes == path.stat().st_size and first.file == "w.bin"
    # Same path, size and mtime: the recorded digest is reused (here a fake one, to show it is not recomputed).
    (reused,) = hash_weights([path], [first.as_dict() | {"sha256": "0" * 64}])
    assert reused.sha256 == "0" * 64
    os.utime(path, ns=(first.mtime_ns + 10**9, first.mtime_ns + 10**9))
    (fresh,) = hash_weights([path], [first.as_dict() | {"sha256": "0" * 64}])
    assert fresh.sha256 == _sha(path)
    with pytest.raises(ConfigError, match="cannot read weight file"):
        hash_weights([tmp_path / "absent.bin"])


def test_parse_expected_hashes():
    digest = "AB" * 32
    assert parse_expected_hashes([f"lpips={digest}", f" lpips = {'cd' * 32}"]) == {
        "lpips": {"ab" * 32, "cd" * 32}
    }
    for bad in ("lpips", "lpips=abc", f"={digest}", f"lpips={'g' * 64}"):
        with pytest.raises(ConfigError, match="expected METRIC=SHA256 with 64 hexadecimal digits"):
            parse_expected_hashes([bad])


def test_check_expected_wants_exactly_the_pinned_set(tmp_path):
    a, b = tmp_path / "alexnet.pth", tmp_path / "alex.pth"
    a.write_bytes(b"backbone")
    b.write_bytes(b"lin layers")
    lpips = LPIPS(backbone=a, lin=b)
    assert lpips.weight_files() == [a, b]
    files = hash_weights(lpips.weight_files())
    check_expected("lpips", files, {_sha(a), _sha(b)})
    with pytest.raises(
        ConfigError, match=rf"lpips: refusing weights that were not pinned: {b.resolve()} has sha256"
    ):
        check_expected("lpips", files, {_sha(a)})
    with pytest.raises(ConfigError, match="no loaded weight file has the expected sha256 " + "1" * 64):
        check_expected("lpips", files, {_sha(a), _sha(b), "1" * 64})
    with pytest.raises(ConfigError, match="found no weight files"):
        check_expected("lpips", [], {_sha(a)})


def test_weight_paths_follow_from_pretrained_preference(tmp_path, tiny_clip_folder):
    assert weight_paths(str(tiny_clip_folder)) == [tiny_clip_folder / "model.safetensors"]
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in index["weight_map"].values():
        (sharded / name).write_bytes(b"x")
    assert [p.name for p in weight_paths(str(sharded))] == [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert weight_paths(str(tmp_path / "nothing")) == []
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    checkpoint.write_bytes(b"hps")
    assert HPSv2(model=checkpoint, processor=tiny_clip_folder).weight_files() == [checkpoint]


def test_eval_records_and_enforces_pinned_weights(run_dir, tiny_clip_folder):
    clip = ClipScore(model=tiny_clip_folder)
    digest = _sha(tiny_clip_folder / "model.safetensors")
    evaluate_run(run_dir, [clip], progress=False, checks=False, expect_hashes={"clip_score": [digest]})
    entry = json.loads((run_dir / "metrics.json").read_text())["metrics"]["clip_score"]
    assert [w["sha256"] for w in entry["weights"]] == [digest] and entry["rows"] == 2
    before = (run_dir / "scores.csv").read_text()
    with pytest.raises(
        ConfigError,
        match=rf"clip_score: refusing weights that were not pinned: .*model\.safetensors has sha256 {digest}",
    ):
        evaluate_run(run_dir, [clip, "psnr"], progress=False, expect_hashes={"clip_score": ["e" * 64]})
    assert (run_dir / "scores.csv").read_text() == before  # refused before anything was scored
    with pytest.raises(ConfigError, match="--expect-hash names hpsv2, not among the metrics evaluated"):
        evaluate_run(run_dir, [clip], progress=False, expect_hashes={"hpsv2": ["e" * 64]})
    with pytest.raises(ConfigError, match="psnr found no weight files"):
        evaluate_run(run_dir, ["psnr"], progress=False, expect_hashes={"psnr": ["e" * 64]})
    missing = LPIPS(backbone=run_dir / "none.pth", lin=run_dir / "none2.pth")
    with pytest.raises(
        ConfigError,
        match="--expect-hash lpips=...: lpips is unavailable: AlexNet weights .*none.pth: no such file",
    ):
        evaluate_run(run_dir, [missing], progress=False, expect_hashes={"lpips": ["e" * 64]})


def test_cli_eval_expect_hash(run_dir, tiny_clip_folder, monkeypatch, capsys):
    monkeypatch.setenv("DITQ_CLIP_MODEL", str(tiny_clip_folder))
    digest = _sha(tiny_clip_folder / "model.safetensors")
    args = ["eval", str(run_dir), "--metrics", "clip_score", "--no-progress", "--no-checks"]
    assert main([*args, "--expect-hash", f"clip_score={'0' * 64}"]) == 2
    err = capsys.readouterr().err
    assert "ditq eval: error: clip_score: refusing weights that were not pinned" in err and digest in err
    assert not (run_dir / "scores.csv").exists()
    assert main([*args, "--expect-hash", f"clip_score={digest.upper()}"]) == 0
    assert "clip_score: 2 new rows" in capsys.readouterr().out
    assert main([*args, "--expect-hash", "clip_score=xyz"]) == 2
    assert "expected METRIC=SHA256" in capsys.readouterr().err
