"""The whole tiny pipeline: calibrate the FP8 reference, write an INT8 SmoothQuant pipeline folder, load it and
generate; sizes on disk, equality with in-memory quantization, and the refusals for bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from ditq.errors import CheckpointError, ConfigError
from ditq.formats.fused import FusedInt8Linear
from ditq.formats.int8 import Int8Linear
from ditq.io.safetensors_io import TensorSource
from ditq.models.loading import ensure_tiny_folder, load_pipeline, load_transformer, pipeline_info
from ditq.models.record import VariantRecord
from ditq.quant.api import quantize_
from ditq.quant.calibration import calibrate_pipeline, probe_inputs
from ditq.quant.int8 import SmoothQuantConfig, convert_transformer_int8, write_csv
from ditq.quant.int8.sensitivity import FragilityRow
from ditq.quant.recipes import Int8Recipe
from ditq.quant.writer import quantize_pipeline

# PSNR of the INT8 image against the FP8 image (same seed). Threshold: 40 dB is a mean squared error of 1e-4, an RMS
# pixel error of ~2.5/255, far below visible differences and about the size of one 8-bit rounding step on every
# pixel. The tiny model's random weights amplify errors more than a trained model's would; we measure ~55 dB.
PSNR_MIN_DB = 40.0
MARKER_BYTES = b'{"format": "int8_tensorwise"}'
GEN = {
    "height": 64,
    "width": 64,
    "num_inference_steps": 4,
    "guidance_scale": None,
    "guidance_schedule": [7.0] * 4,
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8pipe")
    src = ensure_tiny_folder()
    ref = load_pipeline(src)
    captions = ["a red fox in the snow", "a jazz poster that reads BLUE NOTE", "a glass bottle, 3D render"]
    stats = calibrate_pipeline(ref, captions, height=64, width=64, steps=4, progress=False, sample_tokens=32)
    stats_path = stats.save(root / "stats.safetensors")
    dst = root / "int8"
    quantize_pipeline(src, Int8Recipe(), dst, stats=stats_path, progress=False)
    info = VariantRecord.load(dst)
    return {
        "src": src,
        "ref": ref,
        "stats": stats,
        "stats_path": stats_path,
        "dst": dst,
        "info": info,
        "root": root,
    }


def _image(pipe, prompt="a red fox in the snow"):
    out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), output_type="np", **GEN)
    return out.images[0].astype(np.float64)


def test_int8_pipeline_loads_generates_and_stays_close_to_fp8(built):
    pipe = load_pipeline(built["dst"])
    assert pipeline_info(pipe).formats["transformer"]["int8"] == 15
    assert pipeline_info(pipe).variant == "int8"
    assert isinstance(pipe.unconditional_transformer.layers[1].feed_forward.w2, Int8Linear)
    a, b = _image(pipe), _image(built["ref"])
    psnr = 10 * np.log10(1.0 / np.mean((a - b) ** 2))
    assert PSNR_MIN_DB < psnr < 200, psnr  # < 200: it did change something


def test_int8_file_sizes_are_one_byte_per_quantized_weight(built):
    for tr in ("transformer", "unconditional_transformer"):
        st = TensorSource(built["dst"] / tr)
        recipe = json.loads(st.metadata["ditq.recipe"])
        source = TensorSource(built["src"] / tr)
        expected = 0
        for name in source.keys():
            module, _, suffix = name.rpartition(".")
            shape = source.info(name).shape
            if suffix == "weight_scale":
                continue
            if suffix == "weight" and len(shape) == 2 and module in recipe["quantized"]:
                n, k = shape
                expected += (
                    n * k + 4 * n + len(b'{"format": "int8_tensorwise"}')
                )  # int8 + fp32 scales + marker
            elif suffix == "weight" and len(shape) == 2 and module in recipe["kept_float"]:
                expected += 2 * int(np.prod(shape))  # bf16
            else:
                expected += source.info(name).nbytes  # norms, biases, embeddings as in the source
        assert st.total_bytes() == expected


def test_folded_file_equals_in_memory_quantization(built):
    stats = built["stats"]
    for tr in ("transformer", "unconditional_transformer"):
        ref, _ = load_transformer(built["src"] / tr, torch.bfloat16)
        disk, _ = load_transformer(built["dst"] / tr, torch.bfloat16)
        mem = quantize_(ref, SmoothQuantConfig(), stats=stats, transformer=tr)
        n = 0
        for name, m in mem.named_modules():
            if isinstance(m, Int8Linear) and not isinstance(m, FusedInt8Linear):  # the layers, not their fusions
                other = disk.get_submodule(name)
                assert torch.equal(m.qweight_t, other.qweight_t) and torch.equal(
                    m.weight_scale, other.weight_scale
                )
                n += 1
        on_disk = [x for x in disk.modules() if isinstance(x, Int8Linear) and not isinstance(x, FusedInt8Linear)]
        assert n == len(on_disk) >= 15  # every INT8 layer of the file matched one of memory, and none missing
        for key, value in mem.state_dict().items():  # folded norm weights, protected bf16 layers, biases
            if value.is_floating_point():
                assert torch.equal(value, disk.state_dict()[key]), key
        kw = probe_inputs(stats.probes[tr][0], torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(mem(**kw).sample, disk(**kw).sample)


def test_stats_from_another_model_name_the_layer(built, tmp_path):
    stats = built["stats"]
    other = replace(stats, modules={tr: dict(m) for tr, m in stats.modules.items()})
    st = other.modules["transformer"]["layers.1.feed_forward.w2"]
    other.modules["transformer"]["layers.1.feed_forward.w2"] = replace(st, absmax=st.absmax[:, :100])
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.w2 has 512 input channels.*100"):
        convert_transformer_int8(
            built["src"] / "transformer", tmp_path / "t", other, SmoothQuantConfig(), progress=False
        )
    missing = replace(stats, modules={"transformer": {}})
    with pytest.raises(CheckpointError, match="no entry for layer"):
        convert_transformer_int8(
            built["src"] / "transformer", tmp_path / "t", missing, SmoothQuantConfig(), progress=False
        )


def _one_row_table(tmp_path):
    rows = [
        FragilityRow(
            "transformer",
            "layers.0.feed_forward.w2",
            "layers.0.feed_forward.w2",
            512,
            256,
            1,
            1,
            1e-3,
            0.0,
            "none",
            False,
        )
    ]
    return write_csv(rows, tmp_path / "fragility.csv")


def test_bad_input_is_refused(built, tmp_path):
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_pipeline(
            built["dst"], Int8Recipe(), tmp_path / "again", stats=built["stats_path"], progress=False
        )
    with pytest.raises(ConfigError, match="other recipe options"):
        quantize_pipeline(
            built["src"], Int8Recipe(alpha=0.5), built["dst"], stats=built["stats_path"], progress=False
        )
    with pytest.raises(ConfigError, match="statistics"):
        convert_transformer_int8(
            built["src"] / "transformer", tmp_path / "t", None, SmoothQuantConfig(), progress=False
        )
    with pytest.raises(ConfigError, match="larger than the model"):
        quantize_pipeline(
            built["src"],
            Int8Recipe(protect_budget="count=5"),
            tmp_path / "p",
            stats=built["stats_path"],
            fragility=_one_row_table(tmp_path),
        )
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()


def test_plain_w8a8_needs_no_statistics_and_protects_by_budget(built, tmp_path):
    table = _one_row_table(tmp_path)
    out = tmp_path / "plain"
    quantize_pipeline(
        built["src"], Int8Recipe(smoothquant=False, protect_budget="1"), out, fragility=table, progress=False
    )
    record = VariantRecord.load(out)
    recipe = {c: s["recipe"] for c, s in record.summary.items()}
    assert "layers.0.feed_forward.w2" in recipe["transformer"]["kept_float"]
    assert "layers.0.feed_forward.w2" in recipe["unconditional_transformer"]["quantized"]
    assert record.variant == "int8" and record.recipes["transformer"]["smoothquant"] is False
