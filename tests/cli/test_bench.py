"""`ditq bench` end to end on the tiny model: every stage runs and the report has every section."""

from __future__ import annotations

import json

import pytest

from ditq.cli import main

SECTIONS = (
    "Data notes",
    "Unavailable metrics",
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


@pytest.mark.slow
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
        "--variant-dir",
        str(tmp_path / "variants"),
        "-o",
        str(out),
    ]
    assert main(args) == 0
    made = sorted(
        p.name for p in (tmp_path / "variants").iterdir()
    )  # --variant-dir is where bench writes them
    assert made == ["int8", "nf4", "q4_k"] and not (out / "variants").exists()
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
    assert "| int8 − fp8: clip_score | unavailable |" in md  # headline rows, named, even when unavailable
    # The report for a reader: title, each unavailable metric's one-line reason once, the tiny model said.
    assert md.startswith("# ditq benchmark · suite smoke: fp8 vs int8, nf4, q4_k (")
    reason = metrics["clip_score"]["reason"]
    assert "\n" not in reason and "$DITQ_CLIP_MODEL" in reason and md.count(reason) == 1
    assert "The reference is ditq's built-in tiny model" in md
    # Seconds per step after the warm-up, marked as meaningless on the tiny model.
    header = "s / step tiny model: checks the code path, not a speed"
    assert f"| {header} |" in md
    records = [json.loads(line) for line in (out / "run" / "manifest.jsonl").read_text().splitlines()]
    assert all(len(r["step_s"]) == 2 for r in records) and sum(r["warmup"] for r in records) == 4
    # Run settings name the hardware from run.json's host.
    host = json.loads((out / "run" / "run.json").read_text())["host"]
    assert (
        f"| Threads (torch, per process) | {host['threads']} |" in md and f"| torch | {host['torch']} |" in md
    )
    # fp8 on the Pareto plot (psnr: identical to itself), int8 larger than fp8 on the tiny model: dominated.
    pareto = md[md.index("## Quality–memory Pareto plot") : md.index("## Per-category text rendering")]
    assert "| fp8 |" in pareto and "∞ (reference)" in pareto
    # Grids: both caption modes, difference maps, the caption's text.
    assert (
        "one band per caption mode (`json`, `raw`)" in md
        and "<details><summary>JSON caption of typo-013" in md
    )
    assert "int8: json − raw, ocr_exact" in md
    assert "Non-dominated in resamples" in md and "Images identical to the reference image" in md
    assert "No image was blocked" in md and "Metric weights: no metric of this run loaded weight files" in md
    manifest = (out / "run" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 4 * 2 * 2  # variants x prompts x caption modes
    for name in ("int8", "q4_k", "nf4"):
        assert json.loads((tmp_path / "variants" / name / "ditq.json").read_text())["variant"] == name
    # a second bench over the same folder does no work again
    capsys.readouterr()
    assert main(args) == 0
    assert len((out / "run" / "manifest.jsonl").read_text().splitlines()) == 16


def test_bench_help_names_its_own_defaults(capsys):
    """bench shares run's arguments but not their defaults: its help says what it will run."""
    import pytest

    from ditq.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: fp8,int8,q4_k,nf4,int8+q4_k,svdq_w4a4)" in text and "(default: fp8)" not in text
    assert "(the ablation) (default: json,raw)" in text
