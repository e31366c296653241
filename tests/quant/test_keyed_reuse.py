"""A variant folder is reused only when it was made with the same recipe, options, source and statistics; any other
request is refused, naming both keys (`--force` rebuilds). Benchmarks can never run a stale variant silently."""

from __future__ import annotations

import pytest

from ditq.errors import ConfigError
from ditq.quant.recipes import parse_recipe
from ditq.quant.writer import quantize_pipeline


@pytest.fixture(scope="module")
def two_stats(tiny_fp8_dir, tmp_path_factory):
    """Two calibration files of the tiny model from different captions (so their statistics differ)."""
    from ditq.models.loading import load_pipeline
    from ditq.quant.calibration import calibrate_pipeline

    pipe = load_pipeline(tiny_fp8_dir)
    folder = tmp_path_factory.mktemp("stats")
    paths = []
    for i, caption in enumerate(["a red fox in the snow", "a neon sign that says OPEN"]):
        stats = calibrate_pipeline(
            pipe, [caption], height=64, width=64, steps=2, progress=False, sample_tokens=16
        )
        paths.append(stats.save(folder / f"stats{i}.safetensors"))
    return paths


@pytest.mark.slow
def test_changing_alpha_stats_or_protection_refuses_and_force_rebuilds(tiny_fp8_dir, two_stats, tmp_path):
    out = tmp_path / "int8"
    first = parse_recipe("int8", alpha=0.5)
    quantize_pipeline(tiny_fp8_dir, first, out, stats=two_stats[0], progress=False)
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    # The same request again: reused, nothing rewritten.
    quantize_pipeline(tiny_fp8_dir, parse_recipe("int8", alpha=0.5), out, stats=two_stats[0], progress=False)
    assert weights.stat().st_mtime_ns == stamp
    refused = {
        "alpha": dict(recipe=parse_recipe("int8", alpha=0.3), stats=two_stats[0]),
        "statistics": dict(recipe=first, stats=two_stats[1]),
        "protection": dict(
            recipe=parse_recipe("int8", alpha=0.5, protect_budget="bytes=1MB"), stats=two_stats[0]
        ),
    }
    for what, request in refused.items():
        with pytest.raises(ConfigError, match="made with other recipe options, source or statistics") as err:
            quantize_pipeline(tiny_fp8_dir, request["recipe"], out, stats=request["stats"], progress=False)
        assert str(out) in str(err.value) and "--force" in str(err.value), what
        assert weights.stat().st_mtime_ns == stamp, what  # the folder is left as it was
    quantize_pipeline(
        tiny_fp8_dir, parse_recipe("int8", alpha=0.3), out, stats=two_stats[0], progress=False, force=True
    )
    assert weights.stat().st_mtime_ns != stamp
    from ditq.models.record import VariantRecord

    assert VariantRecord.load(out).recipes["transformer"]["alpha"] == 0.3
