"""`--lora PATH[:STRENGTH]` on the command line: generate, run (resume refused with other LoRAs), quantize (merge
then quantize), bench (the reference gets the same LoRAs), and bad input as one line with exit code 2."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ditq.cli import main
from ditq.lora.targets import linear_shapes

from .builders import kohya_state, peft_state, random_lora, save
from .test_pipeline import MODULES

BRANCHES = ("transformer", "unconditional_transformer")
GEN = ["--prompt", "a red fox", "--seed", "3", "--steps", "2", "--offload", "none"]


@pytest.fixture(scope="module")
def lora_file(tiny_pipe, tmp_path_factory):
    """A LoRA for both transformers (kohya names for the conditional one, peft for the unconditional one), large
    enough to change a 64x64 image of the tiny model."""
    shapes = {b: linear_shapes(getattr(tiny_pipe, b)) for b in BRANCHES}
    cond = random_lora(shapes["transformer"], MODULES, seed=11, magnitude=2.0)
    uncond = random_lora(shapes["unconditional_transformer"], MODULES, seed=12, magnitude=2.0)
    state = {**kohya_state(cond), **peft_state(uncond, prefix="unconditional_transformer.")}
    return save(state, tmp_path_factory.mktemp("cli-lora") / "style.safetensors")


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _generate(model, out, *extra) -> np.ndarray:
    assert main(["generate", "--model", str(model), *GEN, *extra, "-o", str(out)]) == 0
    return _pixels(out / "000_s3.png")


def test_generate_lora_changes_the_image_and_strength_zero_is_the_base(tiny_fp8_dir, lora_file, tmp_path):
    base = _generate(tiny_fp8_dir, tmp_path / "base")
    styled = _generate(tiny_fp8_dir, tmp_path / "lora", "--lora", f"{lora_file}:1.5")
    zero = _generate(tiny_fp8_dir, tmp_path / "zero", "--lora", f"{lora_file}:0")
    assert np.abs(styled.astype(int) - base.astype(int)).mean() > 1.0  # a visible change, not rounding
    assert np.array_equal(zero, base)  # strength 0: no rank, the base bit for bit
    text = Image.open(tmp_path / "lora" / "000_s3.png").text
    (rec,) = json.loads(text["loras"])
    assert rec["strength"] == 1.5 and rec["name"] == "style"
    assert rec["sha256"] == hashlib.sha256(lora_file.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("{missing}", "no such LoRA file"),
        ("{file}:strong", "strength 'strong' is not a number"),
        ("{file}:nan", "not a finite number"),
    ],
)
def test_bad_lora_argument_is_one_line_naming_it(tiny_fp8_dir, lora_file, tmp_path, capsys, arg, expected):
    text = arg.format(missing=tmp_path / "nope.safetensors", file=lora_file)
    code = main(["generate", "--model", str(tiny_fp8_dir), *GEN, "--lora", text, "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "\n" not in err and expected in err and text in err
    assert not (tmp_path / "o").exists()  # refused before any model is loaded


def test_run_records_loras_and_refuses_a_resume_with_other_loras(tiny_fp8_dir, lora_file, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["run", "--model", str(tiny_fp8_dir), "--limit", "1", "--steps", "1", "-o", str(out)]
    assert main([*common, "--lora", f"{lora_file}:0.5"]) == 0
    run = json.loads((out / "run.json").read_text())
    (rec,) = run["loras"]
    assert rec["strength"] == 0.5 and rec["path"] == str(lora_file) and len(rec["sha256"]) == 64
    assert run["variants"]["fp8"]["loras"] == dict.fromkeys(["style"], dict.fromkeys(BRANCHES, len(MODULES)))
    capsys.readouterr()
    assert main([*common, "--lora", f"{lora_file}:0.5"]) == 0  # same LoRAs: resumes (nothing to do)
    assert "0 generated, 1 already done" in capsys.readouterr().out
    for other in ([], ["--lora", f"{lora_file}:0.8"]):
        assert main([*common, *other]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "this run was made with LoRAs" in err and "another output folder" in err


def test_quantize_lora_equals_merging_then_quantizing(tiny_fp8_dir, lora_file, tmp_path):
    from ditq.lora import LoraSpec, merge_lora_folder
    from ditq.quant.writer import quantize_pipeline

    out = tmp_path / "q"
    assert (
        main(["quantize", str(tiny_fp8_dir), "--recipe", "nf4", "--lora", f"{lora_file}:0.7", "-o", str(out)])
        == 0
    )
    merged = merge_lora_folder(tiny_fp8_dir, [LoraSpec(path=str(lora_file), strength=0.7)], tmp_path / "m")
    by_hand = quantize_pipeline(str(merged), "nf4", tmp_path / "h", progress=False)
    for b in BRANCHES:
        files = sorted(p.name for p in (out / b).glob("*.safetensors"))
        assert files and files == sorted(p.name for p in (by_hand / b).glob("*.safetensors"))
        for name in files:
            got, ref = load_file(str(out / b / name)), load_file(str(by_hand / b / name))
            assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), (b, name)
    record = json.loads((out / "ditq.json").read_text())
    assert record["source"] == str(tiny_fp8_dir) and record["summary"]["lora_merged"] is True
    (lora,) = record["summary"]["lora"]
    assert lora["strength"] == 0.7 and len(lora["sha256"]) == 64
    assert not list(tmp_path.glob(".q.lora-merged*"))  # the merged copy is removed


def test_bench_applies_the_loras_to_the_reference_too(tiny_fp8_dir, lora_file, tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--model", str(tiny_fp8_dir), "--variants", "fp8,nf4", "--limit", "1", "--steps", "1"]
    args += ["--caption-modes", "json", "--metrics", "psnr", "--lora", f"{lora_file}:0.8", "-o", str(out)]
    assert main(args) == 0
    run = json.loads((out / "run" / "run.json").read_text())
    for name in ("fp8", "nf4"):
        assert run["variants"][name]["loras"] == dict.fromkeys(
            ["style"], dict.fromkeys(BRANCHES, len(MODULES))
        )
    # the reference's image is the LoRA'd FP8 model's, as `ditq generate --lora` makes it
    (ref,) = (out / "run" / "images" / "fp8" / "json").glob("*.png")
    plain = tmp_path / "plain"
    prompt = Image.open(ref).text["prompt"]
    gen = ["generate", "--model", str(tiny_fp8_dir), "--prompt", prompt, "--seed", "0", "--steps", "1"]
    assert main([*gen, "-o", str(plain)]) == 0
    assert main([*gen, "--lora", f"{lora_file}:0.8", "-o", str(tmp_path / "styled")]) == 0
    assert np.array_equal(_pixels(ref), _pixels(tmp_path / "styled" / "000_s0.png"))
    assert not np.array_equal(_pixels(ref), _pixels(plain / "000_s0.png"))
    md = (out / "run" / "report" / "report.md").read_text()
    assert run["loras"][0]["sha256"] in md  # the report's run settings name the LoRAs applied


def test_lora_strict_refuses_keys_ditq_does_not_apply(tiny_fp8_dir, tiny_pipe, tmp_path, capsys):
    shapes = linear_shapes(tiny_pipe.transformer)
    real = random_lora(shapes, MODULES[:1], seed=5)
    a, b = real[MODULES[0]]
    path = save({**peft_state(real), **peft_state({"layers.0.nope": (a, b)})}, tmp_path / "odd.safetensors")
    gen = ["generate", "--model", str(tiny_fp8_dir), *GEN, "--lora", str(path)]
    assert main([*gen, "-o", str(tmp_path / "lenient")]) == 0  # logged and skipped
    capsys.readouterr()
    assert main([*gen, "--lora-strict", "-o", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "(strict)" in err and "layers.0.nope" in err and str(path) in err
    assert not list((tmp_path / "strict").glob("*.png"))
