"""Each kind of bad input gets one clear error naming what is wrong, and the CLI exits non-zero."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditq.cli import main
from ditq.errors import CheckpointError, ConfigError, ModelSourceError
from ditq.models.loading import load_pipeline

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def _rewrite(folder, fn):
    path = folder / WEIGHTS
    state = load_file(path)
    fn(state)
    save_file(state, path)


def test_unknown_hub_id_without_cache_or_network(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="not in the local Hugging Face cache"):
        load_pipeline("no-such-org/no-such-model")
    assert main(["generate", "--model", "no-such-org/no-such-model", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-org/no-such-model" in err[0]


def test_folder_missing_a_component(tiny_fp8_copy):
    shutil.rmtree(tiny_fp8_copy / "unconditional_transformer")
    with pytest.raises(ModelSourceError, match="'unconditional_transformer' is missing"):
        load_pipeline(tiny_fp8_copy)


def test_truncated_safetensors_names_the_file(tiny_fp8_copy):
    path = tiny_fp8_copy / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: truncated"):
        load_pipeline(tiny_fp8_copy)


def test_corrupt_safetensors_header(tiny_fp8_copy):
    path = tiny_fp8_copy / WEIGHTS
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_pipeline(tiny_fp8_copy)


def test_tensor_of_wrong_shape(tiny_fp8_copy):
    _rewrite(
        tiny_fp8_copy,
        lambda s: s.__setitem__("layers.0.attention_norm1.weight", torch.ones(7, dtype=torch.bfloat16)),
    )
    with pytest.raises(
        CheckpointError, match=r"'layers\.0\.attention_norm1\.weight' has shape \[7\], expected \[256\]"
    ):
        load_pipeline(tiny_fp8_copy)


def test_fp8_weight_of_wrong_shape(tiny_fp8_copy):
    def cut(s):
        s["layers.1.feed_forward.w2.weight"] = s["layers.1.feed_forward.w2.weight"][:, :100].contiguous()

    _rewrite(tiny_fp8_copy, cut)
    with pytest.raises(
        CheckpointError,
        match=r"layers\.1\.feed_forward\.w2\.weight is \[256, 100\] \(fp8\), expected \[256, 512\]",
    ):
        load_pipeline(tiny_fp8_copy)


def test_tensor_of_wrong_dtype(tiny_fp8_copy):
    _rewrite(
        tiny_fp8_copy,
        lambda s: s.__setitem__("layers.0.ffn_norm1.weight", torch.ones(256, dtype=torch.int32)),
    )
    with pytest.raises(CheckpointError, match=r"'layers\.0\.ffn_norm1\.weight' has dtype torch\.int32"):
        load_pipeline(tiny_fp8_copy)


def test_fp8_weight_without_scale(tiny_fp8_copy):
    _rewrite(tiny_fp8_copy, lambda s: s.pop("layers.0.feed_forward.w1.weight_scale"))
    with pytest.raises(CheckpointError, match=r"w1\.weight'? is torch\.float8_e4m3fn without a weight_scale"):
        load_pipeline(tiny_fp8_copy)


def test_non_finite_weight(tiny_fp8_copy):
    def poison(s):
        w = s["layers.1.ffn_norm2.weight"].clone()
        w[3] = float("nan")
        s["layers.1.ffn_norm2.weight"] = w

    _rewrite(tiny_fp8_copy, poison)
    with pytest.raises(CheckpointError, match=r"layers\.1\.ffn_norm2\.weight.*non-finite"):
        load_pipeline(tiny_fp8_copy)


def test_unexpected_tensor(tiny_fp8_copy):
    _rewrite(tiny_fp8_copy, lambda s: s.__setitem__("layers.9.extra.weight", torch.ones(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor layers\.9\.extra\.weight"):
        load_pipeline(tiny_fp8_copy)


def test_mixed_fused_and_split_keys(tiny_fp8_copy):
    _rewrite(
        tiny_fp8_copy,
        lambda s: s.__setitem__("layers.0.attention.to_q.weight", torch.ones(256, 256, dtype=torch.bfloat16)),
    )
    with pytest.raises(CheckpointError, match="mixes fused"):
        load_pipeline(tiny_fp8_copy)


def test_bad_height_width(tiny_fp8_dir, tmp_path, capsys):
    args = ["generate", "--model", str(tiny_fp8_dir), "--prompt", "x", "--height", "62", "--steps", "1"]
    assert main([*args, "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--height 62" in err and "multiples of 4" in err
    assert not list(tmp_path.iterdir())


def test_bad_guidance_schedule():
    from ditq.models.sampling import parse_guidance

    with pytest.raises(ConfigError, match="has 3 steps, expected --steps 4"):
        parse_guidance("2x7,1x3", 4)


def test_not_an_ideogram_folder(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelSourceError, match="expected 'Ideogram4Pipeline'"):
        load_pipeline(tmp_path)


def test_a_stray_gguf_beside_the_fp8_weights_is_refused_by_name(tiny_fp8_copy):
    """A .gguf dropped into an FP8 transformer folder must not silently replace its weights: both are named."""
    (tiny_fp8_copy / "transformer" / "stray.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"both GGUF \(stray.gguf\) and safetensors weights"):
        load_pipeline(tiny_fp8_copy)


def test_two_gguf_files_in_one_component_are_refused_by_name(tiny_fp8_copy):
    folder = tiny_fp8_copy / "transformer"
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "a.gguf").write_bytes(b"GGUF")
    (folder / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"2 GGUF files \(a.gguf, b.gguf\)"):
        load_pipeline(tiny_fp8_copy)


def test_an_os_error_is_one_line_naming_the_path(tmp_path, capsys):
    """An output whose parent is a file (any OSError: read-only, disk full, permission) ends in one line that
    names the path, exit 2 (a file error), no traceback."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    code = main(["captions", "suite", "--export", str(blocker / "quick.jsonl"), "--subset", "smoke"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and str(blocker) in err
