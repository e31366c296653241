"""`ditq calibrate MODEL --captions FILE --samples N -o stats.safetensors`: record the activation statistics of both
transformers (per timestep bucket) over the real sampling schedule, once, for SmoothQuant, the fragility analysis
and GGUF importance matrices."""

from __future__ import annotations

from pathlib import Path

from ditq.errors import ConfigError


def add_parser(subparsers) -> None:
    from ditq.cli.generate import add_offload_arg, add_sampling_args
    from ditq.names import OFFLOAD

    p = subparsers.add_parser(
        "calibrate", help="record activation statistics for INT8 / GGUF", description=__doc__
    )
    p.add_argument("model", help="the reference model: 'tiny', a pipeline folder (official FP8) or a hub id")
    p.add_argument(
        "--captions",
        type=Path,
        help="JSONL with a 'caption' or 'prompt' per line (default: the built-in prompt suite)",
    )
    p.add_argument("--samples", type=int, default=16, help="number of captions to run (default 16)")
    p.add_argument("-o", "--output", type=Path, required=True, help="statistics file to write (.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first caption; caption i uses seed + i")
    p.add_argument(
        "--buckets", type=int, default=4, help="timestep buckets, equal widths in [0, 1] (default 4)"
    )
    p.add_argument(
        "--sample-tokens",
        type=int,
        default=64,
        help="input tokens kept per layer for choosing alpha (default 64)",
    )
    p.add_argument(
        "--probes-per-bucket",
        type=int,
        default=1,
        help="transformer calls kept per bucket for ditq sensitivity (default 1)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="compute dtype (default bf16)")
    add_offload_arg(p, OFFLOAD, "auto")
    add_sampling_args(p)
    p.set_defaults(func=run)


def read_captions(path: Path) -> list[str]:
    """Captions from a JSONL file: each line an object with a `caption` (text or JSON object) or `prompt`."""
    from ditq.cli.generate import read_jsonl_prompts

    return read_jsonl_prompts(path, "--captions")


def default_captions() -> list[str]:
    import ditq.prompts

    load_suite = getattr(ditq.prompts, "load_suite", None)
    if load_suite is None:
        raise ConfigError("no built-in prompt suite in this install; pass --captions FILE")
    return [r.caption or r.prompt for r in load_suite()]


def run(args) -> int:
    from ditq.cli.generate import execution_from_args, settings_from_args
    from ditq.models.loading import model_defaults, resolve_source
    from ditq.runs.placed import calibrate_placed
    from ditq.runs.variant import resolve_policy

    captions = read_captions(args.captions) if args.captions else default_captions()
    if args.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {args.samples} (zero calibration samples)")
    if args.samples > len(captions):
        where = args.captions or "the built-in suite"
        raise ConfigError(f"--samples {args.samples}: {where} has only {len(captions)} captions")
    if args.buckets < 1:
        raise ConfigError(f"--buckets must be >= 1, got {args.buckets}")
    s = settings_from_args(args, model_defaults(resolve_source(args.model)))
    options = execution_from_args(args)
    stats = calibrate_placed(
        args.model,
        captions[: args.samples],
        s,
        options,
        seed=args.seed,
        buckets=[i / args.buckets for i in range(args.buckets + 1)],
        sample_tokens=args.sample_tokens,
        probes_per_bucket=args.probes_per_bucket,
    )
    stats.meta["model"] = args.model
    stats.meta["offload"] = resolve_policy(options, args.model, s)
    path = stats.save(args.output)
    counts = {tr: len(m) for tr, m in stats.modules.items()}
    print(f"{path}: {args.samples} captions x {s.steps} steps, inputs recorded per transformer: {counts}")
    return 0
