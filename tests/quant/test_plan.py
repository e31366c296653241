"""The memory planner against measurements: the tiny model run on CPU with every allocation tracked, the whole
pipeline simulated on fake tensors (tiny and full size), and the tracker itself against hand-counted bytes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from ditq.errors import ConfigError
from ditq.quant.plan import (
    CARDS,
    DEFAULT_VARIANTS,
    RESERVE,
    choose_policy,
    parse_vram,
    plan_model,
    plan_variant,
    simulated_peak,
    variant_recipes,
)
from ditq.quant.simulate import PeakTracker, simulate

GiB = 2**30
TEXT = 512  # the tiny model's padded text length


def _tiny_components(folder):
    from ditq.quant.inspect import meta_components

    return meta_components(folder)


def _close(planned: int, measured: int, tol: float) -> bool:
    return abs(planned - measured) <= tol * measured


def test_vram_sizes_and_presets():
    assert parse_vram("24GiB") == 24 * GiB == parse_vram("3090") == CARDS["4090"]
    assert (
        parse_vram("24GB") == 24 * 10**9
        and parse_vram("512MiB") == 2**29
        and parse_vram("1.5gib") == 3 * 2**29
    )
    assert parse_vram("h100") == 80 * GiB and parse_vram(1000) == 1000
    with pytest.raises(ConfigError, match="--vram 'lots'"):
        parse_vram("lots")


def test_the_tracker_counts_allocations_not_views_or_in_place_results():
    """Hand-counted: two 4000-byte float32 tensors live at once (each rounded up to 4096 by the allocator's
    512-byte blocks); views, in-place ops and freed tensors add nothing."""
    x = torch.ones(1000)
    tracker = PeakTracker()
    with torch.no_grad(), tracker:
        a = x * 2  # 4096
        v = a.view(10, 100)  # a view: nothing
        a.add_(1)  # in place: nothing
        b = v + 1  # 4096: the peak, 8192
        del a, v, b  # all freed
        c = torch.empty(100, dtype=torch.float64)  # 800 -> 1024
    assert tracker.peak == 8192 and tracker.current == 1024
    del c


def test_mixes_name_one_recipe_per_branch():
    r = variant_recipes("int8+q4_k")
    assert (
        type(r["transformer"]).__name__ == "Int8Recipe"
        and type(r["unconditional_transformer"]).__name__ == "GGUFRecipe"
    )
    assert variant_recipes("fp8") == {"transformer": "fp8", "unconditional_transformer": "fp8"}
    with pytest.raises(ConfigError):
        variant_recipes("int8+")


def test_the_plan_agrees_with_the_tiny_model_run_on_cpu(tiny_fp8_dir):
    """Every stage of a real generation step of the tiny FP8 pipeline (bf16 compute, CPU), its allocations tracked,
    against the planner's activation formulas: within 15%."""
    from ditq.models.denoise import decode_latents, denoise, encode
    from ditq.models.loading import load_pipeline

    pipe = load_pipeline(str(tiny_fp8_dir), dtype=torch.bfloat16)
    plan = plan_variant(_tiny_components(tiny_fp8_dir), "fp8", 64, 64, 24 * GiB, text_tokens=TEXT)
    measured = {}
    for stage in ("encode", "denoise", "decode"):
        tracker = PeakTracker()
        with torch.no_grad(), tracker:
            if stage == "encode":
                cond = encode(pipe, "a red fox in the snow", 64, 64, TEXT)
            elif stage == "denoise":
                latents = torch.randn(1, 256, 16, generator=torch.Generator().manual_seed(0))
                latents = denoise(pipe, cond, latents, 64, 64, [7.0], 0.0, 1.75)
            else:
                decode_latents(pipe, latents, 64, 64)
        measured[stage] = tracker.peak
    for stage, peak in measured.items():
        assert _close(plan.activations[stage], peak, 0.15), (stage, plan.activations[stage], peak)


@pytest.mark.parametrize("variant", ["fp8", "int8", "q4_k", "nf4", "int8+q4_k", "svdq_w4a4", "convrot_w4a4"])
def test_the_plan_agrees_with_the_simulated_tiny_pipeline(tiny_fp8_dir, variant):
    """The whole tiny pipeline in each format on fake tensors: stage peaks within 15%, weights within 1%."""
    plan = plan_variant(_tiny_components(tiny_fp8_dir), variant, 64, 64, 24 * GiB, text_tokens=TEXT)
    sim = simulate(_tiny_components(tiny_fp8_dir), variant_recipes(variant), 64, 64, TEXT)
    for stage, peak in sim.stages.as_dict().items():
        assert _close(plan.activations[stage], peak, 0.15), (stage, plan.activations[stage], peak)
    for name, size in sim.components.items():
        assert _close(plan.weights.components[name], size, 0.01), (name, plan.weights.components[name], size)


def test_every_variant_fits_a_24_gib_card_at_1024():
    """The full-size configs at 1024x1024 with the text padded to 2048: every default variant has a policy that
    fits 22.5 GiB; the 4-bit variants and the INT8 + Q4_K mix keep both transformers resident."""
    from ditq.models.sizes import full_size_components

    for variant in DEFAULT_VARIANTS:
        plan = plan_variant(full_size_components(), variant, 1024, 1024, parse_vram("3090"))
        assert plan.chosen.fits and plan.chosen.peak_bytes <= 24 * GiB - RESERVE, variant
        assert not plan.policies["none"].fits or variant in ("q4_k", "nf4"), variant  # everything at once
        if variant in ("q4_k", "nf4", "int8+q4_k"):
            assert plan.policy in ("none", "encoder") and plan.chosen.transfer_bytes_per_step == 0, variant
        peaks = [plan.policies[p].peak_bytes for p in ("none", "encoder", "model", "sequential")]
        assert peaks == sorted(peaks, reverse=True), (variant, peaks)  # each policy holds less than the last


@pytest.mark.slow
def test_the_full_size_simulation_agrees_with_the_plan():
    """One full-size step of the whole pipeline (both transformers, the text encoder, the VAE) on fake tensors,
    in the mixed variant (INT8 and Q4_K compute paths): its peak under the chosen policy within 10% of the plan,
    and so is each component's and each block's size."""
    from ditq.models.sizes import full_size_components

    plan = plan_variant(full_size_components(), "int8+q4_k", 1024, 1024, parse_vram("3090"))
    sim = simulate(full_size_components(), variant_recipes("int8+q4_k"), 1024, 1024, 2048)
    got = simulated_peak(plan, sim)
    assert _close(plan.chosen.peak_bytes, got["peak_bytes"], 0.10), (
        plan.chosen.peak_bytes,
        got["peak_bytes"],
    )
    for stage, peak in sim.stages.as_dict().items():
        assert _close(plan.activations[stage], peak, 0.10), stage
    for name, size in sim.components.items():
        assert _close(plan.weights.components[name], size, 0.01), name
    for name, size in sim.block_bytes.items():
        assert _close(plan.weights.block[name], size, 0.01), name


def test_auto_picks_the_fastest_policy_that_fits(tiny_fp8_dir, tiny_settings, monkeypatch):
    """Off CUDA: 'none'. On a card (its size faked): the first policy in speed order whose plan fits, so a card
    just too small for everything at once gets 'encoder'."""
    assert choose_policy(str(tiny_fp8_dir), tiny_settings, "cpu") == "none"
    plan = plan_variant(_tiny_components(tiny_fp8_dir), "fp8", 64, 64, 24 * GiB, text_tokens=TEXT)
    none, encoder = plan.policies["none"].peak_bytes, plan.policies["encoder"].peak_bytes
    assert encoder < none
    for total, expected in ((RESERVE + none, "none"), (RESERVE + (none + encoder) // 2, "encoder")):
        props = SimpleNamespace(total_memory=total)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d, props=props: props)
        assert choose_policy(str(tiny_fp8_dir), tiny_settings, "cuda") == expected


def test_plan_command_prints_the_json_schema(tiny_fp8_dir, capsys):
    from ditq.cli import main

    assert (
        main(["plan", str(tiny_fp8_dir), "--height", "64", "--width", "64", "--text-tokens", "512", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["vram_bytes"] == 24 * GiB and (report["height"], report["width"]) == (64, 64)
    (row,) = report["variants"].values()
    assert {
        "policy",
        "fits",
        "peak_bytes",
        "simulated_peak_bytes",
        "transfer_bytes_per_step",
        "stages",
    } <= set(row)
    assert row["policy"] == "none" and row["fits"] and row["simulated_peak_bytes"] is None
    assert set(row["stages"]) == {"encode", "denoise", "decode"}
    assert set(row["policies"]) == {"none", "encoder", "group", "model", "sequential"}


def test_plan_command_simulates(tiny_fp8_dir, capsys):
    from ditq.cli import main

    args = ["plan", str(tiny_fp8_dir), "--variants", "q4_k", "--height", "64", "--width", "64"]
    assert main([*args, "--text-tokens", "512", "--simulate", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["variants"]["q4_k"]
    assert _close(row["peak_bytes"], row["simulated_peak_bytes"], 0.10)
    assert main([*args, "--batch", "2", "--simulate"]) == 2
    assert "--simulate runs one image" in capsys.readouterr().err


def test_a_plan_of_a_batch_scales_the_activations(tiny_fp8_dir):
    one = plan_model(str(tiny_fp8_dir), ["fp8"], 64, 64, 24 * GiB, text_tokens=TEXT)["variants"]["fp8"]
    two = plan_model(str(tiny_fp8_dir), ["fp8"], 64, 64, 24 * GiB, text_tokens=TEXT, batch=2)["variants"][
        "fp8"
    ]
    assert {k: 2 * v for k, v in one["activations"].items()} == two["activations"]
    assert one["components"] == two["components"]
