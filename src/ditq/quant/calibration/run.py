"""Calibration runs.

- `calibrate_pipeline`: Ideogram 4 captions over the real sampling schedule, both transformers hooked (the
  unconditional one sees zeroed text and has its own weights, so it gets its own statistics). The denoising runs
  through `ditq.models.denoise` (encode, then denoise), the stages generation uses, so the same placement policies
  apply; the statistics stay on the device and are moved to the host once per prompt when a `state_path` is given,
  where they are written (temporary name, then rename) so that an interrupted run resumes with the next prompt.
- `calibrate_model`: any model, driven by a probe (a callable that runs it on the calibration inputs); padding is
  left out through the calls' attention masks, and the smoothing groups are found on its first call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditq.errors import CheckpointError, ConfigError
from ditq.quant.calibration.recorder import CalibrationRecorder, TokenMask, default_token_mask
from ditq.quant.calibration.stats import DEFAULT_BUCKETS, CalibrationStats, captions_hash

log = logging.getLogger(__name__)

TRANSFORMERS = ("transformer", "unconditional_transformer")
STATE_KEY = "ditq.calibration_state"


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
    state_path: str | os.PathLike | None = None,
    conditionings: Mapping[str, Any] | None = None,
    accumulate: str = "device",
    on_prompt: Callable[[int], None] | None = None,
) -> CalibrationStats:
    """Run `pipe` (the reference, e.g. FP8) on each caption with both transformers hooked; returns the statistics.

    Caption i starts from the initial noise of seed `seed + i` (`ditq.models.sampling.initial_noise`, as
    `generate` draws it); the statistics follow the real sampling schedule (`steps`, `mu`, `std`, resolution).
    `state_path`: a file the state is written to after every prompt and resumed from (it must come from a run with
    the same captions and settings; a different one is refused). `conditionings` ({caption: Conditioning}, e.g.
    `ditq.models.placement.encode_all`) skips the text encoder. `on_prompt(i)` is called after prompt i.
    """
    from tqdm.auto import tqdm

    from ditq.models.denoise import denoise, encode
    from ditq.models.sampling import SamplingSettings, initial_noise, text_tokens

    captions = list(captions)
    if not captions:
        raise ConfigError("calibration needs at least one caption (got 0 samples)")
    schedule = list(guidance_schedule) if guidance_schedule is not None else [7.0] * steps
    if len(schedule) != steps:
        raise ConfigError(f"guidance_schedule has {len(schedule)} entries, expected steps={steps}")
    if max_sequence_length is None:
        from ditq.models.loading import PipelineInfo, pipeline_info

        max_sequence_length = pipeline_info(pipe, PipelineInfo("", None)).max_sequence_length
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
    sampling = SamplingSettings(
        height=height,
        width=width,
        steps=steps,
        guidance_schedule=tuple(schedule),
        mu=mu,
        std=std,
        max_sequence_length=max_sequence_length,
    )
    rec = CalibrationRecorder(buckets, sample_tokens, probes_per_bucket, seed, accumulate=accumulate)
    key = _run_key(captions, settings, rec)
    done = 0
    if state_path is not None and Path(state_path).is_file():
        done = _load_state(rec, Path(state_path), key)
        log.info("%s: resuming calibration after %d of %d captions", state_path, done, len(captions))
    for name in TRANSFORMERS:
        rec.attach(getattr(pipe, name), name)
    device = pipe._execution_device
    try:
        with torch.no_grad():
            todo = range(done, len(captions))
            for i in tqdm(todo, desc="calibrating", disable=not progress, initial=done, total=len(captions)):
                caption = captions[i]
                cond = (conditionings or {}).get(caption)
                if cond is None:
                    cond = encode(pipe, caption, height, width, text_tokens(pipe, caption, sampling), device)
                latents = initial_noise(pipe, seed + i, sampling)
                denoise(pipe, cond.to(device), latents, height, width, schedule, mu, std)
                if state_path is not None:
                    _save_state(rec, Path(state_path), key, i + 1)
                if on_prompt is not None:
                    on_prompt(i)
    finally:
        rec.detach()
    return rec.result(
        {"samples": len(captions), "captions_sha256": captions_hash(captions), "settings": settings}
    )


def calibrate_model(
    model: nn.Module,
    probe: Callable[[nn.Module], Any],
    *,
    name: str = "model",
    buckets: Sequence[float] = (0.0, 1.0),
    sample_tokens: int = 64,
    seed: int = 0,
    token_mask: TokenMask | None = default_token_mask,
    find_groups: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> CalibrationStats:
    """Statistics of `model`'s Linear inputs over whatever `probe(model)` runs (e.g. a loop over calibration
    batches), under `name`. Padding tokens are left out through each call's attention mask (`token_mask`).

    With `find_groups`, the smoothing groups of the model (Linears sharing an input; the norm or Linear each can
    fold into, checked exactly on the first call) are found and kept in the statistics, for `SmoothQuantConfig`.
    """
    rec = CalibrationRecorder(buckets, sample_tokens, 0, seed, token_mask=token_mask)
    rec.attach(model, name, capture_first_call=find_groups)
    try:
        with torch.no_grad():
            probe(model)
    finally:
        rec.detach()
    if not rec.acc[name]:
        raise ConfigError(f"the probe ran no Linear layer of {name!r} (does it call the model?)")
    stats = rec.result(dict(meta or {}))
    if find_groups and name in rec.first_calls:
        from ditq.quant.int8.groups import discover_groups, groups_to_json, is_ideogram

        args, kwargs = rec.first_calls.pop(name)
        if not is_ideogram(model):  # Ideogram 4 keeps its named groups, which its files follow
            groups = discover_groups(model, lambda m: m(*args, **kwargs))
            stats.groups[name] = groups_to_json(groups)
    return stats


def _run_key(captions: Sequence[str], settings: dict, rec: CalibrationRecorder) -> str:
    text = json.dumps(
        {
            "captions_sha256": captions_hash(captions),
            "settings": settings,
            "buckets": list(rec.buckets),
            "sample_tokens": rec.sample_tokens,
            "probes_per_bucket": rec.probes_per_bucket,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _save_state(rec: CalibrationRecorder, path: Path, key: str, done: int) -> None:
    from ditq.io.safetensors_io import save_safetensors

    tensors, meta = rec.state()
    meta.update(key=key, done=done)
    save_safetensors(path, tensors, {STATE_KEY: json.dumps(meta), "format": "pt"})


def _load_state(rec: CalibrationRecorder, path: Path, key: str) -> int:
    """Load a saved state into `rec`; returns the number of captions it covers."""
    from ditq.io.safetensors_io import TensorSource

    try:
        src = TensorSource(path)
        meta = json.loads(src.metadata[STATE_KEY])
        tensors = {k: src.get(k) for k in src.keys()}
    except (KeyError, ValueError, CheckpointError) as exc:
        raise ConfigError(f"{path}: not a ditq calibration state ({exc}); delete it to start over") from None
    if meta.get("key") != key:
        raise ConfigError(
            f"{path}: the calibration state comes from other captions or settings; delete it (or pass "
            "--restart) to start over"
        )
    rec.load_state(tensors, meta)
    return int(meta["done"])
