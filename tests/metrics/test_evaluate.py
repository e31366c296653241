"""`evaluate_run` and `ditq eval` on a small hand-made run folder."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from ditq.cli import main
from ditq.errors import ConfigError
from ditq.metrics import METRICS, SCORE_COLUMNS, RunFolderError, evaluate_run
from ditq.metrics.fidelity import PSNR, SSIM, psnr, ssim
from ditq.metrics.lpips import LPIPS
from ditq.metrics.preference import ClipScore
from ditq.metrics.text import OcrEditDistance, OcrExact

PROMPTS = [
    {"id": "bike", "category": "objects", "prompt": "a red bicycle", "caption": {}, "texts": []},
    {
        "id": "sale",
        "category": "text",
        "prompt": "a poster that says SALE 50%",
        "caption": {},
        "texts": ["SALE 50%"],
    },
]


class CountingPSNR(PSNR):
    name = "psnr_counted"

    def __init__(self) -> None:
        self.calls = 0

    def score(self, items):
        self.calls += len(items)
        return super().score(items)


def _poster(text: str) -> np.ndarray:
    image = Image.new("RGB", (420, 130), "white")
    ImageDraw.Draw(image).text((24, 36), text, fill="black", font=ImageFont.truetype("DejaVuSans.ttf", 44))
    return np.asarray(image)


@pytest.fixture
def run_dir(tmp_path, write_jsonl) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "run"
    base = {"bike": rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8), "sale": _poster("SALE 50%")}
    manifest = []
    for variant in ("fp8", "int8"):
        for prompt in PROMPTS:
            pixels = base[prompt["id"]]
            if variant == "int8":
                noise = rng.integers(-6, 7, size=pixels.shape)
                pixels = np.clip(pixels.astype(int) + noise, 0, 255).astype(np.uint8)
            path = f"images/{variant}/json/{prompt['id']}_s0.png"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / path)
            manifest.append(
                {
                    "variant": variant,
                    "prompt_id": prompt["id"],
                    "seed": 0,
                    "caption_mode": "json",
                    "category": prompt["category"],
                    "path": path,
                    "sha256": "",
                    "wall_s": 1.0,
                    "peak_mem_bytes": 0,
                    "device": "cpu",
                }
            )
    run = {"suite": "test", "prompt_ids": ["bike", "sale"], "seeds": [0], "caption_modes": ["json"]}
    run |= {"variants": {"fp8": {}, "int8": {}}, "reference_variant": "fp8", "ditq_version": "0.1.0"}
    (root / "run.json").write_text(json.dumps(run))
    write_jsonl(root / "prompts.jsonl", PROMPTS)
    write_jsonl(root / "manifest.jsonl", manifest)
    return root


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "scores.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == SCORE_COLUMNS
        return list(reader)


def _pixels(run_dir: Path, variant: str, prompt_id: str) -> np.ndarray:
    return np.asarray(Image.open(run_dir / f"images/{variant}/json/{prompt_id}_s0.png").convert("RGB"))


def test_evaluate_run_writes_expected_rows(run_dir, tmp_path, tiny_clip_folder):
    lpips = LPIPS(backbone=tmp_path / "absent" / "alexnet.pth", lin=tmp_path / "absent" / "alex.pth")
    metrics = [PSNR(), SSIM(), OcrExact(), OcrEditDistance(), lpips, ClipScore(model=tiny_clip_folder)]
    result = evaluate_run(run_dir, metrics, batch_size=3, progress=False)

    rows = _rows(run_dir)
    got = {(r["variant"], r["prompt_id"], r["metric"]) for r in rows}
    fidelity = {("int8", p, m) for p in ("bike", "sale") for m in ("psnr", "ssim")}
    text = {(v, "sale", m) for v in ("fp8", "int8") for m in ("ocr_exact", "ocr_ned")}
    preference = {(v, p, "clip_score") for v in ("fp8", "int8") for p in ("bike", "sale")}
    checks = {
        (v, p, "blocked") for v in ("fp8", "int8") for p in ("bike", "sale")
    }  # added to every metric set
    assert got == fidelity | text | preference | checks
    assert len(rows) == len(got)
    assert {r["seed"] for r in rows} == {"0"} and {r["caption_mode"] for r in rows} == {"json"}
    assert {r["category"] for r in rows if r["prompt_id"] == "sale"} == {"text"}

    values = {(r["variant"], r["prompt_id"], r["metric"]): float(r["value"]) for r in rows}
    a, ref = _pixels(run_dir, "int8", "bike"), _pixels(run_dir, "fp8", "bike")
    assert values["int8", "bike", "psnr"] == psnr(a, ref)
    assert values["int8", "bike", "ssim"] == pytest.approx(ssim(a, ref), abs=1e-12)
    assert values["fp8", "sale", "ocr_exact"] == 1.0 and values["fp8", "sale", "ocr_ned"] == 0.0
    assert {values[key] for key in checks} == {0.0}  # noise and a white poster are no placeholder

    info = json.loads((run_dir / "metrics.json").read_text())
    assert info["reference_variant"] == "fp8" and info["missing_images"] == []
    assert info["metrics"]["psnr"] == {
        "available": True,
        "reason": None,
        "higher_is_better": True,
        "reference": "fp8",
        "family": "fidelity",
        "model": None,
        "rows": 2,
        "without_reference": 0,
    }
    assert info["metrics"]["ocr_ned"]["higher_is_better"] is False
    assert info["metrics"]["ocr_ned"]["reference"] is None and info["metrics"]["ocr_ned"]["family"] == "text"
    assert info["metrics"]["clip_score"]["model"] == str(tiny_clip_folder)
    (weights,) = info["metrics"]["clip_score"]["weights"]  # pinned: what was loaded, with its sha256
    weight_file = tiny_clip_folder / "model.safetensors"
    assert weights["path"] == str(weight_file.resolve()) and weights["bytes"] == weight_file.stat().st_size
    assert weights["sha256"] == hashlib.sha256(weight_file.read_bytes()).hexdigest()
    assert "weights" not in info["metrics"]["psnr"]
    assert info["metrics"]["blocked"]["family"] == "check" and info["metrics"]["blocked"]["flagged"] == 0
    # An unavailable metric: a reason naming the missing file, no number anywhere.
    assert info["metrics"]["lpips"]["available"] is False
    assert "alexnet.pth" in info["metrics"]["lpips"]["reason"]
    assert info["metrics"]["lpips"]["rows"] == 0
    assert not any(r["metric"] == "lpips" for r in rows)
    assert not result.statuses["lpips"].available
    assert result.new_rows == {
        "blocked": 4,
        "psnr": 2,
        "ssim": 2,
        "ocr_exact": 2,
        "ocr_ned": 2,
        "clip_score": 4,
    }


def test_rerun_resumes_without_recomputing(run_dir):
    counted = CountingPSNR()
    evaluate_run(run_dir, [counted, SSIM()], progress=False, checks=False)
    assert counted.calls == 2
    before = (run_dir / "scores.csv").read_text()
    result = evaluate_run(run_dir, [counted, SSIM()], progress=False, checks=False)
    assert counted.calls == 2  # nothing left to score
    assert result.new_rows == {"psnr_counted": 0, "ssim": 0}
    assert (run_dir / "scores.csv").read_text() == before

    # A later run with another metric keeps the earlier rows and metrics.json entries.
    evaluate_run(run_dir, ["psnr"], progress=False, checks=False)
    rows = _rows(run_dir)
    assert sorted(r["metric"] for r in rows) == [
        "psnr",
        "psnr",
        "psnr_counted",
        "psnr_counted",
        "ssim",
        "ssim",
    ]
    assert set(json.loads((run_dir / "metrics.json").read_text())["metrics"]) == {
        "psnr",
        "psnr_counted",
        "ssim",
    }


def test_missing_images_are_reported_not_fatal(run_dir, caplog):
    (run_dir / "images/int8/json/bike_s0.png").unlink()
    (run_dir / "images/fp8/json/sale_s0.png").unlink()
    with caplog.at_level(logging.WARNING, logger="ditq.metrics"):
        result = evaluate_run(run_dir, ["psnr", "ocr_exact"], progress=False, checks=False)
    missing = ["images/fp8/json/sale_s0.png", "images/int8/json/bike_s0.png"]
    assert result.missing_images == missing
    info = json.loads((run_dir / "metrics.json").read_text())
    assert info["missing_images"] == missing
    assert info["metrics"]["psnr"]["without_reference"] == 1  # int8/sale lost its reference image
    assert "missing" in caplog.text
    rows = _rows(run_dir)
    assert {(r["variant"], r["prompt_id"], r["metric"]) for r in rows} == {("int8", "sale", "ocr_exact")}

    # Once the image is back, a rerun fills in its rows.
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(run_dir / "images/int8/json/bike_s0.png")
    result = evaluate_run(run_dir, ["psnr"], progress=False)
    assert result.new_rows == {"blocked": 3, "psnr": 1}  # the check runs on every readable image
    assert result.missing_images == ["images/fp8/json/sale_s0.png"]


def test_resolve_metrics_accepts_names_objects_and_comma_lists():
    from ditq.metrics import resolve_metrics

    psnr_metric, blocked = METRICS.get("psnr"), METRICS.get("blocked")
    assert resolve_metrics("psnr, ssim", checks=False) == [psnr_metric, METRICS.get("ssim")]
    assert resolve_metrics("psnr, ssim") == [blocked, psnr_metric, METRICS.get("ssim")]  # checks first
    assert resolve_metrics(["psnr", psnr_metric, "blocked"]) == [blocked, psnr_metric]
    assert sorted(m.name for m in resolve_metrics(None)) == METRICS.names()
    assert [m.name for m in resolve_metrics(None, checks=False)] == [
        n for n in METRICS.names() if n != "blocked"
    ]


def test_unknown_metric_lists_known_names(run_dir):
    with pytest.raises(ConfigError, match="unknown metric .nope.; known: blocked, clip_score, hpsv2, lpips"):
        evaluate_run(run_dir, ["psnr", "nope"], progress=False)
    assert not (run_dir / "scores.csv").exists()


def test_reference_variant_without_images_makes_fidelity_unavailable(run_dir):
    result = evaluate_run(run_dir, ["psnr"], reference="bf16", progress=False, checks=False)
    assert not result.statuses["psnr"].available
    assert "bf16" in result.statuses["psnr"].reason
    assert _rows(run_dir) == []


def test_bad_manifest_line_names_file_and_field(run_dir):
    with (run_dir / "manifest.jsonl").open("a") as f:
        f.write(
            json.dumps({"variant": "int8", "prompt_id": "bike", "seed": "0", "caption_mode": "json"}) + "\n"
        )
    with pytest.raises(RunFolderError, match=r"manifest.jsonl line 5: field 'seed' must be int"):
        evaluate_run(run_dir, ["psnr"], progress=False)


def test_size_mismatch_with_reference_is_an_error(run_dir):
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(run_dir / "images/int8/json/bike_s0.png")
    with pytest.raises(RunFolderError, match="bike_s0.png is 32x32 but its reference"):
        evaluate_run(run_dir, ["psnr"], progress=False)


def test_cli_eval_writes_scores_and_resumes(run_dir, capsys):
    assert main(["eval", str(run_dir), "--metrics", "psnr,ssim", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "psnr: 2 new rows" in out and "blocked: 4 new rows" in out and "scores.csv" in out
    assert len(_rows(run_dir)) == 8
    assert main(["eval", str(run_dir), "--metrics", "psnr,ssim", "--no-progress", "--no-checks"]) == 0
    out = capsys.readouterr().out
    assert "psnr: 0 new rows" in out and "blocked" not in out
    assert len(_rows(run_dir)) == 8


def test_cli_eval_unknown_metric_is_a_clean_error(run_dir, capsys):
    assert main(["eval", str(run_dir), "--metrics", "psnr,bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown metric 'bogus'" in err and "ocr_exact" in err


def test_cli_eval_list_metrics(capsys):
    assert main(["eval", "--list-metrics"]) == 0
    out = capsys.readouterr().out
    for name in METRICS:
        assert name in out


def test_every_registered_metric_keeps_the_contract():
    from ditq.metrics.base import FAMILIES, Metric, MetricStatus

    assert set(METRICS) >= {
        "psnr",
        "ssim",
        "lpips",
        "ocr_exact",
        "ocr_ned",
        "clip_score",
        "pickscore",
        "hpsv2",
    }
    for name in METRICS:
        metric = METRICS.get(name)
        assert isinstance(metric, Metric) and metric.name == name
        assert metric.family in FAMILIES and isinstance(metric.higher_is_better, bool)
        assert metric.reference in (None, "fp8")
        assert (metric.reference is not None) == (metric.family == "fidelity")
        status = metric.status()
        assert isinstance(status, MetricStatus)
        assert status.available or (isinstance(status.reason, str) and status.reason)
        json.dumps(metric.describe())
        assert metric.score([]) == []


def test_cli_eval_says_each_unavailable_reason_once_on_one_line(
    run_dir, tmp_path, monkeypatch, capsys, caplog
):
    """An unavailable metric is one printed line (stdout and stderr together, logging included), with the
    variable that makes it available."""
    import logging

    monkeypatch.setenv("DITQ_LPIPS_ALEXNET", str(tmp_path / "alexnet.pth"))
    monkeypatch.setenv("DITQ_LPIPS_LIN", str(tmp_path / "alex.pth"))
    caplog.set_level(logging.INFO, logger="ditq")  # what the CLI shows
    assert main(["eval", str(run_dir), "--metrics", "lpips,psnr", "--no-progress", "--no-checks"]) == 0
    captured = capsys.readouterr()
    printed = (captured.out + captured.err).splitlines()
    expected = (
        f"lpips: unavailable: AlexNet weights $DITQ_LPIPS_ALEXNET={tmp_path / 'alexnet.pth'}: no such file; "
        f"lin weights $DITQ_LPIPS_LIN={tmp_path / 'alex.pth'}: no such file"
    )
    assert printed.count(expected) == 1
    assert sum("alexnet.pth" in line for line in printed) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "alexnet.pth" in r.getMessage()]
    entry = json.loads((run_dir / "metrics.json").read_text())["metrics"]["lpips"]
    assert entry["reason"] == expected.removeprefix("lpips: unavailable: ")


def test_an_unreadable_earlier_metrics_json_is_rewritten_not_a_traceback(tmp_path, caplog):
    """Earlier entries are kept only when metrics.json reads as an object of objects; anything else (bytes that are
    not UTF-8, a list, an entry that is not an object) is logged, naming the file, and the scores are rewritten."""
    from ditq.metrics.evaluate import _previous_entries

    path = tmp_path / "metrics.json"
    path.write_bytes(b'{"metrics": {"psnr": {"n": 1}}, "note": "\xff"}')
    assert _previous_entries(path) == {}
    assert str(path) in caplog.text and "UTF-8" in caplog.text
    path.write_text('[{"metrics": {}}]')
    assert _previous_entries(path) == {}
    path.write_text(json.dumps({"metrics": {"psnr": {"n": 1}, "ssim": [1, 2], "clip_score": "x"}}))
    assert _previous_entries(path) == {"psnr": {"n": 1}}
