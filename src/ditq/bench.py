"""The end-to-end benchmark: calibrate -> quantize each variant -> paired run -> metrics -> report.

Every stage skips what already exists, so an interrupted `ditq bench` resumes where it stopped. The calibration
captions are suite prompts outside the evaluated subset, so calibration never sees the images it is judged on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

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


def ensure_calibration(args, out: Path, settings, options=None) -> Path:
    """`out/calibration.safetensors` (kept when it exists): the reference over held-out captions, under the
    run's offload policy."""
    from ditq.models.execution import ExecutionOptions
    from ditq.runs.placed import calibrate_placed

    path = out / "calibration.safetensors"
    if path.is_file():
        return path
    captions = calibration_captions(args.suite, args.calibration_samples)
    options = options or ExecutionOptions(device=str(args.device), dtype=args.dtype)
    stats = calibrate_placed(args.model, captions, settings, options)
    out.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return path


SMOOTHED = ("int8", "svdq_w4a4", "convrot_w4a4")  # recipes whose SmoothQuant needs the calibration statistics


def _bench_recipe(name: str, args, stats):
    from ditq.quant.recipes import parse_recipe

    if name in SMOOTHED:
        return parse_recipe(name, alpha=args.alpha, smoothquant=stats is not None)
    return parse_recipe(name)


def run_bench(
    args, variant_names: list[str], build_spec: Callable, on_step: Callable[[str], None], options=None
):
    """Calibrate, quantize every variant not on disk yet, run, score and report; returns the report's paths.

    A name's @suffix (`int8@attn8`) runs the same quantized folder another way, so it is quantized once. LoRAs
    (`--lora`) are applied to every variant, the reference included: each quantized variant is judged against
    the reference with the same LoRAs (as bf16 branches), on the same paired noise."""
    from ditq.metrics import evaluate_run
    from ditq.models.execution import ExecutionOptions, split_variant
    from ditq.quant.recipes import recipe_names
    from ditq.quant.writer import quantize_pipeline
    from ditq.report import build_report
    from ditq.runs.generation import run_generation

    out: Path = args.output
    options = options or ExecutionOptions(device=str(args.device), dtype=args.dtype)
    known = recipe_names()
    bases = {name: split_variant(name)[0] for name in variant_names}
    unknown = [
        v for v, b in bases.items() if b != args.reference and not all(p in known for p in b.split("+"))
    ]
    if unknown:
        raise ConfigError(
            f"--variants: unknown variant(s) {', '.join(unknown)}; known: {args.reference}, {', '.join(known)}, "
            "or a per-branch mix such as int8+q4_k, each optionally with @attn8"
        )
    if args.reference not in variant_names:
        variant_names = [args.reference, *variant_names]
        bases[args.reference] = args.reference
    # Settings first (from the reference model's defaults), so calibration follows the run's schedule; the
    # LoRA flags are checked here too, before any work.
    spec0 = build_spec(args, {args.reference: args.model})
    if spec0.loras:
        on_step("LoRAs on every variant: " + ", ".join(f"{s.path}:{s.strength:g}" for s in spec0.loras))
    stats = None
    if any(part in SMOOTHED for v in variant_names for part in bases[v].split("+")):
        on_step("calibrating SmoothQuant on held-out captions")
        stats = ensure_calibration(args, out, spec0.settings, options)
    folders = {args.reference: args.model}
    for base in dict.fromkeys(bases[v] for v in variant_names):
        if base in folders:
            continue
        folder = Path(getattr(args, "variant_dir", None) or out / "variants") / base
        on_step(f"quantizing {base} -> {folder}")
        cond, _, uncond = base.partition("+")
        quantize_pipeline(
            args.model,
            _bench_recipe(cond, args, stats),
            folder,
            uncond_recipe=_bench_recipe(uncond, args, stats) if uncond else None,
            stats=stats,
        )
        folders[base] = str(folder)
    variants = {args.reference: args.model, **{name: folders[bases[name]] for name in variant_names}}
    spec = build_spec(args, variants)
    run_dir = out / "run"
    on_step(f"generating {len(variants)} variants x suite {spec.suite} x seeds {list(spec.seeds)}")
    run_generation(run_dir, spec, options=options)
    on_step("scoring images")
    result = evaluate_run(run_dir, metrics=args.metrics, device=args.device, reference=args.reference)
    for name, status in result.statuses.items():
        if not status.available:
            on_step(f"metric {name} unavailable: {status.reason}")
    on_step("writing the report")
    return build_report(run_dir)
