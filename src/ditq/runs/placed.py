"""A pipeline loaded under an offload policy, with its LoRAs, for the verbs that generate or calibrate.

    pipe, conds, policy = placed_pipeline("variants/q4_k", prompts, settings, options, loras=specs)
    generate(pipe, prompt, seed, settings, cond=conds.get(prompt))

For the two-phase policies (`encoder`, `group`) every prompt is encoded first by a pipeline holding only the text
encoder, which is released before the transformers are loaded (`conds`: {prompt: Conditioning on the CPU}); the
other policies load everything and encode as they go (`conds` is empty). LoRAs are applied after loading and
before the policy's hooks, so the hooks move their factors with the layers.
"""

from __future__ import annotations

from collections.abc import Sequence

from ditq.lora.spec import LoraSpec
from ditq.models.execution import ExecutionOptions
from ditq.models.sampling import SamplingSettings


def placed_pipeline(
    model: str,
    prompts: Sequence[str],
    settings: SamplingSettings,
    options: ExecutionOptions,
    *,
    loras: Sequence[LoraSpec] = (),
    lora_strict: bool = False,
) -> tuple[object, dict, str]:
    """(pipeline, {prompt: Conditioning}, the policy it runs under) for `model` (`auto` resolved here)."""
    from ditq.models.loading import load_pipeline
    from ditq.models.placement import TWO_PHASE, apply_policy, encode_all, load_device, load_parts
    from ditq.runs.variant import resolve_policy

    policy = resolve_policy(options, model, settings)
    conds: dict = {}
    if policy in TWO_PHASE:
        conds = encode_all(model, prompts, settings, options.device, options.torch_dtype)
    pipe = load_pipeline(
        model,
        device=load_device(policy, options.device),
        dtype=options.torch_dtype,
        fp8_compute=options.fp8_compute,
        compile=options.compile,
        attention=options.attention,
        parts=load_parts(policy),
    )
    if loras:
        from ditq.lora import apply_loras

        apply_loras(pipe, list(loras), strict=lora_strict)
    apply_policy(pipe, policy, options.device)
    return pipe, conds, policy


def calibrate_placed(
    model: str, captions: Sequence[str], settings: SamplingSettings, options: ExecutionOptions, **kwargs
):
    """`ditq.quant.calibration.calibrate_pipeline` on `model` loaded under `options.offload` (the two-phase
    policies pass the conditionings encoded first, so the text encoder is off the device while the transformers
    are recorded). Calibration runs the plain kernels: PyTorch's attention, no `torch.compile` (the recorder's
    hooks read every Linear's input). `kwargs` go to `calibrate_pipeline` (seed, buckets, ...)."""
    from dataclasses import replace

    from ditq.models.placement import release
    from ditq.quant.calibration import calibrate_pipeline

    options = replace(options, compile=False, attention="sdpa")
    pipe, conds, _ = placed_pipeline(model, list(captions), settings, options)
    try:
        return calibrate_pipeline(
            pipe,
            list(captions),
            height=settings.height,
            width=settings.width,
            steps=settings.steps,
            guidance_schedule=list(settings.guidance_schedule),
            mu=settings.mu,
            std=settings.std,
            max_sequence_length=settings.max_sequence_length,
            **({"conditionings": conds} if conds else {}),
            **kwargs,
        )
    finally:
        release(pipe)
