"""`ditq inspect MODEL`: parameters and bytes per component and format, predicted from shapes and read from files."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="parameter counts and bytes per format (full, tiny, a folder or hub id)",
        description="Per component: parameter count, predicted bytes for bf16/FP8/INT8/GGUF/NF4 from the shapes, "
        "and, for a folder, the real bytes of each weight file.",
    )
    p.add_argument("model", help="'full' (meta-device full size), 'tiny', a pipeline folder or a hub id")
    p.add_argument("--load", action="store_true", help="also load the pipeline and report resident bytes")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from ditq.models.sizes import human_bytes
    from ditq.quant.inspect import inspect_model
    from ditq.quant.sizes import TABLE

    report = inspect_model(args.model, load=args.load)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    comps = report["components"]
    title = f"ditq inspect {args.model}" + (
        f" (stored as {report['format']})" if report.get("format") else ""
    )
    table = Table(title=title)
    table.add_column("")
    for comp in comps:
        table.add_column(comp.replace("unconditional_", "uncond_"), justify="right")
    table.add_row("parameters", *[f"{row['parameters']:,}" for row in comps.values()])
    for fmt in TABLE:
        table.add_row(fmt, *[human_bytes(row["bytes"][fmt]) for row in comps.values()])
    console.print(table)
    files = [(c, r) for c, r in report["components"].items() if r.get("files")]
    if files:
        ft = Table(title="on disk")
        for col in ("component", "file", "bytes", "predicted", "resident"):
            ft.add_column(col, justify="right" if col != "file" and col != "component" else "left")
        for comp, row in files:
            for name, size in row["files"].items():
                resident = row.get("resident_bytes")
                ft.add_row(
                    comp,
                    name,
                    f"{size:,}",
                    human_bytes(row["predicted_bytes"]) if row.get("predicted_bytes") else "",
                    human_bytes(resident) if resident else "",
                )
        console.print(ft)
    return 0
