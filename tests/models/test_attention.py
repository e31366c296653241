"""The INT8-attention processor is Ideogram 4's attention with another kernel: given SDPA, it computes what
diffusers' processor computes bit for bit; without a CUDA INT8 kernel it is refused with a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from ditq.errors import ConfigError
from ditq.models.attention import Ideogram4KernelAttnProcessor, sdpa_kernel, set_attention
from ditq.models.loading import load_pipeline
from ditq.models.sampling import generate, initial_noise


def test_kernel_processor_with_sdpa_equals_diffusers_attention(tiny_fp8_dir, tiny_settings):
    pipe = load_pipeline(tiny_fp8_dir)
    noise = initial_noise(pipe, 0, tiny_settings)
    want = np.asarray(generate(pipe, "a red fox", 0, tiny_settings, latents=noise))
    calls = []

    def kernel(q, k, v, mask):
        calls.append(q.shape)
        return sdpa_kernel(q, k, v, mask)

    set_attention(pipe, "int8", kernel=kernel)
    attn = pipe.transformer.layers[0].attention
    assert isinstance(attn.processor, Ideogram4KernelAttnProcessor)
    got = np.asarray(generate(pipe, "a red fox", 0, tiny_settings, latents=noise))
    assert np.array_equal(got, want)
    heads = attn.num_heads
    assert calls and all(s[1] == heads for s in calls)  # [B, H, L, D]
    set_attention(pipe, "sdpa")
    assert np.array_equal(np.asarray(generate(pipe, "a red fox", 0, tiny_settings, latents=noise)), want)


def test_int8_attention_without_cuda_is_refused(tiny_fp8_dir):
    with pytest.raises(ConfigError, match="INT8 attention needs a CUDA GPU"):
        load_pipeline(tiny_fp8_dir, attention="int8")
