"""The reference path: LoRAs merged into bf16 weights of a pipeline folder, then loaded and quantized."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditq.errors import ConfigError
from ditq.lora import LoraSpec, apply_lora, merge_lora_, merge_lora_folder
from ditq.lora.targets import linear_shapes

from .builders import fuse_qkv, kohya_state, peft_state, random_lora, save
from .conftest import float_reference, rel, run
from .test_pipeline import MODULES, _updates

FILE = "diffusion_pytorch_model.safetensors"
BRANCHES = ("transformer", "unconditional_transformer")


def _fp8_float(path) -> dict[str, torch.Tensor]:
    """The official FP8 file read with safetensors and dequantized by hand (float64, fused names)."""
    raw = load_file(str(path))
    out = {}
    for k, v in raw.items():
        if k.endswith(".weight_scale"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            v = v.double() * raw[k[: -len("weight")] + "weight_scale"].double()[:, None]
        out[k] = v
    return out


def _fused_update(lora, strength: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{official fused weight name: (float64 update, |s| |B| |A|)} of a canonical (split-name) LoRA."""
    out = {}
    for name, (a, b) in fuse_qkv(lora).items():
        a, b = a.double(), b.double()
        out[f"{name}.weight"] = (strength * (b @ a), abs(strength) * (b.abs() @ a.abs()))
    return out


@pytest.fixture(scope="module")
def loras(tiny_pipe):
    return {
        b: random_lora(linear_shapes(getattr(tiny_pipe, b)), MODULES, seed=i) for i, b in enumerate(BRANCHES)
    }


@pytest.fixture(scope="module")
def lora_file(loras, tmp_path_factory):
    state = {
        **kohya_state(fuse_qkv(loras["transformer"])),
        **peft_state(loras[BRANCHES[1]], prefix=f"{BRANCHES[1]}."),
    }
    return save(state, tmp_path_factory.mktemp("lora-file") / "style.safetensors")


@pytest.fixture(scope="module")
def merged(tiny_fp8_dir, lora_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-merge") / "merged"
    return merge_lora_folder(tiny_fp8_dir, [LoraSpec(path=str(lora_file), strength=0.7)], out)


def test_merged_weights_are_w_plus_the_update_rounded_once_to_bf16(merged, tiny_fp8_dir, loras):
    for b in BRANCHES:
        source = _fp8_float(tiny_fp8_dir / b / FILE)
        got = load_file(str(merged / b / FILE))
        assert set(got) == set(source)
        updates = _fused_update(loras[b], 0.7)
        for name, ref in source.items():
            terms = ref.abs()
            if name in updates:
                ref, terms = ref + updates[name][0], terms + updates[name][1]
            elif got[name].dtype != torch.bfloat16 or ref.dtype != torch.float64:
                assert torch.equal(got[name], ref.to(got[name].dtype)), name  # copied as stored
                continue
            want = ref.to(torch.bfloat16)
            # float32 arithmetic (error ≤ 2^-20 of the terms), then one rounding to bf16 (≤ one ulp of the result)
            ulp = (ref.abs().clamp(min=1e-30).log2().floor() - 7).exp2()
            err = (got[name].double() - ref).abs()
            bad = err > ulp + 2**-20 * terms
            assert got[name].dtype == torch.bfloat16 and not bool(bad.any()), (
                name,
                ref[bad][:4],
                got[name][bad][:4],
            )
            assert float((got[name] != want).float().mean()) < 1e-3, name
    record = json.loads((merged / "ditq.json").read_text())
    assert record["variant"] == "bf16" and record["summary"]["lora"][0]["strength"] == 0.7
    assert len(record["summary"]["lora"][0]["sha256"]) == 64
    assert "layers.0.attention.to_q" in record["summary"]["transformer"]["merged_layers"]


def test_the_merged_folder_loads_like_the_lora_branch_and_quantizes(
    merged, tiny_fp8_dir, lora_file, loras, transformer_inputs, tmp_path
):
    from ditq.models.loading import load_pipeline, pipeline_info
    from ditq.quant.writer import quantize_pipeline

    pipe = load_pipeline(merged)
    assert set(pipeline_info(pipe).formats["transformer"]) == {"float"}
    fp8 = load_pipeline(tiny_fp8_dir)
    inputs = transformer_inputs["transformer"]
    ref = run(float_reference(fp8.transformer, _updates(loras["transformer"], 0.7)), inputs, torch.float64)
    e_fp8 = rel(run(fp8.transformer, inputs), run(float_reference(fp8.transformer), inputs, torch.float64))
    apply_lora(fp8, lora_file, 0.7)
    branch = run(fp8.transformer, inputs)
    assert rel(run(pipe.transformer, inputs), ref) <= 1.5 * e_fp8 + 1e-3
    assert rel(branch, ref) <= 1.5 * e_fp8 + 1e-3
    q4 = quantize_pipeline(str(merged), "q4_k", tmp_path / "q4_k", progress=False)
    assert pipeline_info(load_pipeline(q4)).formats["transformer"].get("gguf")


def test_a_split_prefixed_source_merges_to_the_same_bytes(merged, tiny_fp8_dir, lora_file, tmp_path):
    from ditq.formats.fp8 import Fp8RowwiseFormat
    from ditq.formats.keys import add_prefix, fused_to_split

    src = tmp_path / "split"
    shutil.copytree(tiny_fp8_dir, src)
    fmt = Fp8RowwiseFormat()
    for b in BRANCHES:
        state = load_file(str(src / b / FILE))
        split = fused_to_split(state, row_slicer=lambda s, t, i, n: fmt.slice_rows(s, t, i, n).contiguous())
        save_file(add_prefix(split, "model.diffusion_model."), str(src / b / FILE))
    again = merge_lora_folder(src, [f"{lora_file}:0.7"], tmp_path / "again")
    for b in BRANCHES:
        one, two = load_file(str(merged / b / FILE)), load_file(str(again / b / FILE))
        assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one)


def test_merging_refuses_quantized_sources_and_existing_outputs(merged, variant_dirs, lora_file, tmp_path):
    for variant in ("q4_k", "int8", "nf4"):
        with pytest.raises(ConfigError, match="already quantized"):
            merge_lora_folder(variant_dirs(variant), [str(lora_file)], tmp_path / variant)
        assert not (tmp_path / variant).exists() and not (tmp_path / f"{variant}.partial").exists()
    with pytest.raises(ConfigError, match="exists"):
        merge_lora_folder(variant_dirs("fp8"), [str(lora_file)], merged)


def test_merge_in_memory_equals_the_branch_on_a_float_model(tiny_pipe, lora_file, transformer_inputs):
    inputs = transformer_inputs["transformer"]
    merged_model = copy.deepcopy(tiny_pipe.transformer)  # float32 nn.Linear layers
    branch_model = copy.deepcopy(tiny_pipe.transformer)
    done = merge_lora_(merged_model, lora_file, 0.7)
    assert "layers.1.feed_forward.w2" in done
    apply_lora(branch_model, lora_file, 0.7)
    a, b = run(merged_model, inputs, torch.float32), run(branch_model, inputs, torch.float32)
    assert rel(a, b) < 1e-5
    from ditq.quant.api import quantize_
    from ditq.quant.recipes import parse_recipe

    quantized = quantize_(copy.deepcopy(tiny_pipe.transformer), parse_recipe("nf4"))
    with pytest.raises(ConfigError, match="NF4Linear: merging needs float weights"):
        merge_lora_(quantized, lora_file)
