"""`ditq quantize MODEL --recipe R -o DIR`: write a complete pipeline folder with both transformers quantized."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    from ditq.quant.recipes import RECIPES

    p = subparsers.add_parser(
        "quantize", help="quantize both transformers into a pipeline folder", description=__doc__
    )
    p.add_argument("model", help="source: 'tiny', a pipeline folder (FP8 or bf16) or a hub id")
    p.add_argument("--recipe", required=True, choices=RECIPES.names(), help="quantization recipe")
    p.add_argument("-o", "--output", type=Path, required=True, help="output pipeline folder")
    p.add_argument(
        "--stats", type=Path, help="calibration statistics (ditq calibrate): SmoothQuant / GGUF imatrix"
    )
    p.add_argument(
        "--alpha", default="auto", help="int8: SmoothQuant alpha, 'auto' (per-layer search) or 0..1"
    )
    p.add_argument("--protect", type=int, help="int8: keep the N most fragile layers in bf16")
    p.add_argument(
        "--protect-bytes", help="int8: keep fragile layers in bf16 up to this many extra bytes (e.g. 1GB)"
    )
    p.add_argument(
        "--fragility", type=Path, help="int8: fragility table (ditq sensitivity) ranking the layers"
    )
    p.add_argument("--threads", type=int, help="encoder threads (GGUF)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from ditq.quant.recipes import quantize_pipeline

    options: dict = {"threads": args.threads, "alpha": args.alpha}
    if args.protect is not None:
        options["protect"] = args.protect
    if args.protect_bytes:
        options["protect_bytes"] = args.protect_bytes
    if args.fragility:
        options["fragility"] = str(args.fragility)
    if args.stats:
        from ditq.quant.int8.calibrate import CalibrationStats

        options["stats_path"] = str(args.stats)
        options["stats"] = CalibrationStats.load(args.stats)
    from ditq.quant.recipes import protect_layers

    options["protect_layers"] = protect_layers(
        str(args.fragility) if args.fragility else None,
        args.protect,
        args.protect_bytes,
        source=args.model,
        stats=options.get("stats"),
    )
    out = quantize_pipeline(args.model, args.output, args.recipe, options, force=args.force)
    print(out)
    return 0
