from __future__ import annotations

import json

import numpy as np
from PIL import Image

from ditq.cli import main


def test_generate_writes_png_with_settings_and_is_reproducible(tiny_fp8_dir, tmp_path, capsys):
    args = ["generate", "--model", str(tiny_fp8_dir), "--prompt", "a red fox", "--seed", "5", "--steps", "2"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    assert main([*args, "-o", str(tmp_path / "b")]) == 0
    a, b = Image.open(tmp_path / "a" / "000_s5.png"), Image.open(tmp_path / "b" / "000_s5.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.size == (64, 64)
    assert a.text["prompt"] == "a red fox" and a.text["seed"] == "5" and a.text["variant"] == "fp8"
    settings = json.loads(a.text["settings"])
    assert settings["steps"] == 2 and len(settings["guidance_schedule"]) == 2
    assert not list((tmp_path / "a").glob("*.partial"))


def test_generate_reads_jsonl_prompts_and_multiple_seeds(tiny_fp8_dir, tmp_path):
    from ditq.prompts.suite import load_suite

    caption = load_suite("smoke")[0].caption  # a caption that follows the official rules
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "one"}) + "\n" + json.dumps({"caption": caption}) + "\n")
    code = main(
        [
            "generate",
            "--model",
            str(tiny_fp8_dir),
            "--prompts",
            str(prompts),
            "--seed",
            "0,1",
            "--steps",
            "1",
            "-o",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "000_s0.png",
        "000_s1.png",
        "001_s0.png",
        "001_s1.png",
    ]
    assert Image.open(tmp_path / "o" / "001_s0.png").text["prompt"] == caption


def test_generate_never_replaces_an_earlier_image_without_force(tiny_fp8_dir, tmp_path, capsys):
    """Another prompt into the same folder would reuse the name 000_s0.png: refused in one line before anything
    loads, the earlier image kept; --force replaces it."""
    out = tmp_path / "o"
    common = ["generate", "--model", str(tiny_fp8_dir), "--seed", "0", "--steps", "1", "-o", str(out)]
    assert main([*common, "--prompt", "a red fox"]) == 0
    before = (out / "000_s0.png").read_bytes()
    capsys.readouterr()
    assert main([*common, "--prompt", "a neon sign"]) == 2
    err = capsys.readouterr().err
    assert "000_s0.png already exist" in err and "--force" in err and err.count("\n") == 1
    assert (out / "000_s0.png").read_bytes() == before
    assert main([*common, "--prompt", "a neon sign", "--force"]) == 0
    assert Image.open(out / "000_s0.png").text["prompt"] == "a neon sign"
