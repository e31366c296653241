"""A non-finite step stops generation before any image is written, naming the variant, the step and the first
module whose output went non-finite."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ditq.errors import NonFiniteError
from ditq.models.finite import FiniteCheck, NonFiniteStep, first_nonfinite_module


def test_the_check_passes_finite_latents_and_stops_at_the_first_bad_step():
    check = FiniteCheck()
    check(0, torch.zeros(1, 4, 2))
    bad = torch.zeros(1, 4, 2)
    bad[0, 3, 1] = float("inf")
    with pytest.raises(NonFiniteStep) as info:
        check(5, bad)
    assert info.value.step == 5


def test_a_nan_in_one_layer_is_named_and_no_image_is_returned(tiny_fp8_dir, tiny_settings):
    """One row scale of the conditional transformer's second block's w2 is set to NaN: the run's generation refuses, naming
    that module (the first in call order whose output is non-finite); the healthy pipeline generates as before."""
    from ditq.models.loading import load_pipeline
    from ditq.models.sampling import initial_noise
    from ditq.runs.variant import checked_generate

    pipe = load_pipeline(str(tiny_fp8_dir))
    job = SimpleNamespace(text="a red fox", seed=0, variant="fp8", path="images/fp8/json/fox_s0.png")
    noise = initial_noise(pipe, 0, tiny_settings)
    assert checked_generate(pipe, job, tiny_settings, noise, None, None) is not None
    with torch.no_grad():
        pipe.transformer.layers[1].feed_forward.w2.stored("weight_scale")[3] = float("nan")  # one row's scale
    with pytest.raises(NonFiniteError) as info:
        checked_generate(pipe, job, tiny_settings, noise, None, None)
    message = str(info.value)
    assert "variant fp8" in message and "fox_s0.png" in message and "step 0" in message
    assert "transformer.layers.1.feed_forward.w2" in message and "no image was written" in message
    assert first_nonfinite_module(pipe, lambda: None) is None  # the hooks are gone again
