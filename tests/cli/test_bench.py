"""`ditq bench` end to end on the tiny model: every stage runs and the report has every section."""

from __future__ import annotations

import json

from ditq.cli import main

SECTIONS = (
    "Variant table",
    "Headline comparisons",
    "Paired differences",
    "Blocked images",
    "Quality–memory Pareto plot",
    "Per-category text rendering",
    "Raw-string vs JSON-caption ablation",
    "Image grids",
    "Run settings",
    "Methods",
)


def test_bench_tiny_end_to_end(tiny_fp8_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    args = [
        "bench",
        "--model",
        str(tiny_fp8_dir),
        "--variants",
        "fp8,int8,q4_k,nf4",
        "--limit",
        "2",
        "--steps",
        "2",
        "--calibration-samples",
        "2",
        "--metrics",
        "psnr,ssim,ocr_exact,ocr_ned,clip_score",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    html = (out / "run" / "report" / "index.html").read_text()
    for title in SECTIONS:
        assert title in html, title
    assert (out / "run" / "report" / "pareto.png").stat().st_size > 1000
    metrics = json.loads((out / "run" / "metrics.json").read_text())["metrics"]
    assert metrics["clip_score"]["available"] is False and metrics["clip_score"]["reason"]
    assert metrics["psnr"]["available"] is True
    # The blocked check ran on every image (the tiny model's noise is never the placeholder).
    assert metrics["blocked"]["rows"] == 16 and metrics["blocked"]["flagged"] == 0
    md = (out / "run" / "report" / "report.md").read_text()
    assert "| int8 − fp8: clip_score | unavailable:" in md  # headline rows, named, even when unavailable
    assert "int8: json − raw, ocr_exact" in md
    assert "Non-dominated in resamples" in md and "Images identical to the reference image" in md
    assert "No image was blocked" in md and "Metric weights: no metric of this run loaded weight files" in md
    manifest = (out / "run" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 4 * 2 * 2  # variants x prompts x caption modes
    for name in ("int8", "q4_k", "nf4"):
        assert json.loads((out / "variants" / name / "ditq.json").read_text())["variant"] == name
    # a second bench over the same folder does no work again
    capsys.readouterr()
    assert main(args) == 0
    assert len((out / "run" / "manifest.jsonl").read_text().splitlines()) == 16
