"""The end-to-end benchmark: calibrate -> quantize each variant -> paired run -> metrics -> report.

Every stage skips what already exists, so an interrupted `ditq bench` resumes where it stopped. The calibration
captions are suite prompts outside the evaluated subset, so calibration never sees the images it is judged on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ditq.errors import ConfigError

log = logging.getLogger(__name__)


def calibration_captions(eval_suite: str, n: int) -> list[str]:
    """`n` captions from the full suite, none of them in `eval_suite`, spread over categories."""
    from ditq.prompts.suite import load_suite

    held_out = {r.id for r in load_suite(eval_suite)}
    pool = [r for r in load_suite("full") if r.id not in held_out]
    by_cat: dict[str, list] = {}
    for r in pool:
        by_cat.setdefault(r.category, []).append(r)
    picked: list[str] = []
    while len(picked) < n and any(by_cat.values()):
        for cat in sorted(by_cat):
            if by_cat[cat] and len(picked) < n:
                picked.append(by_cat[cat].pop(0).caption)
    if len(picked) < n:
        raise ConfigError(
            f"only {len(picked)} calibration captions are available outside suite {eval_suite!r}"
        )
    return picked


def ensure_calibration(args, out: Path, settings) -> Path:
    from ditq.models.loading import load_pipeline
    from ditq.quant.calibration import calibrate_pipeline

    path = out / "calibration.safetensors"
    if path.is_file():
        return path
    captions = calibration_captions(args.suite, args.calibration_samples)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pipe = load_pipeline(args.model, device=args.device, dtype=dtype)
    stats = calibrate_pipeline(
        pipe,
        captions,
        height=settings.height,
        width=settings.width,
        steps=settings.steps,
        guidance_schedule=list(settings.guidance_schedule),
        mu=settings.mu,
        std=settings.std,
        max_sequence_length=settings.max_sequence_length,
    )
    out.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return path


def _bench_recipe(name: str, args, stats):
    from ditq.quant.recipes import parse_recipe

    if name == "int8":
        return parse_recipe("int8", alpha=args.alpha, smoothquant=stats is not None)
    return parse_recipe(name)


def run_bench(args, variant_names: list[str], build_spec: Callable, on_step: Callable[[str], None]):
    from ditq.metrics import evaluate_run
    from ditq.quant.recipes import recipe_names
    from ditq.quant.writer import quantize_pipeline
    from ditq.report import build_report
    from ditq.runs.generation import run_generation

    out: Path = args.output
    known = recipe_names()
    unknown = [v for v in variant_names if v != args.reference and not all(p in known for p in v.split("+"))]
    if unknown:
        raise ConfigError(
            f"--variants: unknown variant(s) {', '.join(unknown)}; known: {args.reference}, {', '.join(known)}, "
            "or a per-branch mix such as int8+q4_k"
        )
    if args.reference not in variant_names:
        variant_names = [args.reference, *variant_names]
    # Settings first (from the reference model's defaults), so calibration follows the run's schedule.
    spec0 = build_spec(args, {args.reference: args.model})
    stats = None
    if any("int8" in v.split("+") for v in variant_names):
        on_step("calibrating int8 on held-out captions")
        stats = ensure_calibration(args, out, spec0.settings)
    variants = {args.reference: args.model}
    for name in variant_names:
        if name == args.reference:
            continue
        folder = out / "variants" / name
        on_step(f"quantizing {name} -> {folder}")
        cond, _, uncond = name.partition("+")
        quantize_pipeline(
            args.model,
            _bench_recipe(cond, args, stats),
            folder,
            uncond_recipe=_bench_recipe(uncond, args, stats) if uncond else None,
            stats=stats,
        )
        variants[name] = str(folder)
    spec = build_spec(args, variants)
    run_dir = out / "run"
    on_step(f"generating {len(variants)} variants x suite {spec.suite} x seeds {list(spec.seeds)}")
    run_generation(
        run_dir, spec, device=args.device, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32
    )
    on_step("scoring images")
    result = evaluate_run(run_dir, metrics=args.metrics, device=args.device, reference=args.reference)
    for name, status in result.statuses.items():
        if not status.available:
            on_step(f"metric {name} unavailable: {status.reason}")
    on_step("writing the report")
    return build_report(run_dir)
