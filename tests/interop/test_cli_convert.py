"""`ditq convert`: export, import and check from the command line, with exit codes and messages."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from ditq.cli import main
from ditq.models.loading import pipeline_info

from .builders import rewrite_gguf, write_comfy_int8


def test_export_then_check_then_import(ditq_q4k_dir, tiny_fp8_dir, tmp_path, capsys):
    assert main(["convert", str(ditq_q4k_dir), "--to", "sdcpp", "-o", str(tmp_path / "sd")]) == 0
    out = capsys.readouterr().out
    cond = tmp_path / "sd" / "ideogram4-q4_k.gguf"
    assert str(cond) in out and "loader rules: all hold" in out

    config = str(ditq_q4k_dir / "transformer" / "config.json")
    assert main(["convert", str(cond), "--check", "--config", config]) == 0
    assert "loader rules hold" in capsys.readouterr().out

    broken = rewrite_gguf(cond, tmp_path / "broken.gguf", lambda t: t.pop("embed_image_indicator.weight"))
    assert main(["convert", str(broken), "--check", "--loaders", "sdcpp", "--config", config]) == 1
    assert "[stable-diffusion.cpp] detect" in capsys.readouterr().out

    dst = tmp_path / "imported"
    assert main(["convert", str(cond), "--from", "auto", "--base", str(tiny_fp8_dir), "-o", str(dst)]) == 0
    record = json.loads((dst / "ditq.json").read_text())
    assert (
        record["formats"]["transformer"] == "gguf"
        and record["imported"]["unconditional_transformer"]["layout"] == "sdcpp-gguf"
    )
    from ditq.models.loading import load_pipeline

    pipe = load_pipeline(dst)
    assert pipeline_info(pipe).formats["unconditional_transformer"]["gguf"] > 0


def test_export_encodes_gguf_from_fp8_with_a_prefix_for_comfyui(tiny_fp8_dir, tmp_path, capsys):
    args = [
        "convert",
        str(tiny_fp8_dir),
        "--to",
        "comfyui",
        "--recipe",
        "q8_0",
        "--prefix",
        "-o",
        str(tmp_path),
    ]
    assert main(args) == 0
    assert "loader rules: all hold" in capsys.readouterr().out
    import gguf

    names = [t.name for t in gguf.GGUFReader(tmp_path / "ideogram4-q8_0_unconditional.gguf").tensors]
    assert names and all(n.startswith("model.diffusion_model.") for n in names)


def test_int8_check_and_import_of_a_comfyui_file(tiny_fp8_dir, float_states, tmp_path, capsys):
    src = tmp_path / "ideogram4_int8_convrot.safetensors"
    write_comfy_int8(float_states["transformer"], src, convrot=True)
    write_comfy_int8(
        float_states["unconditional_transformer"],
        tmp_path / "ideogram4_int8_convrot_unconditional.safetensors",
        convrot=True,
    )
    config = str(tiny_fp8_dir / "transformer" / "config.json")
    # ComfyUI's ConvRot repacks keep adaLN layers high precision and rotate only in_features % 256 == 0 layers.
    assert main(["convert", str(src), "--check", "--config", config]) == 0
    capsys.readouterr()
    dst = tmp_path / "pipe"
    assert (
        main(["convert", str(src), "--from", "comfyui-int8", "--base", str(tiny_fp8_dir), "-o", str(dst)])
        == 0
    )
    assert capsys.readouterr().out.strip() == str(dst)
    assert json.loads((dst / "ditq.json").read_text())["formats"]["transformer"] == "int8"


def test_bad_input_exits_2_with_a_clear_message(float_states, tiny_fp8_dir, tmp_path, capsys):
    plain = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in float_states["transformer"].items()}, plain)
    assert (
        main(
            ["convert", str(plain), "--from", "auto", "--base", str(tiny_fp8_dir), "-o", str(tmp_path / "x")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "ditq convert: error:" in err and "not an Ideogram 4 transformer in any layout ditq reads" in err
    assert "official-fp8: no F8_E4M3 Linear weights" in err and "sdcpp-gguf: not a GGUF file" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    assert main(["convert", str(plain), "--from", "auto", "-o", str(tmp_path / "y")]) == 2
    assert "--from needs --base" in capsys.readouterr().err


def test_quantize_all_export_quantizes_outside_the_rule_and_still_passes(tiny_fp8_dir, tmp_path, capsys):
    import gguf

    args = [
        "convert",
        str(tiny_fp8_dir),
        "--to",
        "sdcpp",
        "--recipe",
        "q8_0",
        "--quantize-all",
        "-o",
        str(tmp_path),
    ]
    assert main(args) == 0
    assert "loader rules: all hold" in capsys.readouterr().out
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "ideogram4-q8_0.gguf").tensors}
    assert types["t_embedding.mlp_in.weight"] == "Q8_0" and types["layers.0.attention.qkv.weight"] == "Q8_0"
    config = str(tiny_fp8_dir / "transformer" / "config.json")
    assert main(["convert", str(tmp_path / "ideogram4-q8_0.gguf"), "--check", "--config", config]) == 1
    assert "quantized-outside-rule" in capsys.readouterr().out
