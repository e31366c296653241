"""What the report judges, checked against the synthetic run's scores.csv read independently (csv + numpy):
blocked images left out of quality means and counted, PSNR aggregated over MSE with identical images kept,
verdicts from Holm intervals, frontier shares, headline rows and pinned metric weights."""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict

import numpy as np
import pytest
from synthetic_run import BLOCKED, FAST, write_run
from test_build import md_table

from ditq.report import build_report
from ditq.stats import psnr_ceiling_db


@pytest.fixture(scope="module")
def scores(synthetic_run):
    """{(variant, mode, metric): {(prompt_id, seed): value}} straight from scores.csv."""
    out = defaultdict(dict)
    with (synthetic_run / "scores.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            key = (row["variant"], row["caption_mode"], row["metric"])
            out[key][(row["prompt_id"], int(row["seed"]))] = float(row["value"])
    return out


def blocked_keys() -> set[tuple[str, str, str, int]]:
    return {(v, mode, f"p{k:02d}", seed) for v, mode, k, seed in BLOCKED}


def _interval(text: str) -> tuple[float, float]:
    low, high = re.fullmatch(r"\[(\S+), (\S+)\]", text).groups()
    return float(low), float(high)


def _estimate(cell: str) -> float:
    return float(cell.split()[0])


def test_blocked_images_are_left_out_of_quality_means(built_report, scores):
    md = built_report.markdown.read_text()
    rows = {r["Variant"]: r for r in md_table(md, "hpsv2 ↑", after="Raw-string vs JSON-caption ablation")}
    blocked = blocked_keys()
    for variant in ("nf4", "q4_k", "fp8"):
        obs = scores[(variant, "raw", "hpsv2")]
        kept = defaultdict(list)
        for (pid, seed), value in obs.items():
            if (variant, "raw", pid, seed) not in blocked:
                kept[pid].append(value)
        expected = np.mean([np.mean(v) for v in kept.values()])
        assert _estimate(rows[variant]["raw"]) == pytest.approx(expected, rel=5e-4)  # 4 significant digits
    # Left in, the blocked images (scored 0) would pull nf4's raw mean down by about 0.02.
    everything = np.mean([np.mean([v for (p, _s), v in scores[("nf4", "raw", "hpsv2")].items() if p == pid])
                          for pid in {p for p, _ in scores[("nf4", "raw", "hpsv2")]}])  # fmt: skip
    assert _estimate(rows["nf4"]["raw"]) - everything > 0.015


def test_blocked_section_counts_and_tests_the_block_rate(built_report):
    md = built_report.markdown.read_text()
    counts = {r["Variant"]: r for r in md_table(md, "Blocked images per variant and caption mode")}
    assert counts["nf4"]["raw: blocked"] == "2 of 24" and counts["q4_k"]["raw: blocked"] == "1 of 24"
    assert counts["fp8"]["raw: blocked"] == "0 of 24" and counts["nf4"]["json: blocked"] == "0 of 24"
    # nf4 blocks one of two seeds on 2 of 12 prompts: per-prompt rates 0.5, 0.5 and ten zeros, mean 1/12.
    assert _estimate(counts["nf4"]["raw: block rate"]) == pytest.approx(1 / 12, rel=1e-3)
    diffs = {r["Comparison"]: r for r in md_table(md, "Paired differences in block rate ↓")}
    assert float(diffs["nf4 − fp8 (raw)"]["Δ"]) == pytest.approx(1 / 12, rel=1e-3)
    assert float(diffs["nf4: raw − json"]["Δ"]) == pytest.approx(1 / 12, rel=1e-3)
    # Sign-flip test: only the two prompts with a difference matter; both must keep their sign: p = 1/2.
    assert float(diffs["nf4 − fp8 (raw)"]["p"]) == pytest.approx(0.5, abs=0.05)
    assert "int8 − fp8 (json)" not in diffs  # neither side blocked anything
    assert (
        len(diffs) == 9
    )  # pairs with a blocked side: nf4 and q4_k against the 3 others, each other, raw − json
    variant_rows = md_table(md, "Means over prompts with 95% bootstrap CIs, caption mode `json`")
    assert all(r["Blocked"] == "0 of 24" for r in variant_rows)


def test_psnr_keeps_identical_images_and_averages_mse(built_report, scores):
    md = built_report.markdown.read_text()
    assert "int8 1 of 24; q8_0 0 of 24" in md  # the report says how many images were identical
    obs = scores[("int8", "json", "psnr")]
    assert obs[("p00", 0)] == math.inf
    per_prompt = {}
    for pid in {p for p, _ in obs}:
        mse = [10 ** (-obs[(pid, s)] / 10) if np.isfinite(obs[(pid, s)]) else 0.0 for s in (0, 1)]
        per_prompt[pid] = -10 * np.log10(np.mean(mse))
    # p00: one identical seed (MSE 0) and one at x dB: the prompt's PSNR is x + 10 log10(2).
    assert per_prompt["p00"] == pytest.approx(obs[("p00", 1)] + 10 * np.log10(2))
    rows = {
        r["Variant"].split()[0]: r
        for r in md_table(md, "Means over prompts with 95% bootstrap CIs, caption mode `json`")
    }
    assert _estimate(rows["int8"]["psnr ↑"]) == pytest.approx(np.mean(list(per_prompt.values())), rel=5e-4)
    assert "Data notes" not in md or "psnr" not in md.split("## Data notes")[1].split("##")[0]


def test_all_identical_prompt_gets_the_ceiling(tmp_path):
    run = write_run(
        tmp_path / "run", variants=("fp8", "int8"), modes=("json",), n_prompts=4, seeds=(0,), images=False
    )
    path = run / "scores.csv"
    lines = path.read_text().splitlines()
    lines = [re.sub(r"^(int8,p01,0,json,\w+,psnr,).*$", r"\1inf", line) for line in lines]
    path.write_text("\n".join(lines) + "\n")
    md = build_report(run, settings=FAST).markdown.read_text()
    ceiling = psnr_ceiling_db(1024, 1024)
    assert f"gets {ceiling:.4g} dB" in md and "int8 2 of 4" in md
    values = {}
    for line in lines[1:]:
        v, pid, _seed, _mode, _cat, metric, value = line.split(",")
        if v == "int8" and metric == "psnr":
            values[pid] = float(value)
    expected = np.mean([ceiling if math.isinf(x) else x for x in values.values()])
    row = md_table(md, "Means over prompts with 95% bootstrap CIs, caption mode `json`")[1]
    assert _estimate(row["psnr ↑"]) == pytest.approx(expected, rel=5e-4)


def _paired_rows(md: str) -> list[dict[str, str]]:
    rows = []
    for caption in ("clip_score ↑", "hpsv2 ↑", "lpips ↓", "psnr ↑", "ssim ↑", "ocr_exact ↑", "ocr_ned ↓"):
        rows += md_table(md, caption, after="Paired differences")
    return rows


def test_verdicts_come_from_holm_intervals(built_report):
    md = built_report.markdown.read_text()
    rows = _paired_rows(md)
    (holm,) = {k for k in rows[0] if k.startswith("Holm CI")}
    level = float(re.search(r"\(([\d.]+)%\)", holm).group(1))
    assert 99.8 < level < 99.92  # between Bonferroni's 1 - 0.05/58 and the last step's
    for row in rows:
        low, high = _interval(row[holm])
        u_low, u_high = _interval(row["95% CI"])
        assert low <= u_low and u_high <= high  # the adjusted interval holds the unadjusted one
        assert (row["Differs (Holm)"] != "no") == (low > 0 or high < 0)
    # The adjustment matters: in the headline table an unadjusted interval excludes 0 where Holm does not.
    head = {r["Comparison"]: r for r in md_table(md, "Headline comparisons")}
    nf4 = head["nf4: json − raw, ocr_exact"]
    assert nf4["95% CI includes 0"] == "no" and nf4["Differs (Holm)"] == "no"


def test_headline_rows(built_report):
    md = built_report.markdown.read_text()
    head = {r["Comparison"]: r for r in md_table(md, "Headline comparisons")}
    assert set(head) >= {
        "int8 − fp8: clip_score", "int8 − fp8: pickscore", "int8 − fp8: hpsv2",
        "q4_k − int8: lpips", "nf4 − int8: lpips", "nf4 − q4_k: lpips",
        "fp8: json − raw, ocr_exact", "nf4: json − raw, ocr_exact",
    }  # fmt: skip
    assert head["int8 − fp8: pickscore"]["Δ"] == "unavailable"  # the reason: once, under Unavailable metrics
    for label in ("int8 − fp8: clip_score", "int8 − fp8: hpsv2"):
        low, high = _interval(head[label]["95% CI"])
        assert head[label]["95% CI includes 0"] == ("yes" if low <= 0 <= high else "no")
    assert float(head["nf4 − int8: lpips"]["Δ"]) == pytest.approx(0.21 - 0.04, abs=0.02)
    lpips = {r["Variant"]: r for r in md_table(md, "LPIPS of the low-bit variants")}
    assert list(lpips) == ["int8", "q4_k", "nf4"]


def test_headline_needs_its_variants(tmp_path):
    run = write_run(
        tmp_path / "run", variants=("fp8", "q8_0"), modes=("json",), n_prompts=4, seeds=(0,), images=False
    )
    md = build_report(run, settings=FAST).markdown.read_text()
    assert "The headline comparisons need INT8 and FP8" in md and "variants fp8, q8_0" in md


def test_frontier_shares_in_the_pareto_table(built_report):
    md = built_report.markdown.read_text()
    start = md.index(
        "## Quality–memory Pareto plot"
    )  # the table has no caption: the first one of the section
    table = [line for line in md[start:].splitlines() if line.startswith("| ")][:6]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    body = [
        dict(zip(header, [c.strip() for c in line.strip("|").split("|")], strict=True)) for line in table[1:]
    ]
    rows = {r["Variant"]: r for r in body}
    assert set(rows) == {"fp8", "int8", "q8_0", "nf4", "q4_k"}
    shares = {name: float(r["Non-dominated in resamples"].rstrip("%")) / 100 for name, r in rows.items()}
    assert shares["nf4"] == 0.0  # q4_k is smaller and better on every resample
    assert shares["q4_k"] == 1.0  # the smallest variant is never dominated
    for name, r in rows.items():
        assert (shares[name] > 0) or r["On frontier"] == "no"
    assert "share of bootstrap resamples of the prompts" in md


def test_metric_weights_are_listed(built_report):
    md = built_report.markdown.read_text()
    (row,) = md_table(md, "Metric weights (pin with `ditq eval --expect-hash METRIC=SHA256`)")
    assert row == {
        "Metric": "hpsv2",
        "Weight file": "HPS_v2.1_compressed.pt",
        "sha256": f"`{'5d' * 32}`",
        "Size": "3.94 GB",
    }
    assert f"<code>{'5d' * 32}</code>" in built_report.index_html.read_text()
