"""`ditq quantize MODEL --recipe R -o DIR`: write a complete pipeline folder with both transformers quantized.

`--uncond-recipe R2` quantizes the unconditional transformer with another recipe (a per-branch mix, named R+R2).
A folder that already holds the same recipes, source and statistics is reused; any other is refused unless
`--force` is given.
"""

from __future__ import annotations

from pathlib import Path

from ditq.errors import ConfigError


def add_parser(subparsers) -> None:
    from ditq.quant.recipes import recipe_names

    names = recipe_names()
    p = subparsers.add_parser(
        "quantize", help="quantize both transformers into a pipeline folder", description=__doc__
    )
    p.add_argument("model", help="source: 'tiny', a pipeline folder (FP8 or bf16) or a hub id")
    p.add_argument("--recipe", required=True, choices=names, help="quantization recipe")
    p.add_argument(
        "--uncond-recipe", choices=names, help="another recipe for the unconditional transformer (a mix)"
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="output pipeline folder")
    p.add_argument(
        "--stats", type=Path, help="calibration statistics (ditq calibrate): SmoothQuant / GGUF imatrix"
    )
    p.add_argument(
        "--alpha", default="auto", help="int8: SmoothQuant alpha, 'auto' (per-layer search, default) or 0..1"
    )
    p.add_argument("--protect", type=int, help="int8: keep the N most fragile layers in bf16")
    p.add_argument(
        "--protect-bytes", help="int8: keep fragile layers in bf16 up to this many extra bytes (e.g. 1GB)"
    )
    p.add_argument(
        "--fragility", type=Path, help="int8: fragility table (ditq sensitivity) ranking the layers"
    )
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def recipe_from_args(name: str, args):
    """The recipe a variant name and the CLI's recipe options describe."""
    from ditq.quant.recipes import parse_recipe

    if name != "int8":
        return parse_recipe(name)
    if args.protect is not None and args.protect_bytes:
        raise ConfigError("--protect and --protect-bytes: give one budget, not both")
    budget = None
    if args.protect is not None:
        budget = str(args.protect)
    elif args.protect_bytes:
        budget = f"bytes={args.protect_bytes}"
    if args.stats is None and budget is not None and args.fragility is None:
        raise ConfigError("--protect / --protect-bytes need calibration statistics (--stats) or --fragility")
    return parse_recipe("int8", alpha=args.alpha, smoothquant=args.stats is not None, protect_budget=budget)


def run(args) -> int:
    import logging

    from ditq.quant.writer import quantize_pipeline

    recipe = recipe_from_args(args.recipe, args)
    uncond = None if args.uncond_recipe is None else recipe_from_args(args.uncond_recipe, args)
    if args.stats is None and any(getattr(r, "smoothquant", None) is False for r in (recipe, uncond) if r):
        logging.getLogger("ditq.quant").warning(
            "int8 without calibration statistics: plain W8A8, no SmoothQuant (run ditq calibrate first)"
        )
    out = quantize_pipeline(
        args.model,
        recipe,
        args.output,
        uncond_recipe=uncond,
        stats=args.stats,
        fragility=args.fragility,
        threads=args.threads,
        force=args.force,
    )
    print(out)
    return 0
