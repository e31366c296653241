"""What a reader needs from the report: a real title, the hardware, seconds per step after the warm-up, each
unavailable metric named once, the reference on the Pareto plot, and image grids in both caption modes with
difference maps and the caption's text. Numbers are checked against the run folder's files read independently."""

from __future__ import annotations

import html as html_lib
import json
import re

import numpy as np
import pytest
from PIL import Image
from synthetic_run import FAST, HOST, PICKSCORE_REASON, STEP_SECONDS, write_run
from test_build import md_table

from ditq.report import build_report
from ditq.report.grids import GridBand, compose_grid

VARIANT_TABLE = "Means over prompts with 95% bootstrap CIs, caption mode `json`"


def test_title_names_suite_variants_and_date(built_report, synthetic_run):
    md = built_report.markdown.read_text()
    title = md.splitlines()[0]
    date = re.search(r"\((\d{4}-\d{2}-\d{2})\)$", title)
    assert title.startswith("# ditq benchmark · suite synthetic-v1: fp8 vs int8, q8_0, nf4, q4_k (")
    import datetime

    mtime = (synthetic_run / "manifest.jsonl").stat().st_mtime
    assert date and date.group(1) == datetime.date.fromtimestamp(mtime).isoformat()
    assert f"<title>{title[2:]}</title>" in built_report.index_html.read_text()


def test_settings_name_the_hardware_once(built_report):
    md = built_report.markdown.read_text()
    settings = md[md.index("## Run settings") :]
    assert "| Device (dtype) | cuda:0 (bfloat16) |" in settings
    assert f"| GPU | {HOST['gpu']} |" in settings
    assert f"| CPU | {HOST['cpu']} flags: avx2, avx512f, avx512_vnni |" in settings
    assert "| Threads (torch, per process) | 2 |" in settings and "| torch | 2.13.0+cu128 |" in settings
    assert "| Load average at start (1 / 5 / 15 min) | 0.42 / 0.3 / 0.25 |" in settings
    assert settings.count("cuda:0") == 1 and "| device |" not in settings and "| dtype |" not in settings


def _manifest(run):
    return [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]


def test_speed_column_is_seconds_per_step_after_warmup(built_report, synthetic_run):
    md = built_report.markdown.read_text()
    rows = {r["Variant"].split()[0]: r for r in md_table(md, VARIANT_TABLE)}
    records = _manifest(synthetic_run)
    for variant, row in rows.items():
        # Reference: every step of every non-warm-up image, the first step of each left out (numpy, float64).
        steps = [t for r in records if r["variant"] == variant and not r["warmup"] for t in r["step_s"][1:]]
        q1, median, q3 = np.percentile(np.array(steps), [25, 50, 75])
        value, low, high = re.fullmatch(r"(\S+) IQR \[(\S+), (\S+)\]", row["s / step"]).groups()
        assert float(value) == pytest.approx(median, rel=5e-4)
        assert float(low) == pytest.approx(q1, rel=5e-3) and float(high) == pytest.approx(q3, rel=5e-3)
        assert float(value) == pytest.approx(
            STEP_SECONDS[variant], rel=0.02
        )  # warm-up and first steps left out
    assert "s / step: median seconds per denoising step" in md
    assert f"Measured on {HOST['gpu']}, 2 thread(s), load average 0.42 when generation started" in md


def test_speed_falls_back_to_wall_clock_and_tiny_runs_say_so(tmp_path):
    run = write_run(tmp_path / "run", variants=("fp8", "nf4"), n_prompts=3, step_times=False, host=False,
                    tiny=True, images=False)  # fmt: skip
    md = build_report(run, settings=FAST).markdown.read_text()
    rows = {r["Variant"].split()[0]: r for r in md_table(md, VARIANT_TABLE)}
    header = next(k for k in rows["fp8"] if k.startswith("s / image"))
    assert header == "s / image tiny model: checks the code path, not a speed"
    # Without step_s and warm-up flags every image counts; the synthetic wall times are constant per variant.
    assert rows["nf4"][header] == "12.47 IQR [12.5, 12.5]"
    assert "this run's manifest has no per-step times" in md
    assert "The reference is ditq's built-in tiny model (random weights of the real classes)" in md
    assert "| Host | not recorded (run.json has no host" in md
    assert "tiny model (random weights): numbers check code paths only" in md.splitlines()[2]


def test_each_unavailable_metric_is_explained_once(built_report):
    md = built_report.markdown.read_text()
    assert md.count(PICKSCORE_REASON) == 1
    assert f"| pickscore | preference | {PICKSCORE_REASON} |" in md
    assert all("pickscore ↑" not in r for r in md_table(md, VARIANT_TABLE))
    assert "Not compared: pickscore (unavailable, see Unavailable metrics)." in md
    html = built_report.index_html.read_text()
    visible = html_lib.unescape(re.sub(r"<[^>]+>", "", html))  # the page's text: tooltips (titles) left out
    assert visible.count(PICKSCORE_REASON.replace("`", "")) == 1
    assert '<section id="unavailable"><h2>Unavailable metrics</h2>' in html


def test_reference_is_on_the_pareto_plot(synthetic_run, tmp_path):
    """LPIPS is measured against fp8, so fp8 sits at 0 exactly; it uses the most memory in this run, so it is
    non-dominated in every resample and the others keep their frontier status."""
    paths = build_report(synthetic_run, tmp_path / "r", quality_metric="lpips", settings=FAST)
    md = paths.markdown.read_text()
    table = {r["Variant"]: r for r in md_table_after(md, "Quality–memory Pareto plot")}
    assert table["fp8"]["lpips ↓"] == "0 (reference)"
    assert table["fp8"]["On frontier"] == "yes" and table["fp8"]["Non-dominated in resamples"] == "100.0%"
    assert "any variant that needs more memory than fp8 is dominated by it" in md
    with Image.open(paths.pareto_png) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.int16)
    star = (
        (abs(pixels[..., 0] - 0xC2) < 12)
        & (abs(pixels[..., 1] - 0x41) < 12)
        & (abs(pixels[..., 2] - 0x0C) < 12)
    )
    assert star.sum() > 40  # the reference's orange star is drawn


def test_reference_dominates_variants_that_need_more_memory(tmp_path):
    """PSNR's reference value is identical images (the analysis' ceiling, drawn on the top edge): a variant
    larger than the reference is dominated in every resample."""
    run = write_run(tmp_path / "run", variants=("fp8", "int8", "nf4"), n_prompts=6, seeds=(0,), images=False)
    data = json.loads((run / "run.json").read_text())
    data["variants"]["int8"]["resident_bytes"]["transformer"] = 10_000_000_000  # more than fp8's 9.60 GB
    (run / "run.json").write_text(json.dumps(data))
    md = build_report(run, quality_metric="psnr", memory="resident", settings=FAST).markdown.read_text()
    table = {r["Variant"]: r for r in md_table_after(md, "Quality–memory Pareto plot")}
    assert table["fp8"]["psnr ↑"] == "∞ (reference)" and table["fp8"]["On frontier"] == "yes"
    assert table["int8"]["On frontier"] == "no" and table["int8"]["Non-dominated in resamples"] == "0.0%"
    assert table["nf4"]["On frontier"] == "yes"


def md_table_after(md: str, heading: str) -> list[dict[str, str]]:
    """The first table after a section heading (tables without a caption)."""
    lines = md[md.index(f"## {heading}") :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Variant"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return [dict(zip(table[0], cells, strict=True)) for cells in table[2:]]


def test_grids_show_both_modes_with_difference_maps_and_caption_text(built_report, synthetic_run):
    md = built_report.markdown.read_text()
    grid = built_report.grids[0]
    with Image.open(grid) as im:
        # label row, then per caption mode an image row and a difference row (256 + 8, 256 + 20 + 8)
        assert im.size == (96 + 5 * (256 + 8), 28 + 2 * (256 + 8 + 256 + 20 + 8))
    prompts = {json.loads(line)["id"]: json.loads(line) for line in (synthetic_run / "prompts.jsonl").open()}
    record = prompts["p00"]
    assert f"p00 · signage · seed 0 — raw prompt: “{record['prompt']}”; text to render: “OPEN P00”" in md
    assert '<details><summary>JSON caption of p00</summary>\n\n```json\n{\n  "high_level_description"' in md
    html = built_report.index_html.read_text()
    assert "<details><summary>JSON caption of p00</summary><pre>{" in html
    assert "one band per caption mode (`json`, `raw`)" in md


def test_compose_grid_enlarges_by_nearest_neighbour_and_maps_differences(tmp_path):
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    other = ref.copy()
    other[4:8, 2:10] = np.clip(other[4:8, 2:10].astype(int) + 40, 0, 255).astype(np.uint8)
    paths = []
    for name, pixels in (("ref", ref), ("same", ref), ("other", other)):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(pixels).save(paths[-1])
    result = compose_grid(["ref", "same", "other"], [GridBand("JSON caption", paths)], tmp_path / "g.png",
                          tile_size=64)  # fmt: skip
    with Image.open(result.path) as im:
        canvas = np.asarray(im.convert("RGB"))
    x0, y0 = 96, 28  # first tile: the reference image, enlarged 4x by pixel repetition
    assert np.array_equal(
        canvas[y0 : y0 + 64, x0 : x0 + 64], np.kron(ref, np.ones((4, 4, 1), dtype=np.uint8))
    )
    # The difference maps sit under the images: "same" is black (identical), "other" the mean |Δ| in magma.
    from matplotlib import colormaps

    diff = np.abs(other.astype(np.float64) - ref.astype(np.float64)).mean(axis=2)
    assert result.scale == 8 * np.ceil(np.percentile(diff, 99) / 8)
    lut = (colormaps["magma"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    expected = lut[np.clip(np.rint(diff / result.scale * 255), 0, 255).astype(int)]
    dy = y0 + 64 + 8
    same = canvas[dy : dy + 64, x0 + 72 : x0 + 72 + 64]
    assert np.array_equal(same, np.broadcast_to(lut[0], same.shape))
    got = canvas[dy : dy + 64, x0 + 144 : x0 + 144 + 64]
    assert np.array_equal(got, np.kron(expected, np.ones((4, 4, 1), dtype=np.uint8)))
    assert result.mean_difference[(0, 2)] == pytest.approx(diff.mean())


def test_text_section_says_why_a_category_has_no_interval(tmp_path):
    run = write_run(tmp_path / "run", variants=("fp8", "int8"), n_prompts=4, seeds=(0,), images=False)
    md = build_report(run, settings=FAST).markdown.read_text()
    text = md_table(md, "ocr_exact ↑", after="Per-category text rendering")
    assert set(text[0]) == {
        "Variant",
        "poster (1 prompt)",
        "product (1 prompt)",
        "signage (2 prompts)",
        "all",
    }
    assert text[0]["poster (1 prompt)"].endswith("(n=1, no CI)")
    assert re.fullmatch(r"\S+ \[\S+, \S+\]", text[0]["all"])  # 4 prompts pooled: an interval
    assert "No interval for poster, product: suite synthetic-v1 has one prompt with text in each" in md
