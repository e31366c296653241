"""`ditq quantize MODEL --recipe R -o DIR`: write a complete pipeline folder with both transformers quantized.

`--uncond-recipe R2` quantizes the unconditional transformer with another recipe (a per-branch mix, named R+R2).
`--lora PATH[:STRENGTH]` (repeatable) merges LoRAs into the bf16 weights first and quantizes the merged model: the
reference path for a LoRA (no branch at run time); ditq.json records the files, their sha256 and strengths.
A folder that already holds the same recipes, source and statistics is reused; any other is refused unless
`--force` is given.
"""

from __future__ import annotations

from pathlib import Path

from ditq.errors import ConfigError


def add_parser(subparsers) -> None:
    from ditq.names import RECIPE_NAMES

    names = list(RECIPE_NAMES)
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
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:STRENGTH]",
        help="merge a LoRA into the bf16 weights before quantizing (default strength 1.0); repeatable",
    )
    p.add_argument(
        "--lora-strict", action="store_true", help="refuse a LoRA file with keys ditq does not apply"
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

    from ditq.cli.generate import loras_from_args

    recipe = recipe_from_args(args.recipe, args)
    uncond = None if args.uncond_recipe is None else recipe_from_args(args.uncond_recipe, args)
    loras = loras_from_args(args)
    if args.stats is None and any(getattr(r, "smoothquant", None) is False for r in (recipe, uncond) if r):
        logging.getLogger("ditq.quant").warning(
            "int8 without calibration statistics: plain W8A8, no SmoothQuant (run ditq calibrate first)"
        )
    options = {"uncond_recipe": uncond, "stats": args.stats, "fragility": args.fragility}
    options.update(threads=args.threads, force=args.force)
    if loras:
        out = _quantize_merged(args, recipe, loras, options)
    else:
        from ditq.quant.writer import quantize_pipeline

        out = quantize_pipeline(args.model, recipe, args.output, **options)
    print(out)
    return 0


def _quantize_merged(args, recipe, loras, options: dict) -> Path:
    """Merge the LoRAs into a bf16 copy next to the output (removed afterwards), quantize that, and record in the
    output's ditq.json the real source and the LoRAs merged (file, sha256, strength)."""
    import shutil
    from dataclasses import replace

    from ditq.io.files import write_json_atomic
    from ditq.lora import merge_lora_folder
    from ditq.models.loading import resolve_source
    from ditq.models.record import RECORD_FILE, VariantRecord
    from ditq.quant.writer import quantize_pipeline

    out = Path(args.output)
    merged = out.parent / f".{out.name}.lora-merged"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        merge_lora_folder(args.model, list(loras), merged, strict=args.lora_strict, force=True)
        lora_record = VariantRecord.load(merged).summary["lora"]
        quantize_pipeline(str(merged), recipe, out, **options)
    finally:
        shutil.rmtree(merged, ignore_errors=True)
    record = VariantRecord.load(out)
    record = replace(
        record,
        source=args.model,
        source_folder=str(resolve_source(args.model)),
        summary={**record.summary, "lora": lora_record, "lora_merged": True},
    )
    write_json_atomic(out / RECORD_FILE, record.to_json())
    return out
