"""Paired generation runs: every (variant, prompt, seed, caption mode) image from identical initial noise.

Jobs are ordered deterministically and sharded across processes by position (`jobs[rank::world]`), so any number
of ranks produces the same images as one process. Rank and world size come from torchrun's environment
(`RANK`, `WORLD_SIZE`, `LOCAL_RANK`); on CUDA each rank takes `cuda:LOCAL_RANK`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ditq._version import __version__
from ditq.errors import ConfigError
from ditq.host import host_record
from ditq.models.execution import ExecutionOptions
from ditq.models.sampling import SamplingSettings, initial_noise, png_metadata
from ditq.runs.embeddings import EmbeddingCache, ensure_embeddings
from ditq.runs.manifest import (
    RUN_FILE,
    append_jsonl,
    check_compatible,
    finished,
    image_key,
    merge_manifests,
    write_json_atomic,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """What a run generates. `variants` maps a variant name to its model (folder, hub id or 'tiny')."""

    variants: dict[str, str]
    suite: str = "smoke"
    seeds: tuple[int, ...] = (0,)
    caption_modes: tuple[str, ...] = ("json",)
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    reference_variant: str = "fp8"
    limit: int | None = None  # only the first N prompts of the suite
    # per-variant execution options over the run's (e.g. {"int8@attn8": {"attention": "int8"}})
    variant_options: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")
        if not self.variants:
            raise ConfigError("--variants: at least one variant is needed")
        if not self.seeds:
            raise ConfigError("--seeds: at least one seed is needed")
        for m in self.caption_modes:
            if m not in ("json", "raw"):
                raise ConfigError(f"--caption-modes: unknown mode {m!r}; known: json, raw")


@dataclass(frozen=True)
class Job:
    variant: str
    prompt_id: str
    seed: int
    caption_mode: str
    category: str
    text: str

    @property
    def key(self) -> tuple[str, str, int, str]:
        return (self.variant, self.prompt_id, self.seed, self.caption_mode)

    @property
    def path(self) -> str:
        return f"images/{self.variant}/{self.caption_mode}/{self.prompt_id}_s{self.seed}.png"


def plan_jobs(spec: RunSpec) -> list[Job]:
    from ditq.prompts.suite import suite_records

    jobs = []
    for variant in spec.variants:
        for mode in spec.caption_modes:
            for item in suite_records(spec.suite, mode)[: spec.limit]:
                for seed in spec.seeds:
                    jobs.append(Job(variant, item.id, seed, mode, item.category, item.text))
    return jobs


def rank_device(device: str, world: int, local_rank: int) -> str:
    """This rank's device: `cuda:LOCAL_RANK` under torchrun, made the current device before anything allocates
    (otherwise every rank's CUDA context and allocations would start on GPU 0)."""
    if not device.startswith("cuda"):
        return device
    if world > 1 and ":" not in device:
        device = f"cuda:{local_rank}"
    torch.cuda.set_device(torch.device(device))
    return device


def distributed_env() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _variant_record(name: str, model: str, pipe) -> dict:
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


def _run_record(spec: RunSpec, prompts: list) -> dict:
    return {
        "suite": spec.suite,
        "prompt_ids": [p.id for p in prompts],
        "seeds": list(spec.seeds),
        "caption_modes": list(spec.caption_modes),
        "settings": spec.settings.to_dict(),
        "reference_variant": spec.reference_variant,
        "variants": {},
        "ditq_version": __version__,
    }


def prepare_run_dir(run_dir: Path, spec: RunSpec) -> dict:
    """Create or check `run.json` and `prompts.jsonl`; returns the run record."""
    import json

    from ditq.prompts.suite import load_suite

    prompts = load_suite(spec.suite)[: spec.limit]
    record = _run_record(spec, prompts)
    record["variants"] = {n: {"model": m} for n, m in spec.variants.items()}
    path = run_dir / RUN_FILE
    if path.is_file():
        existing = json.loads(path.read_text())
        check_compatible(existing, record, run_dir)
        merged = dict(existing)
        merged["variants"] = {
            **existing.get("variants", {}),
            **{n: {**existing.get("variants", {}).get(n, {}), **v} for n, v in record["variants"].items()},
        }
        record = merged
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "prompts.jsonl").is_file():
        lines = [
            json.dumps(
                {
                    "id": p.id,
                    "category": p.category,
                    "prompt": p.prompt,
                    "caption": p.caption,
                    "texts": list(p.texts),
                },
                ensure_ascii=False,
            )
            for p in prompts
        ]
        tmp = run_dir / "prompts.jsonl.partial"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, run_dir / "prompts.jsonl")
    return record


def run_generation(
    run_dir: str | os.PathLike,
    spec: RunSpec,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    stop_after: int | None = None,
    options: ExecutionOptions | None = None,
) -> dict:
    """Generate the missing images of this rank's shard; returns {"generated", "skipped", "total"}.

    `options` says how (device, dtype, compile, attention, offload policy; `device` and `dtype` are its shorthand).
    Every prompt is encoded once, with only the text encoder on the device, and cached in the run folder; then
    each variant denoises from the cache. `stop_after` stops after that many new images (tests of resume).
    """
    from tqdm import tqdm

    options = options or ExecutionOptions(device=device, dtype="fp32" if dtype == torch.float32 else "bf16")
    run_dir = Path(run_dir)
    rank, world, local_rank = distributed_env()
    options = replace(options, device=rank_device(options.device, world, local_rank))
    if rank == 0:
        record = prepare_run_dir(run_dir, spec)
        record["host"] = host_record(options.device)  # of the latest invocation: threads, load, CPU or GPU
        record["tiny"] = _is_tiny(spec.variants[spec.reference_variant])
        record["execution"] = options.to_dict()
        write_json_atomic(run_dir / RUN_FILE, record)
    _barrier(world)
    all_jobs = plan_jobs(spec)
    mine = all_jobs[rank::world]
    done = finished(run_dir)
    todo = [j for j in mine if j.key not in done]
    manifest = run_dir / ("manifest.jsonl" if world == 1 else f"manifest.rank{rank}.jsonl")
    desc = f"run (rank {rank}/{world})" if world > 1 else "run"
    budget = _Budget(stop_after)
    variant_info: dict[str, dict] = {}
    cache = EmbeddingCache(run_dir)
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress) as bar:
        for variant, model in spec.variants.items():
            jobs = [j for j in todo if j.variant == variant]
            if not jobs and rank != 0:
                continue
            if budget.exhausted:
                break
            ctx = _VariantRun(run_dir, spec, variant, model, options, manifest, budget, bar, cache)
            variant_info[variant] = ctx.run(jobs)
    result = {"generated": budget.used, "skipped": len(mine) - len(todo), "total": len(all_jobs)}
    if budget.exhausted:
        return {**result, "stopped": True}
    _barrier(world)
    if rank == 0:
        _finish_run(run_dir, variant_info, options.device, options.torch_dtype, all_jobs)
    _barrier(world)
    return result


def _is_tiny(model: str) -> bool:
    """Whether the reference is the built-in tiny model (random weights: speed and quality only check code paths)."""
    if model == "tiny":
        return True
    from ditq.models.loading import resolve_source

    return (resolve_source(model) / "ditq_tiny.json").is_file()


class _Budget:
    """How many more images this call may generate (`stop_after`), and how many it did."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.used = limit, 0

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.used >= self.limit


@dataclass
class _VariantRun:
    """One variant's share of a run: its embeddings, its pipeline under its placement policy, its images."""

    run_dir: Path
    spec: RunSpec
    variant: str
    model: str
    options: ExecutionOptions
    manifest: Path
    budget: _Budget
    bar: object
    cache: EmbeddingCache

    def run(self, jobs: list[Job]) -> dict:
        from ditq.models.loading import load_pipeline, model_defaults, resolve_source
        from ditq.models.placement import apply_policy, load_device, release

        opts = replace(self.options, **self.spec.variant_options.get(self.variant, {}))
        settings = _capped(self.spec.settings, model_defaults(resolve_source(self.model)))
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
        apply_policy(pipe, policy, opts.device)
        info = {
            **_variant_record(self.variant, self.model, pipe),
            "offload": policy,
            "execution": opts.to_dict(),
        }
        for n, job in enumerate(jobs):
            if self.budget.exhausted:
                break
            cond = self.cache.get(keys[job.text])
            record = _generate_job(pipe, job, self.model, settings, self.run_dir, opts.device, cond)
            record["warmup"] = n == 0  # the first image of a loaded variant pays one-time costs
            record["offload"] = policy
            append_jsonl(self.manifest, record)
            self.budget.used += 1
            self.bar.update()
        release(pipe)
        return info


def resolve_policy(options: ExecutionOptions, model: str, settings: SamplingSettings) -> str:
    """The offload policy a variant runs under: the given one, or the planner's choice for `auto`."""
    if options.offload != "auto":
        return options.offload
    from ditq.quant.plan import choose_policy

    return choose_policy(model, settings, options.device)


def _generate_job(
    pipe, job: Job, model: str, settings: SamplingSettings, run_dir: Path, device: str, cond=None
) -> dict:
    """One image of the run: generated from its paired noise, written atomically; returns its manifest record."""
    from ditq.models.denoise import StepTimer
    from ditq.models.sampling import generate

    noise = initial_noise(pipe, job.seed, settings)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(device)
    t0 = time.perf_counter()
    image = generate(pipe, job.text, job.seed, settings, latents=noise, timer=timer, cond=cond)
    wall = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = run_dir / job.path
    _save_png(image, out, job, model, settings)
    return {
        "variant": job.variant,
        "prompt_id": job.prompt_id,
        "seed": job.seed,
        "caption_mode": job.caption_mode,
        "category": job.category,
        "path": job.path,
        "sha256": _sha256(out),
        "noise_sha256": hashlib.sha256(noise.numpy().tobytes()).hexdigest(),
        "wall_s": round(wall, 4),
        "step_s": [round(t, 5) for t in timer.steps],
        "peak_mem_bytes": int(peak),
        "peak_mem_kind": "cuda_allocated" if cuda else "process_rss",
        "device": str(device),
    }


def _save_png(image, out: Path, job: Job, model: str, settings: SamplingSettings) -> None:
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


def _finish_run(
    run_dir: Path, variant_info: dict, device: str, dtype: torch.dtype, all_jobs: list[Job]
) -> None:
    import json

    record = json.loads((run_dir / RUN_FILE).read_text())
    for name, info in variant_info.items():
        record["variants"][name] = {**record["variants"].get(name, {}), **info}
    record["device"] = str(device)
    record["dtype"] = str(dtype).replace("torch.", "")

    write_json_atomic(run_dir / RUN_FILE, record)
    merge_manifests(run_dir, [j.key for j in all_jobs])


def _capped(settings: SamplingSettings, defaults) -> SamplingSettings:
    """The run's settings, with the text length capped to what the model takes (the tiny model: 512)."""
    cap = defaults.max_sequence_length
    return settings if settings.max_sequence_length <= cap else replace(settings, max_sequence_length=cap)


def _barrier(world: int) -> None:
    if world <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    dist.barrier()


__all__ = ["Job", "RunSpec", "plan_jobs", "run_generation", "image_key"]
