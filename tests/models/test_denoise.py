"""ditq's separate encode / denoise / decode stages compute what `Ideogram4Pipeline.__call__` computes."""

from __future__ import annotations

import numpy as np
import torch

from ditq.models.denoise import StepTimer, encode
from ditq.models.loading import load_pipeline
from ditq.models.sampling import generate, initial_noise


def test_generate_equals_the_pipeline_call_bit_for_bit(tiny_fp8_dir, tiny_settings):
    pipe = load_pipeline(tiny_fp8_dir)
    s = tiny_settings
    prompt = "a neon sign that says OPEN above a red door"
    noise = initial_noise(pipe, 3, s)
    ours = np.asarray(generate(pipe, prompt, 3, s, latents=noise))
    theirs = pipe(
        prompt=prompt,
        height=s.height,
        width=s.width,
        num_inference_steps=s.steps,
        guidance_scale=None,
        guidance_schedule=list(s.guidance_schedule),
        mu=s.mu,
        std=s.std,
        max_sequence_length=s.max_sequence_length,
        latents=noise,
        output_type="pil",
    ).images[0]
    assert np.array_equal(ours, np.asarray(theirs))
    # the conditioning encoded earlier (e.g. from a cache) gives the same image, and steps are timed
    cond = encode(pipe, prompt, s.height, s.width, s.max_sequence_length)
    timer = StepTimer("cpu")
    seen = []
    again = generate(
        pipe, prompt, 3, s, latents=noise, cond=cond, timer=timer, on_step=lambda i, x: seen.append(i)
    )
    assert np.array_equal(np.asarray(again), ours)
    assert seen == list(range(s.steps)) and len(timer.steps) == s.steps and min(timer.steps) > 0
    assert torch.equal(cond.text, encode(pipe, prompt, s.height, s.width, s.max_sequence_length).text)
    assert cond.text.dtype == torch.bfloat16 and cond.prompt_tokens < s.max_sequence_length
