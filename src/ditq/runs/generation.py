"""Paired generation runs: every (variant, prompt, seed, caption mode) image from identical initial noise.

Jobs are ordered deterministically and sharded across processes by position (`jobs[rank::world]`), so any number
of ranks produces the same images as one process. Rank and world size come from torchrun's environment
(`RANK`, `WORLD_SIZE`, `LOCAL_RANK`); on CUDA each rank takes `cuda:LOCAL_RANK`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ditq._version import __version__
from ditq.errors import ConfigError
from ditq.host import host_record
from ditq.lora.spec import LoraSpec, lora_records
from ditq.models.execution import ExecutionOptions
from ditq.models.sampling import SamplingSettings
from ditq.runs.embeddings import EmbeddingCache
from ditq.runs.manifest import (
    RUN_FILE,
    check_compatible,
    finished,
    image_key,
    merge_manifests,
    read_run_record,
    write_json_atomic,
)
from ditq.runs.variant import VariantRun, check_variants, resolve_policy, variant_options

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
    # LoRAs applied to every variant (the reference too), as branches; part of what the images are
    loras: tuple[LoraSpec, ...] = ()
    lora_strict: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "loras", tuple(self.loras))
        if not all(isinstance(s, LoraSpec) for s in self.loras):
            raise ConfigError("RunSpec.loras must be LoraSpec objects (ditq.lora.parse_lora_spec)")
        unknown = [n for n in self.variant_options if n not in self.variants]
        if unknown:
            raise ConfigError(f"RunSpec.variant_options: no variant named {unknown[0]!r}")
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


def _run_record(spec: RunSpec, prompts: list) -> dict:
    return {
        "suite": spec.suite,
        "prompt_ids": [p.id for p in prompts],
        "seeds": list(spec.seeds),
        "caption_modes": list(spec.caption_modes),
        "settings": spec.settings.to_dict(),
        "reference_variant": spec.reference_variant,
        "variants": {},
        "loras": lora_records(spec.loras),
        "ditq_version": __version__,
    }


def prepare_run_dir(run_dir: Path, spec: RunSpec, options: ExecutionOptions | None = None) -> dict:
    """Create or check `run.json` and `prompts.jsonl`; returns the run record. Each variant records its model and
    the execution options that change its pixels (attention kernel, dtype, FP8 compute)."""
    import json

    from ditq.prompts.suite import load_suite

    prompts = load_suite(spec.suite)[: spec.limit]
    record = _run_record(spec, prompts)
    options = options or ExecutionOptions()
    record["variants"] = {
        n: {"model": m, **pixel_options(variant_options(options, spec, n))} for n, m in spec.variants.items()
    }
    path = run_dir / RUN_FILE
    if path.is_file():
        existing = read_run_record(path)
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


def pixel_options(options: ExecutionOptions) -> dict:
    """The execution options that change an image (the others, offload and compile, leave it bit-identical)."""
    return {"attention": options.attention, "dtype": options.dtype, "fp8_compute": options.fp8_compute}


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

    `options` says how (device, dtype, compile, attention, offload policy; `device` and `dtype` are its shorthand),
    `spec.variant_options` how each variant differs, `spec.loras` the LoRAs applied to every variant.
    Every prompt is encoded once, with only the text encoder on the device, and cached in the run folder; then
    each variant denoises from the cache. `stop_after` stops after that many new images (tests of resume).
    """
    from tqdm import tqdm

    from ditq.runs.lock import run_lock

    options = options or ExecutionOptions(device=device, dtype="fp32" if dtype == torch.float32 else "bf16")
    run_dir = Path(run_dir)
    rank, world, local_rank = distributed_env()
    options = replace(options, device=rank_device(options.device, world, local_rank))
    check_variants(spec, options)
    with contextlib.ExitStack() as stack:
        if rank == 0:
            record = prepare_run_dir(run_dir, spec, options)
            stack.enter_context(run_lock(run_dir, rank))  # before anything is written: one writer per rank
            # the host of the latest invocation: threads, load, CPU or GPU
            record["host"] = host_record(options.device)
            if options.device == "cpu":  # INT8 layers on the host use the GEMM a one-time measurement chose
                from dataclasses import asdict

                from ditq.formats.int8_ops import cpu_gemm

                record["host"]["int8_cpu_gemm"] = asdict(cpu_gemm())
            record["tiny"] = _is_tiny(spec.variants[spec.reference_variant])
            record["execution"] = options.to_dict()
            write_json_atomic(run_dir / RUN_FILE, record)
        _barrier(world)
        if rank != 0:
            stack.enter_context(run_lock(run_dir, rank))
        all_jobs = plan_jobs(spec)
        mine = all_jobs[rank::world]
        done = finished(run_dir, verify=True)
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
                ctx = VariantRun(run_dir, spec, variant, model, options, manifest, budget, bar, cache)
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


def _finish_run(
    run_dir: Path, variant_info: dict, device: str, dtype: torch.dtype, all_jobs: list[Job]
) -> None:
    record = read_run_record(run_dir / RUN_FILE)
    record.setdefault("variants", {})
    for name, info in variant_info.items():
        record["variants"][name] = {**record["variants"].get(name, {}), **info}
    record["device"] = str(device)
    record["dtype"] = str(dtype).replace("torch.", "")

    write_json_atomic(run_dir / RUN_FILE, record)
    merge_manifests(run_dir, [j.key for j in all_jobs])


def _barrier(world: int) -> None:
    if world <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    dist.barrier()


__all__ = ["Job", "RunSpec", "image_key", "plan_jobs", "resolve_policy", "run_generation"]
