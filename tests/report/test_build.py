"""build_report on synthetic run folders with known effects, and the `ditq report` verb."""

from __future__ import annotations

import re

import pytest
from PIL import Image
from synthetic_run import FAST, PICKSCORE_REASON, write_run

from ditq.cli import main
from ditq.errors import ConfigError
from ditq.report import build_report

SECTIONS = (
    "Run settings",
    "Variant table",
    "Headline comparisons",
    "Paired differences",
    "Blocked images",
    "Memory",
    "Quality–memory Pareto plot",
    "Per-category text rendering",
    "Raw-string vs JSON-caption ablation",
    "Image grids",
    "Methods",
)


def md_table(md: str, caption: str, after: str | None = None) -> list[dict[str, str]]:
    """Rows of the first Markdown table captioned **caption** (after heading `after`), as dicts by header."""
    start = md.index(f"## {after}") if after else 0
    lines = md[md.index(f"**{caption}**", start) :].splitlines()[2:]
    table = []
    for line in lines:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    header, body = table[0], table[2:]
    return [dict(zip(header, cells, strict=True)) for cells in body]


def test_build_report_writes_every_section(built_report):
    html = built_report.index_html.read_text()
    md = built_report.markdown.read_text()
    assert built_report.index_html.parent.name == "report"
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in html
        assert f"\n## {title}\n" in md
    assert "<style>" in html and "<script" not in html


def test_build_report_writes_pareto_plot_and_grids(built_report):
    assert built_report.pareto_png == built_report.out_dir / "pareto.png"
    with Image.open(built_report.pareto_png) as im:
        assert im.format == "PNG"
    assert 'src="pareto.png"' in built_report.index_html.read_text()
    assert len(built_report.grids) == 4
    for path in built_report.grids:
        assert path.parent == built_report.out_dir / "grids"
        with Image.open(path) as im:
            assert im.width == 96 + 5 * (256 + 8)  # a label margin, then five variants side by side
        assert f'src="grids/{path.name}"' in built_report.index_html.read_text()
    md = built_report.markdown.read_text()
    assert "p00 · signage · seed 0" in md and "p01 · poster" in md and "p02 · product" in md


def test_unavailable_metric_shows_reason_and_no_number(built_report):
    md = built_report.markdown.read_text()
    rows = md_table(md, "Means over prompts with 95% bootstrap CIs, caption mode `json`")
    assert len(rows) == 5
    for row in rows:
        assert "pickscore ↑" not in row  # no column of "unavailable" cells
        assert re.search(r"\d", row["hpsv2 ↑"])
    assert "Not shown: pickscore (unavailable, see Unavailable metrics)." in md
    assert f"| pickscore | preference | {PICKSCORE_REASON} |" in md
    assert "**pickscore" not in md  # no difference table for it


def test_variant_table_sizes_and_reference_row(built_report):
    md = built_report.markdown.read_text()
    rows = {
        r["Variant"]: r
        for r in md_table(md, "Means over prompts with 95% bootstrap CIs, caption mode `json`")
    }
    assert set(rows) == {"fp8 (fp8, reference)", "int8 (int8)", "q8_0 (gguf)", "nf4 (nf4)", "q4_k (gguf)"}
    rows = {name.split()[0]: row for name, row in rows.items()}
    assert rows["nf4"]["Disk / transformer"] == "5.22 GB"
    assert rows["fp8"]["Resident / transformer"] == "9.60 GB"
    assert rows["fp8"]["lpips ↓"] == "reference"
    estimate, low, high = map(float, re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", rows["nf4"]["lpips ↓"]).groups())
    assert low < estimate < high and estimate == pytest.approx(0.21, abs=0.02)  # nf4 was built at 0.21
    html = built_report.index_html.read_text()
    assert 'title="transformer: 5,220,000,000 bytes; unconditional_transformer: 5,220,000,000 bytes"' in html


def test_paired_differences_detect_known_effects_with_direction(built_report):
    md = built_report.markdown.read_text()
    hps = {r["Comparison"]: r for r in md_table(md, "hpsv2 ↑", after="Paired differences")}
    assert hps["nf4 − fp8"]["Differs (Holm)"] == "yes — worse"  # nf4 was built 0.03 lower
    assert hps["q4_k − nf4"]["Differs (Holm)"] == "yes — better"
    assert float(hps["nf4 − fp8"]["Δ"]) == pytest.approx(-0.03, abs=0.005)
    lpips = {r["Comparison"]: r for r in md_table(md, "lpips ↓", after="Paired differences")}
    assert "int8 − fp8" not in lpips  # fidelity is already measured against the reference
    assert float(lpips["nf4 − int8"]["Δ"]) > 0 and lpips["nf4 − int8"]["Differs (Holm)"] == "yes — worse"
    assert "the verdicts (Differs) come from Holm step-down intervals" in md
    m = int(re.search(r"this section makes (\d+) paired comparisons", md).group(1))
    assert m == 4 * 10 + 3 * 6  # hpsv2, clip, 2 text metrics: 10 pairs each; lpips, psnr, ssim: 6 pairs


def test_ablation_and_text_sections(built_report):
    md = built_report.markdown.read_text()
    abl = {r["Variant"]: r for r in md_table(md, "hpsv2 ↑", after="Raw-string vs JSON-caption ablation")}
    for variant in ("fp8", "int8", "q8_0", "nf4", "q4_k"):
        assert abl[variant]["Differs (Holm)"] == "yes — worse"  # raw captions were built 0.01 lower
        assert float(abl[variant]["Δ"]) == pytest.approx(-0.01, abs=0.003)
    text = md_table(md, "ocr_exact ↑", after="Per-category text rendering")
    assert set(text[0]) == {
        "Variant",
        "poster (4 prompts)",
        "product (4 prompts)",
        "signage (4 prompts)",
        "all",
    }
    assert len(text) == 5


def test_methods_and_settings(built_report):
    md = built_report.markdown.read_text()
    assert "The unit of analysis is the prompt" in md
    assert "from 400 resamples" in md and "seeded with 5" in md
    assert "| Resolution (w × h) | 1024 × 1024 |" in md
    assert "| Device (dtype) | cuda:0 (bfloat16) |" in md
    assert "| Seeds | 0, 1 |" in md


def test_same_seed_same_report(synthetic_run, built_report, tmp_path):
    again = build_report(synthetic_run, tmp_path / "again", settings=FAST)
    assert again.markdown.read_text() == built_report.markdown.read_text()


def test_run_without_reference_variant(tmp_path):
    run = write_run(tmp_path / "run", variants=("int8", "nf4"), n_prompts=6, seeds=(0,), images=False)
    paths = build_report(run, settings=FAST)
    md = paths.markdown.read_text()
    assert "The run has no reference variant ('fp8'): fidelity vs reference unavailable" in md
    rows = md_table(md, "Means over prompts with 95% bootstrap CIs, caption mode `json`")
    assert rows[0]["lpips ↓"] == "unavailable"
    html = paths.index_html.read_text()
    assert (
        'title="fidelity vs reference unavailable: the run has no reference variant &#x27;fp8&#x27;"' in html
    )
    assert "| nf4 − int8 |" in md
    assert "No generated images were found" in md


def test_run_without_raw_mode(tmp_path):
    run = write_run(tmp_path / "run", variants=("fp8", "int8"), modes=("json",), n_prompts=6, images=False)
    md = build_report(run, settings=FAST).markdown.read_text()
    assert "This run has no raw caption mode (caption modes: json)" in md
    assert "`caption_modes" in md


def test_empty_scores_give_a_report_that_says_so(tmp_path):
    run = write_run(tmp_path / "run", variants=("fp8", "nf4"), n_prompts=3, seeds=(0,), scores=False)
    paths = build_report(run, settings=FAST)
    md = paths.markdown.read_text()
    assert "scores.csv has no rows: run `ditq eval RUN`" in md
    assert paths.pareto_png is None
    rows = md_table(md, "Means over prompts with 95% bootstrap CIs, caption mode `json`")
    assert rows[1]["Disk / transformer"] == "5.22 GB" and rows[1]["hpsv2 ↑"] == "no scores"
    assert "No variant has both a size and a hpsv2 score" in md
    (run / "scores.csv").unlink()
    assert "no scores.csv yet" in build_report(run, settings=FAST).markdown.read_text()


def test_quality_metric_and_memory_options(synthetic_run, tmp_path):
    paths = build_report(synthetic_run, tmp_path / "r", quality_metric="lpips", memory="disk", settings=FAST)
    md = paths.markdown.read_text()
    assert "x: bytes on disk of the conditional transformer; y: lpips ↓ (lower is better)" in md
    with pytest.raises(ConfigError, match="quality metric 'fid' is not in metrics.json"):
        build_report(synthetic_run, tmp_path / "r", quality_metric="fid", settings=FAST)
    with pytest.raises(ConfigError, match="memory must be one of peak, resident, disk"):
        build_report(synthetic_run, tmp_path / "r", memory="vram", settings=FAST)


def test_cli_report_prints_where_the_report_is(synthetic_run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(["report", str(synthetic_run), "-o", str(out), "--resamples", "200", "--grid-prompts", "1"]) == 0
    )
    printed = capsys.readouterr().out
    assert f"report: {out / 'index.html'}" in printed
    assert len(list((out / "grids").glob("*.png"))) == 1


def test_cli_report_bad_input_is_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "ditq report: error:" in err and "missing: no such folder" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "ditq report: error:" in err and "run.json not found" in err and err.count("\n") == 1


def test_report_reads_what_ditq_eval_writes(tmp_path):
    # Contract with `ditq eval`: score a run with the formula metrics (no model weights needed), then report.
    from ditq.metrics.evaluate import evaluate_run

    run = write_run(
        tmp_path / "run", variants=("fp8", "int8", "nf4"), n_prompts=4, seeds=(0,), modes=("json",)
    )
    (run / "scores.csv").unlink()
    (run / "metrics.json").unlink()
    evaluate_run(run, metrics=["psnr", "ssim"], progress=False)
    md = build_report(run, settings=FAST).markdown.read_text()
    rows = {
        r["Variant"].split()[0]: r
        for r in md_table(md, "Means over prompts with 95% bootstrap CIs, caption mode `json`")
    }
    assert rows["fp8"]["psnr ↑"] == "reference"
    assert re.fullmatch(r"\S+ \[\S+, \S+\]", rows["nf4"]["ssim ↑"])
    assert "| nf4 − int8 |" in md
    assert "Only 4 prompts are scored" in md
