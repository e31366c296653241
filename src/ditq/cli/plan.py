"""`ditq plan MODEL`: the device memory of a generation per variant, offload policy and stage; which policies fit
a card, and the one `--offload auto` picks."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    from ditq.names import CARDS
    from ditq.names import PLAN_VARIANTS as DEFAULT_VARIANTS

    p = subparsers.add_parser(
        "plan",
        help="device memory per variant, offload policy and stage; which policies fit a card",
        description="For every offload policy, per stage (encode, denoising step, decode): the weights on the "
        "device, the activation peak, their total and the bytes moved per step; then the fastest policy that "
        "fits. --simulate checks the plan with one full-size step on fake tensors.",
    )
    p.add_argument("model", help="'full' (the full-size configs), 'tiny', or a pipeline folder")
    p.add_argument(
        "--variants",
        help=f"comma-separated variants, mixes as cond+uncond (default: {','.join(DEFAULT_VARIANTS)}; "
        "a folder ditq wrote: what it holds)",
    )
    p.add_argument("--height", type=int, default=1024, help="image height (default 1024)")
    p.add_argument("--width", type=int, default=1024, help="image width (default 1024)")
    p.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    p.add_argument(
        "--text-tokens", type=int, default=2048, help="text length the prompt is padded to (default 2048)"
    )
    p.add_argument(
        "--vram",
        default="24GiB",
        help=f"card memory: a size like 24GiB, or {', '.join(CARDS)} (default 24GiB)",
    )
    p.add_argument("--simulate", action="store_true", help="check with one full step on fake tensors (slow)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def run(args) -> int:
    from ditq.quant.plan import parse_vram, plan_model

    variants = None if args.variants is None else [v.strip() for v in args.variants.split(",") if v.strip()]

    def plan(progress=None) -> dict:
        return plan_model(
            args.model,
            variants,
            args.height,
            args.width,
            parse_vram(args.vram),
            batch=args.batch,
            text_tokens=args.text_tokens,
            simulate=args.simulate,
            progress=progress,
        )

    if args.json:
        print(json.dumps(plan(), indent=2))
        return 0
    from rich.console import Console

    console = Console()
    with console.status("planning") as status:
        report = plan(status.update)
    _print(console, report)
    return 0


def _gib(n: int | None) -> str:
    from ditq.models.sizes import human_bytes

    return "-" if n is None else human_bytes(n)


def _print(console, report: dict) -> None:
    from rich.table import Table

    title = (
        f"ditq plan {report['model']}: {report['height']}x{report['width']}, batch {report['batch']}, text "
        f"{report['text_tokens']} tokens, card {_gib(report['vram_bytes'])} "
        f"({_gib(report['usable_bytes'])} usable)"
    )
    table = Table(title=title)
    for col in (
        "variant",
        "policy",
        "fits",
        "peak",
        "simulated",
        "moved/step",
        "weights",
        "encode",
        "step",
        "decode",
    ):
        table.add_column(col, justify="left" if col in ("variant", "policy") else "right")
    for name, v in report["variants"].items():
        acts = v["activations"]
        table.add_row(
            name,
            v["policy"],
            "yes" if v["fits"] else "NO",
            _gib(v["peak_bytes"]),
            _gib(v["simulated_peak_bytes"]),
            _gib(v["transfer_bytes_per_step"]),
            _gib(sum(v["components"].values())),
            _gib(acts["encode"]),
            _gib(acts["denoise"]),
            _gib(acts["decode"]),
        )
    console.print(table)
    detail = Table(title="peak per policy (moved per step)")
    detail.add_column("variant")
    policies = list(next(iter(report["variants"].values()))["policies"]) if report["variants"] else []
    for p in policies:
        detail.add_column(p, justify="right")
    for name, v in report["variants"].items():
        cells = []
        for p in policies:
            pp = v["policies"][p]
            mark = "" if pp["fits"] else " ✗"
            cells.append(f"{_gib(pp['peak_bytes'])}{mark} ({_gib(pp['transfer_bytes_per_step'])})")
        detail.add_row(name, *cells)
    console.print(detail)
