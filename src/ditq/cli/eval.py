"""`ditq eval RUN`: score a run folder's images with the metric battery (scores.csv + metrics.json)."""

from __future__ import annotations

import argparse

from ditq.errors import ConfigError

ENVIRONMENT_HELP = """\
weights are read from local files only (nothing is downloaded); what makes each metric available:
  lpips       $DITQ_LPIPS_ALEXNET: torchvision's alexnet-owt-7be5be79.pth (default: <torch hub dir>/checkpoints/,
              ~/.cache/torch/hub/checkpoints/ unless $TORCH_HOME is set; torchvision's AlexNet download URL
              https://download.pytorch.org/models/alexnet-owt-7be5be79.pth)
              $DITQ_LPIPS_LIN: lpips' weights/v0.1/alex.pth (default: found inside an installed lpips package;
              `pip install --no-deps lpips` installs it without torchvision, and ditq never imports it)
  clip_score  $DITQ_CLIP_MODEL (default: `hf download openai/clip-vit-large-patch14`)
  pickscore   $DITQ_PICKSCORE_MODEL, $DITQ_PICKSCORE_PROCESSOR
              (default: `hf download yuvalkirstain/PickScore_v1`, `hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K`)
  hpsv2       $DITQ_HPSV2_CHECKPOINT, $DITQ_HPSV2_PROCESSOR
              (default: `hf download xswu/HPSv2 HPS_v2.1_compressed.pt`, the laion ViT-H-14 processor as above)
  ocr_*       `pip install rapidocr onnxruntime` (PP-OCR models ship in the wheel)
a metric whose weights are missing is reported unavailable in metrics.json and writes no scores.
the sha256 of every weight file loaded is recorded in metrics.json and shown in the report; pin them with
  --expect-hash clip_score=SHA256 (one per file: LPIPS has two), and eval refuses any other weights.
the blocked check (the safety-filter placeholder: uniform grey + OCR) runs with every metric set, so that the
report can leave blocked images out of quality means; --no-checks skips it."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a run folder's images (fidelity vs FP8, OCR, preference)",
        description="Score every image of a run folder; resumes from an existing scores.csv.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run", nargs="?", help="run folder (run.json, prompts.jsonl, manifest.jsonl, images/)"
    )
    parser.add_argument("--metrics", help="comma-separated metric names (default: all); see --list-metrics")
    parser.add_argument("--device", default="cpu", help="torch device for model-based metrics (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per scoring batch (default: 8)")
    parser.add_argument(
        "--reference", help="variant fidelity metrics compare against (default: run.json's reference_variant)"
    )
    parser.add_argument(
        "--expect-hash",
        action="append",
        default=[],
        metavar="METRIC=SHA256",
        help="refuse to score METRIC unless its weight files have exactly these sha256 values (repeatable)",
    )
    parser.add_argument("--no-checks", action="store_true", help="do not run the blocked-image check")
    parser.add_argument(
        "--list-metrics", action="store_true", help="list the metrics and whether each can run"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _list_metrics() -> int:
    from ditq.metrics import METRICS

    for name in METRICS:
        metric = METRICS.get(name)
        status = metric.status()
        direction = "higher" if metric.higher_is_better else "lower"
        state = "available" if status.available else f"unavailable: {status.reason}"
        print(f"{name:<11} {metric.family:<10} {direction} is better  {state}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ditq.metrics import evaluate_run
    from ditq.metrics.weights import parse_expected_hashes

    if args.list_metrics:
        return _list_metrics()
    if not args.run:
        raise ConfigError("give a run folder: ditq eval RUN")
    names = None
    if args.metrics:
        names = [n.strip() for n in args.metrics.split(",") if n.strip()]
        if not names:
            raise ConfigError(f"--metrics {args.metrics!r} names no metric")
    expected = parse_expected_hashes(args.expect_hash)
    result = evaluate_run(
        args.run,
        names,
        device=args.device,
        batch_size=args.batch_size,
        reference=args.reference,
        progress=not args.no_progress,
        expect_hashes=expected,
        checks=not args.no_checks,
    )
    for name, status in result.statuses.items():
        if status.available:
            print(f"{name}: {result.new_rows.get(name, 0)} new rows")
        else:
            print(f"{name}: unavailable: {status.reason}")
    if result.missing_images:
        shown = ", ".join(result.missing_images[:5])
        more = f" and {len(result.missing_images) - 5} more" if len(result.missing_images) > 5 else ""
        print(f"missing images ({len(result.missing_images)}): {shown}{more}")
    print(f"wrote {result.scores_path} and {result.metrics_path}")
    return 0
