"""Fixtures for the interop tests: the FP8 source image, float weights, and a generate-and-compare helper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .builders import float_state, official_file

TRANSFORMERS = ("transformer", "unconditional_transformer")
PROMPT, SEED = "a lighthouse at dusk", 3


@pytest.fixture(scope="session")
def interop_settings():
    """Two steps (one per guidance value) keep each generation short; float32 compute keeps lossless cases exact."""
    from ditq.models.sampling import SamplingSettings

    return SamplingSettings(
        height=64, width=64, steps=2, guidance_schedule=(7.0, 3.0), max_sequence_length=512
    )


@pytest.fixture(scope="session")
def generate_image(interop_settings):
    from ditq.models.loading import load_pipeline
    from ditq.models.sampling import generate

    def run(folder) -> np.ndarray:
        pipe = load_pipeline(folder, dtype=torch.float32)
        return np.asarray(generate(pipe, PROMPT, SEED, interop_settings)).astype(np.int16)

    return run


@pytest.fixture(scope="session")
def source_image(tiny_fp8_dir, generate_image) -> np.ndarray:
    """The official FP8 tiny model's image: the source every layout is compared against."""
    return generate_image(tiny_fp8_dir)


@pytest.fixture(scope="session")
def float_states(tiny_fp8_dir) -> dict[str, dict[str, torch.Tensor]]:
    """{component: fused-name float32 weights} of the FP8 source, dequantized by hand."""
    return {c: float_state(official_file(tiny_fp8_dir, c)) for c in TRANSFORMERS}


@pytest.fixture(scope="session")
def transformer_inputs(tiny_pipe):
    """Random transformer arguments for the conditional (text + image) and unconditional (image) branches."""
    from ditq.quant.calibration import synthetic_inputs

    cfg = tiny_pipe.transformer.config
    return {
        "transformer": synthetic_inputs(cfg, text_tokens=8, grid=(4, 4), seed=1),
        "unconditional_transformer": synthetic_inputs(cfg, grid=(4, 4), unconditional=True, seed=2),
    }


@pytest.fixture(autouse=True, scope="session")
def _quiet_numba_threads():
    """Tiny layers gain nothing from threads; on a shared 2-core machine spinning threads cost time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ditq_q4k_dir(tiny_fp8_dir, tmp_path_factory):
    """ditq's own GGUF Q4_K pipeline folder (sd.cpp's quantization rule, general.architecture = ideogram)."""
    from ditq.quant.writer import quantize_pipeline

    return quantize_pipeline(
        str(tiny_fp8_dir), "q4_k", tmp_path_factory.mktemp("q4k") / "q4_k", progress=False
    )


@pytest.fixture(scope="session")
def ditq_int8_dir(tiny_fp8_dir, tmp_path_factory):
    """ditq's own INT8 pipeline folder (ComfyUI comfy_quant layout, conditioning path kept bf16)."""
    from ditq.quant.recipes import Int8Recipe
    from ditq.quant.writer import quantize_pipeline

    out = tmp_path_factory.mktemp("int8") / "int8"
    return quantize_pipeline(str(tiny_fp8_dir), Int8Recipe(smoothquant=False), out, progress=False)
