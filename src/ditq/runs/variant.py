"""One variant's share of a paired run: its pipeline under its placement policy and LoRAs, and its images.

A variant runs with the run's `ExecutionOptions` overridden by its own (`RunSpec.variant_options`, e.g. the
`@attn8` suffix's INT8 attention). LoRAs (`RunSpec.loras`) are applied to every variant, the reference included, as
branches beside its layers (bf16), after loading and before the offload hooks, so the hooks see their factors.
`check_variants` refuses, before any image, what loading would refuse later (INT8 attention where the kernel does
not run, a LoRA an INT8 folder cannot take).
"""

from __future__ import annotations

import hashlib
import logging
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ditq.errors import ConfigError
from ditq.models.execution import ExecutionOptions
from ditq.models.sampling import SamplingSettings, initial_noise, png_metadata
from ditq.runs.embeddings import EmbeddingCache, ensure_embeddings
from ditq.runs.manifest import append_jsonl

if TYPE_CHECKING:
    from ditq.runs.generation import Job, RunSpec

log = logging.getLogger(__name__)


def variant_options(options: ExecutionOptions, spec: RunSpec, variant: str) -> ExecutionOptions:
    """The run's execution options with the variant's own overrides."""
    return replace(options, **spec.variant_options.get(variant, {}))


def check_variants(spec: RunSpec, options: ExecutionOptions) -> None:
    """Refuse, before any image is generated, a variant whose attention kernel cannot run on the device or whose
    folder cannot take the run's LoRAs."""
    from ditq.models.attention import int8_attention_available

    for variant, model in spec.variants.items():
        opts = variant_options(options, spec, variant)
        if opts.attention == "int8":
            ok, why = int8_attention_available(opts.device)
            if not ok:
                raise ConfigError(f"variant {variant} (--attention int8 / @attn8): {why}")
        if spec.loras:
            from ditq.lora import check_folder_loras
            from ditq.models.loading import resolve_source

            check_folder_loras(resolve_source(model), spec.loras, variant)


def resolve_policy(options: ExecutionOptions, model: str, settings: SamplingSettings) -> str:
    """The offload policy a variant runs under: the given one, or for `auto` the planner's choice on a CUDA device
    (`ditq.quant.plan.choose_policy`) and `none` elsewhere: the policies move components between the host and the
    device, and on the host there is nothing to move."""
    if options.offload != "auto":
        return options.offload
    if torch.device(options.device).type != "cuda":
        return "none"
    from ditq.quant.plan import choose_policy

    return choose_policy(model, settings, options.device)


@dataclass
class VariantRun:
    """One variant's share of a run: its embeddings, its pipeline under its placement policy, its images."""

    run_dir: Path
    spec: RunSpec
    variant: str
    model: str
    options: ExecutionOptions
    manifest: Path
    budget: object  # generation._Budget: .exhausted, .used
    bar: object
    cache: EmbeddingCache

    def run(self, jobs: list[Job]) -> dict:
        from ditq.models.loading import load_pipeline, model_defaults, resolve_source
        from ditq.models.placement import apply_policy, load_device, release

        opts = variant_options(self.options, self.spec, self.variant)
        settings = capped(self.spec.settings, model_defaults(resolve_source(self.model)))
        keys = ensure_embeddings(
            self.cache, self.model, [j.text for j in jobs], settings, opts.device, opts.torch_dtype
        )
        policy = resolve_policy(opts, self.model, settings)
        pipe = load_pipeline(
            self.model,
            device=load_device(policy, opts.device),
            dtype=opts.torch_dtype,
            fp8_compute=opts.fp8_compute,
            compile=opts.compile,
            attention=opts.attention,
            parts="denoiser",
        )
        loras = self._apply_loras(pipe)
        apply_policy(pipe, policy, opts.device)
        info = {
            **variant_record(self.variant, self.model, pipe),
            "offload": policy,
            "execution": opts.to_dict(),
            "loras": loras,
        }
        for n, job in enumerate(jobs):
            if self.budget.exhausted:
                break
            cond = self.cache.get(keys[job.text])
            record = generate_job(pipe, job, self.model, settings, self.run_dir, opts.device, cond)
            record["warmup"] = n == 0  # the first image of a loaded variant pays one-time costs
            record["offload"] = policy
            append_jsonl(self.manifest, record)
            self.budget.used += 1
            self.bar.update()
        release(pipe)
        return info

    def _apply_loras(self, pipe) -> dict[str, dict]:
        """Apply the run's LoRAs; {name: {transformer: layers adapted}} for the record."""
        if not self.spec.loras:
            return {}
        from ditq.lora import apply_loras

        applied = apply_loras(pipe, self.spec.loras, strict=self.spec.lora_strict)
        return {a.name: {b: len(layers) for b, layers in a.layers.items()} for a in applied}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def variant_record(name: str, model: str, pipe) -> dict:
    from ditq.models.loading import pipeline_info
    from ditq.models.sizes import files_on_disk, resident_bytes

    info = pipeline_info(pipe)
    folder = info.folder
    comps = ("transformer", "unconditional_transformer", "text_encoder", "vae")
    return {
        "model": model,
        "folder": str(folder),
        "format": info.variant,
        "bytes_on_disk": {c: sum(files_on_disk(folder / c).values()) for c in comps},
        "resident_bytes": {
            c: resident_bytes(getattr(pipe, c)) for c in comps if getattr(pipe, c) is not None
        },
    }


def generate_job(
    pipe, job: Job, model: str, settings: SamplingSettings, run_dir: Path, device: str, cond=None
) -> dict:
    """One image of the run: generated from its paired noise, written atomically; returns its manifest record."""
    from ditq.models.denoise import StepTimer

    noise = initial_noise(pipe, job.seed, settings)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(device)
    t0 = time.perf_counter()
    image = checked_generate(pipe, job, settings, noise, timer, cond)
    wall = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = run_dir / job.path
    save_png(image, out, job, model, settings)
    return {
        "variant": job.variant,
        "prompt_id": job.prompt_id,
        "seed": job.seed,
        "caption_mode": job.caption_mode,
        "category": job.category,
        "path": job.path,
        "sha256": sha256_file(out),
        "noise_sha256": hashlib.sha256(noise.numpy().tobytes()).hexdigest(),
        "wall_s": round(wall, 4),
        "step_s": [round(t, 5) for t in timer.steps],
        "peak_mem_bytes": int(peak),
        "peak_mem_kind": "cuda_allocated" if cuda else "process_rss",
        "device": str(device),
    }


def checked_generate(pipe, job: Job, settings: SamplingSettings, noise, timer, cond):
    """`generate` with the latents checked after every step; a non-finite step stops the run before any image is
    written, naming the variant, the image, the step and the first module whose output went non-finite."""
    from ditq.errors import NonFiniteError
    from ditq.models.finite import FiniteCheck, NonFiniteStep, first_nonfinite_module
    from ditq.models.sampling import generate

    try:
        return generate(
            pipe, job.text, job.seed, settings, latents=noise, timer=timer, cond=cond, on_step=FiniteCheck()
        )
    except NonFiniteStep as bad:
        module = first_nonfinite_module(
            pipe, lambda: generate(pipe, job.text, job.seed, settings, latents=noise, cond=cond)
        )
        raise NonFiniteError(
            f"variant {job.variant}: {job.path}: the latents went non-finite at step {bad.step}; first module "
            f"with a non-finite output: {module or 'none found on a rerun'}; no image was written"
        ) from None


def save_png(image, out: Path, job: Job, model: str, settings: SamplingSettings) -> None:
    import os

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    meta = png_metadata(
        prompt=job.text,
        prompt_id=job.prompt_id,
        seed=job.seed,
        variant=job.variant,
        model=model,
        caption_mode=job.caption_mode,
        settings=settings.to_dict(),
    )
    image.save(tmp, format="PNG", pnginfo=meta)
    os.replace(tmp, out)


def capped(settings: SamplingSettings, defaults) -> SamplingSettings:
    """The run's settings, with the text length capped to what the model takes (the tiny model: 512)."""
    cap = defaults.max_sequence_length
    return settings if settings.max_sequence_length <= cap else replace(settings, max_sequence_length=cap)
