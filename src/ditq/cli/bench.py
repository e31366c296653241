"""`ditq bench`: quantize the model into each variant (skipping what exists), run, evaluate and report.

On the built-in tiny model this runs end to end on a CPU in minutes; with the real model:
`ditq bench --model ideogram-ai/ideogram-4-fp8 --device cuda --suite full --seeds 0,1`.
Layout of the output folder: `calibration.safetensors`, `variants/<name>/` (quantized pipelines), `run/` (images,
manifest, scores, report).
"""

from __future__ import annotations

from pathlib import Path

from ditq.cli.run import add_run_args, build_spec


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="quantize -> run -> eval -> report, end to end", description=__doc__
    )
    add_run_args(p)
    defaults = {"variants": "fp8,int8,q4_k,nf4,int8+q4_k,svdq_w4a4", "caption_modes": "json,raw"}
    p.set_defaults(**defaults, steps=None)
    for action in p._actions:
        if action.dest == "variant_dir":
            action.help = (
                "where bench writes the quantized variants, and reuses those whose recipe, options, "
            )
            action.help += "source and statistics match (default: OUTPUT/variants)"
    for action in p._actions:  # the shared run arguments' help names run's defaults: name bench's
        if action.dest in defaults and action.help:
            action.help = action.help.split(" (default")[0] + f" (default: {defaults[action.dest]})"
    p.add_argument("--metrics", help="comma-separated metrics (default: all registered)")
    p.add_argument(
        "--calibration-samples", type=int, default=4, help="captions used to calibrate int8 (default 4)"
    )
    p.add_argument("--alpha", default="auto", help="SmoothQuant alpha (int8, W4A4): auto (default) or 0..1")
    p.add_argument(
        "-o", "--output", type=Path, default=Path("bench-out"), help="output folder (default bench-out)"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ditq.bench import run_bench
    from ditq.cli.generate import execution_from_args

    variant_names = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.variant_dir = args.variant_dir or args.output / "variants"  # where bench writes (and reuses) them
    paths = run_bench(
        args,
        variant_names,
        build_spec=build_spec,
        on_step=lambda msg: print(f"[bench] {msg}", flush=True),
        options=execution_from_args(args),
    )
    print(f"report: {paths.index_html}")
    print(f"        {paths.markdown}")
    return 0
