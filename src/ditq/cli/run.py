"""`ditq run`: generate every (variant, prompt, seed) image of a suite from identical initial noise.

Resumable (finished images are skipped) and shardable: `torchrun --nproc-per-node N -m ditq run ...` splits the
work across processes deterministically and merges the manifests.
"""

from __future__ import annotations

from pathlib import Path

from ditq.cli.generate import add_execution_args, add_lora_args, add_sampling_args, execution_from_args
from ditq.errors import ConfigError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="paired generation run over a prompt suite", description=__doc__)
    add_run_args(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="run folder")
    p.set_defaults(func=run)


def add_run_args(p) -> None:
    p.add_argument(
        "--model", default="tiny", help="the reference model: 'tiny' (default), a folder or a hub id"
    )
    p.add_argument(
        "--variants",
        default="fp8",
        help="comma-separated variants: the reference name (fp8), recipe names found in --variant-dir, "
        "or name=FOLDER; a suffix @attn8 runs that variant with INT8 attention (int8@attn8) (default: fp8)",
    )
    p.add_argument("--variant-dir", type=Path, help="folder holding quantized variants as <dir>/<name>")
    p.add_argument("--reference", default="fp8", help="name of the reference variant (default fp8)")
    p.add_argument("--suite", default="smoke", help="prompt suite: smoke (default), quick, full")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--limit", type=int, help="only the first N prompts of the suite")
    p.add_argument(
        "--caption-modes", default="json", help="json, raw or json,raw (the ablation) (default: json)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into an existing -o folder that is not a ditq run (bench) folder; nothing in it is deleted",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1 ...")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="compute dtype (default bf16)")
    add_execution_args(p)
    add_lora_args(p)
    add_sampling_args(p)


def resolve_variants(args) -> dict[str, str]:
    """{variant name: model} from --variants; a name's @suffix (`int8@attn8`) names how it runs, and its model is
    that of the name before the suffix."""
    from ditq.models.execution import split_variant
    from ditq.quant.recipes import recipe_names

    known_recipes = recipe_names()
    variant_dir = args.variant_dir or Path("variants")
    variants: dict[str, str] = {}
    for item in [v.strip() for v in args.variants.split(",") if v.strip()]:
        name, _, path = item.partition("=")
        base, _ = split_variant(name)
        if path:
            if not Path(path).is_dir():
                raise ConfigError(f"--variants {name}={path}: no such folder")
            variants[name] = path
        elif base == args.reference:
            variants[name] = args.model
        elif (variant_dir / base / "model_index.json").is_file():
            variants[name] = str(variant_dir / base)
        elif base in known_recipes or _is_mix(base, known_recipes):
            folder = variant_dir / base
            raise ConfigError(
                f"--variants {name}: no quantized model at {folder}; make it with "
                f"`ditq quantize {args.model} --recipe {base} -o {folder}` or pass {name}=FOLDER"
            )
        else:
            known = ", ".join([args.reference, *known_recipes])
            raise ConfigError(
                f"--variants: unknown variant {name!r} (no folder {variant_dir / base}); "
                f"known recipes: {known}, or name=FOLDER"
            )
    if args.reference not in variants:
        raise ConfigError(f"--variants must include the reference variant {args.reference!r}")
    return variants


def _is_mix(name: str, known: list[str]) -> bool:
    """`int8+q4_k`: a per-branch mix of two recipe names (conditional + unconditional transformer)."""
    parts = name.split("+")
    return len(parts) == 2 and all(p in known for p in parts)


def build_spec(args, variants: dict[str, str]):
    from ditq.cli.generate import loras_from_args, parse_seeds, settings_from_args
    from ditq.models.execution import split_variant
    from ditq.models.loading import model_defaults, resolve_source
    from ditq.runs.generation import RunSpec

    settings = settings_from_args(args, model_defaults(resolve_source(variants[args.reference])))
    overrides = {name: split_variant(name)[1] for name in variants}
    return RunSpec(
        variants=variants,
        suite=args.suite,
        seeds=tuple(parse_seeds(args.seeds)),
        caption_modes=tuple(m.strip() for m in args.caption_modes.split(",") if m.strip()),
        settings=settings,
        reference_variant=args.reference,
        limit=args.limit,
        variant_options={name: o for name, o in overrides.items() if o},
        loras=loras_from_args(args),
        lora_strict=bool(getattr(args, "lora_strict", False)),
    )


def run(args) -> int:
    from ditq.runs.generation import distributed_env, run_generation

    variants = resolve_variants(args)
    spec = build_spec(args, variants)
    result = run_generation(args.output, spec, options=execution_from_args(args))
    rank, _, _ = distributed_env()
    if rank == 0:
        print(
            f"{args.output}: {result['generated']} generated, {result['skipped']} already done, "
            f"{result['total']} images in the run"
        )
    return 0
