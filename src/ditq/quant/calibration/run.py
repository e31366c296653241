"""`calibrate_pipeline`: run the reference pipeline on captions over the real sampling schedule with both
transformers hooked (the unconditional one sees zeroed text and has its own weights, so it gets its own
statistics)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ditq.errors import ConfigError
from ditq.quant.calibration.recorder import CalibrationRecorder
from ditq.quant.calibration.stats import DEFAULT_BUCKETS, CalibrationStats, captions_hash

log = logging.getLogger(__name__)

TRANSFORMERS = ("transformer", "unconditional_transformer")


def calibrate_pipeline(
    pipe,
    captions: Sequence[str],
    *,
    height: int = 1024,
    width: int = 1024,
    steps: int = 20,
    guidance_schedule: Sequence[float] | None = None,
    mu: float = 0.0,
    std: float = 1.75,
    max_sequence_length: int | None = None,
    seed: int = 0,
    buckets: Sequence[float] = DEFAULT_BUCKETS,
    sample_tokens: int = 64,
    probes_per_bucket: int = 1,
    progress: bool = True,
) -> CalibrationStats:
    """Run `pipe` (the reference, e.g. FP8) on each caption with both transformers hooked; returns the statistics.

    Caption i uses seed `seed + i`; the denoising loop is the pipeline's own, so the statistics follow the real
    sampling schedule (`steps`, `mu`, `std`, resolution).
    """
    from tqdm.auto import tqdm

    captions = list(captions)
    if not captions:
        raise ConfigError("calibration needs at least one caption (got 0 samples)")
    schedule = list(guidance_schedule) if guidance_schedule is not None else [7.0] * steps
    if len(schedule) != steps:
        raise ConfigError(f"guidance_schedule has {len(schedule)} entries, expected steps={steps}")
    if max_sequence_length is None:
        from ditq.models.loading import PipelineInfo, pipeline_info

        max_sequence_length = pipeline_info(pipe, PipelineInfo("", None)).max_sequence_length
    rec = CalibrationRecorder(buckets, sample_tokens, probes_per_bucket, seed)
    for name in TRANSFORMERS:
        rec.attach(getattr(pipe, name), name)
    try:
        with torch.no_grad():
            for i, caption in enumerate(tqdm(captions, desc="calibrating", disable=not progress)):
                pipe(
                    prompt=caption,
                    height=height,
                    width=width,
                    num_inference_steps=steps,
                    guidance_scale=None,
                    guidance_schedule=schedule,
                    mu=mu,
                    std=std,
                    max_sequence_length=max_sequence_length,
                    generator=torch.Generator().manual_seed(seed + i),
                    output_type="latent",
                )
    finally:
        rec.detach()
    settings = {
        "height": height,
        "width": width,
        "steps": steps,
        "guidance_schedule": schedule,
        "mu": mu,
        "std": std,
        "max_sequence_length": max_sequence_length,
        "seed": seed,
    }
    return rec.result(
        {"samples": len(captions), "captions_sha256": captions_hash(captions), "settings": settings}
    )
