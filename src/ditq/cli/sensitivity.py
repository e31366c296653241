"""`ditq sensitivity MODEL --stats stats.safetensors -o fragility.csv`: the transformer-output error each Linear
causes when it alone is W8A8 (on the calibration probes, both transformers), ranked most fragile first. With
`--budget`, also prints the layers a protect budget keeps in bf16 (`ditq quantize --fragility`)."""

from __future__ import annotations

from pathlib import Path

from ditq.errors import ConfigError

TRANSFORMERS = ("transformer", "unconditional_transformer")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sensitivity", help="rank Linears by W8A8 fragility", description=__doc__)
    p.add_argument("model", help="the reference model: 'tiny', a pipeline folder (official FP8) or a hub id")
    p.add_argument("--stats", type=Path, required=True, help="statistics from ditq calibrate")
    p.add_argument("-o", "--output", type=Path, required=True, help="fragility table to write (.csv)")
    p.add_argument(
        "--alpha",
        default="auto",
        help="SmoothQuant alpha the layers are measured with: 'auto' (per-group search), 0..1, or 'none'",
    )
    p.add_argument(
        "--transformers",
        nargs="+",
        default=list(TRANSFORMERS),
        choices=TRANSFORMERS,
        help="which transformers to measure (default: both)",
    )
    p.add_argument("--budget", help="protect budget to apply: N, count=N, bytes=2GB or error=1e-3")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="compute dtype (default bf16)")
    p.set_defaults(func=run)


def config_from_alpha(alpha: str):
    from ditq.quant.int8.config import Int8W8A8Config, SmoothQuantConfig

    if alpha == "none":
        return Int8W8A8Config()
    if alpha == "auto":
        return SmoothQuantConfig()
    try:
        return SmoothQuantConfig(alpha=float(alpha))
    except ValueError:
        raise ConfigError(f"--alpha {alpha!r}: expected 'auto', 'none' or a number in [0, 1]") from None


def run(args) -> int:
    from ditq.cli.generate import torch_dtype
    from ditq.models.loading import load_transformer, resolve_source
    from ditq.quant.calibration import CalibrationStats
    from ditq.quant.int8.sensitivity import (
        ProtectBudget,
        choose_protected,
        measure_fragility,
        rank,
        write_csv,
    )

    config = config_from_alpha(args.alpha)
    budget = ProtectBudget.parse(args.budget) if args.budget else None
    stats = CalibrationStats.load(args.stats)
    folder = resolve_source(args.model)
    rows = []
    for name in args.transformers:
        model, _ = load_transformer(folder / name, torch_dtype(args.dtype), args.device)
        rows += measure_fragility(model, stats, name, config)
        del model
    rows = rank(rows)
    write_csv(rows, args.output)
    print(f"{args.output}: {len(rows)} layers; most fragile:")
    for r in rows[:10]:
        flag = " (always protected)" if r.default_protected else ""
        print(f"  {r.rank:3d}  {r.error:.3e}  {r.transformer}  {r.module}{flag}")
    if budget is not None:
        chosen = choose_protected(rows, budget)
        print(f"budget {args.budget}: keep in bf16")
        for tr, mods in chosen.items():
            print(f"  {tr}: {', '.join(mods)}")
    return 0
