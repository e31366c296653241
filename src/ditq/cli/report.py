"""`ditq report RUN`: write the benchmark report (index.html, report.md, pareto.png, grids/) of a scored run."""

from __future__ import annotations

import argparse

from ditq.names import BOOTSTRAP_RESAMPLES as DEFAULT_RESAMPLES
from ditq.names import BOOTSTRAP_SEED as DEFAULT_SEED


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="write the HTML/Markdown benchmark report of a run folder",
        description="Write RUN/report/index.html and report.md: data notes, the unavailable metrics (each once, "
        "with what makes it available), variant table with bootstrap CIs and seconds per denoising step after "
        "the warm-up, headline comparisons, paired differences (verdicts from Holm step-down intervals), "
        "blocked images and block rates, memory (peak device memory per image, measured or planned, the whole "
        "pipeline on disk, which variants fit a 24 GiB card), quality-memory Pareto plot with the reference and "
        "each variant's "
        "share of resamples on the frontier, per-category text rendering, caption ablation, image grids "
        "(every caption mode, difference maps against the reference, the caption text), run settings with "
        "the hardware and the metric weights' sha256, and methods.",
    )
    p.add_argument("run", metavar="RUN", help="run folder written by `ditq run` and scored by `ditq eval`")
    p.add_argument("-o", "--out", metavar="DIR", default=None, help="output folder (default: RUN/report)")
    p.add_argument(
        "--force", action="store_true", help="write into an existing -o folder that is not a ditq report folder"
    )
    p.add_argument(
        "--quality-metric",
        metavar="NAME",
        default=None,
        help="metric on the Pareto plot's y axis (default: first available of HPSv2, PickScore, CLIP score, "
        "LPIPS, PSNR)",
    )
    p.add_argument(
        "--memory",
        choices=("peak", "resident", "disk"),
        default="peak",
        help="Pareto x axis: peak device memory of generating one image (measured on CUDA, else planned by "
        "ditq plan; default), or resident memory or bytes on disk per transformer",
    )
    p.add_argument(
        "--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples (default 10000)"
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed, recorded in the report")
    p.add_argument("--grid-prompts", type=int, default=4, help="prompts shown as image grids (default 4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ditq.report import StatsSettings, build_report

    settings = StatsSettings(n_resamples=args.resamples, seed=args.seed)
    paths = build_report(
        args.run,
        args.out,
        quality_metric=args.quality_metric,
        memory=args.memory,
        settings=settings,
        grid_prompts=args.grid_prompts,
    )
    print(f"report: {paths.index_html}")
    print(f"markdown: {paths.markdown}")
    if paths.pareto_png is None:
        print("pareto plot: none (see the report's Pareto section)")
    return 0
