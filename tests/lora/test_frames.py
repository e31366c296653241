"""LoRAs on an INT8 folder whose SmoothQuant is folded into neighbours (the default INT8 variant).

Such layers compute in scaled coordinates; the writer records each folded group's smoothing vector in the folder's
`smoothing.safetensors`, and the LoRA is mapped into those coordinates with them; without the file a LoRA on them is
refused. The test checks the recorded vectors independently of ditq, from the weights alone: a consumer of the group
(a member whose rows were not divided) stores W diag(s), so s_j = Σ_n ŵ_nj w_nj / Σ_n w_nj² against the FP8
reference's W (least squares over the rows, within the INT8 rounding).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from ditq.errors import ConfigError
from ditq.lora import LayerFrame, apply_lora, unload_lora
from ditq.lora.frames import SMOOTHING_FILE, affected_layers, group_members, smoothing_frames
from ditq.lora.targets import linear_shapes

from .builders import peft_state, random_lora, save
from .conftest import float_reference, rel, run
from .test_pipeline import MODULES, _updates

BRANCH = "transformer"


@pytest.fixture(scope="module")
def smoothquant_dir(tiny_fp8_dir, tmp_path_factory):
    """The tiny FP8 model quantized with the default INT8 recipe (SmoothQuant, alpha searched, folded)."""
    from ditq.models.loading import load_pipeline
    from ditq.quant.calibration import calibrate_pipeline
    from ditq.quant.writer import quantize_pipeline

    root = tmp_path_factory.mktemp("lora-smoothquant")
    ref = load_pipeline(tiny_fp8_dir)
    stats = calibrate_pipeline(
        ref,
        ["a red fox in the snow", "a neon sign"],
        height=64,
        width=64,
        steps=2,
        progress=False,
        sample_tokens=32,
    )
    path = stats.save(root / "stats.safetensors")
    return quantize_pipeline(str(tiny_fp8_dir), "int8", root / "int8", stats=path, progress=False)


def _groups(pipe):
    from ditq.models.loading import pipeline_info

    return pipeline_info(pipe).record.summary[BRANCH]["recipe"]["groups"]


def _recover(int8_pipe, fp8_pipe) -> dict[str, torch.Tensor]:
    groups = _groups(int8_pipe)
    moved = {g["fold"].partition(":")[2] for g in groups.values() if g["mode"] == "folded"}
    out = {}
    for name, g in groups.items():
        if g["mode"] != "folded":
            continue
        consumer = next(m for m in group_members(name) if m not in moved)
        layers = [getattr(p, BRANCH).get_submodule(consumer) for p in (int8_pipe, fp8_pipe)]
        wq, w = (lay.dequantized_weight(torch.float32).double() for lay in layers)
        out[name] = ((wq * w).sum(0) / (w * w).sum(0)).float()
    return out


def test_the_writer_records_the_smoothing_vector_of_every_folded_group(smoothquant_dir, tiny_fp8_dir):
    from ditq.io.safetensors_io import TensorSource
    from ditq.models.loading import load_pipeline

    pipe, fp8 = load_pipeline(smoothquant_dir), load_pipeline(tiny_fp8_dir)
    recovered = _recover(pipe, fp8)
    assert recovered, "the default INT8 recipe folded no group on the tiny model"
    src = TensorSource(smoothquant_dir / SMOOTHING_FILE)
    try:
        keys = [k for k in src.keys() if k.startswith(f"{BRANCH}.")]
        assert sorted(k[len(BRANCH) + 1 :] for k in keys) == sorted(recovered)
        for name, s in recovered.items():
            torch.testing.assert_close(src.get(f"{BRANCH}.{name}"), s, rtol=0.02, atol=1e-4)
    finally:
        src.close()
    assert not list(smoothquant_dir.glob(".smoothing-*"))  # the per-transformer parts are gathered and gone


def test_a_lora_on_folded_smoothquant_layers_is_refused_without_vectors(smoothquant_dir, tmp_path):
    from ditq.models.loading import load_pipeline

    folder = tmp_path / "int8-no-vectors"
    shutil.copytree(smoothquant_dir, folder)
    (folder / SMOOTHING_FILE).unlink()
    pipe = load_pipeline(folder)
    lora = random_lora(linear_shapes(pipe.transformer), MODULES, seed=1)
    with pytest.raises(ConfigError, match=r"layers.0.attention.to_\w+ is INT8 with SmoothQuant folded"):
        apply_lora(pipe, save(peft_state(lora), tmp_path / "all.safetensors"))
    adaln = {n: lora[n] for n in MODULES if n.endswith("adaln_modulation")}  # kept bf16, not smoothed
    apply_lora(pipe, save(peft_state(adaln), tmp_path / "adaln.safetensors"))


def test_with_the_smoothing_vectors_the_lora_matches_the_float_reference(
    smoothquant_dir, tiny_fp8_dir, transformer_inputs, tmp_path
):
    from ditq.models.loading import load_pipeline

    fp8 = load_pipeline(tiny_fp8_dir)
    pipe = load_pipeline(smoothquant_dir)  # with the vectors its writer recorded
    inputs = transformer_inputs[BRANCH]
    lora = random_lora(linear_shapes(fp8.transformer), MODULES, seed=2, magnitude=0.6)
    ref_base = run(float_reference(fp8.transformer), inputs, torch.float64)
    ref = run(float_reference(fp8.transformer, _updates(lora, 1.0)), inputs, torch.float64)
    e_base = rel(run(pipe.transformer, inputs), ref_base)
    path = save(peft_state(lora), tmp_path / "style.safetensors")
    apply_lora(pipe, path)
    e_lora = rel(run(pipe.transformer, inputs), ref)
    assert e_lora <= 1.5 * e_base + 1e-3 and rel(ref_base, ref) > 10 * e_lora, (e_lora, e_base)
    unload_lora(pipe)
    identity = {BRANCH: dict.fromkeys(affected_layers(_groups(pipe)), LayerFrame())}
    apply_lora(pipe, path, frames=identity)  # the LoRA in the wrong coordinates
    assert rel(run(pipe.transformer, inputs), ref) > 3 * e_lora


def test_group_names_follow_the_int8_quantizer(tiny_fp8_dir):
    """The groups and folds `ditq.lora.frames` reads from a record are those `smooth_groups` defines."""
    from ditq.lora.targets import config_linear_shapes
    from ditq.quant.int8.smoothquant import smooth_groups

    names = list(config_linear_shapes(tiny_fp8_dir / BRANCH))
    groups = smooth_groups(names)
    assert groups and all(group_members(g.name) == g.linears for g in groups)
    record = {g.name: {"mode": "folded", "fold": f"{g.fold[0]}:{g.fold[1]}"} for g in groups if g.fold}
    s = {name: torch.full((4,), 2.0 + i) for i, name in enumerate(record)}
    frames = smoothing_frames(record, s)
    for g in groups:
        if g.fold is None:
            continue
        assert all(torch.equal(frames[m].input_scale, s[g.name]) for m in g.linears)
        if g.fold[0] == "rows":
            assert torch.equal(frames[g.fold[1]].output_scale, s[g.name])
