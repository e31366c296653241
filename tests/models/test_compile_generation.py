"""`--compile` generation equals eager generation on the tiny model (bf16: PSNR of at least 40 dB, or identical)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditq.models.loading import load_pipeline
from ditq.models.sampling import generate, initial_noise


@pytest.mark.slow
def test_compiled_generation_equals_eager(tiny_fp8_dir, tiny_settings):
    torch._dynamo.reset()
    eager = load_pipeline(tiny_fp8_dir)
    noise = initial_noise(eager, 0, tiny_settings)
    want = np.asarray(generate(eager, "a red fox", 0, tiny_settings, latents=noise)).astype(np.float64)
    compiled = load_pipeline(tiny_fp8_dir, compile=True)
    got = np.asarray(generate(compiled, "a red fox", 0, tiny_settings, latents=noise)).astype(np.float64)
    mse = float(np.mean((got - want) ** 2))
    assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= 40, mse
