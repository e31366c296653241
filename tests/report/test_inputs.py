"""Bad run folders give errors that name the file, line or field and what was expected."""

from __future__ import annotations

import json

import pytest
from synthetic_run import write_run

from ditq.errors import DitqError
from ditq.report import RunFolderError, load_run


@pytest.fixture
def small_run(tmp_path):
    return write_run(tmp_path / "run", variants=("fp8", "int8"), n_prompts=3, seeds=(0,), images=False)


def _rewrite_scores(run, edit):
    path = run / "scores.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


def test_load_run_reads_the_layout(small_run):
    run = load_run(small_run)
    assert list(run.variants) == ["fp8", "int8"]
    assert run.variants["fp8"].bytes_on_disk["transformer"] == 9_583_465_712
    assert run.reference_variant == "fp8"
    assert run.scores.caption_modes() == ["json", "raw"]
    obs = run.scores.observations("int8", "json", "hpsv2")
    assert set(obs) == {("p00", 0), ("p01", 0), ("p02", 0)}
    assert run.metrics["lpips"].reference == "fp8" and not run.metrics["lpips"].higher_is_better
    assert run.scores.dropped_nonfinite == {}  # the inf PSNR of identical images is kept, not dropped
    assert run.scores.observations("int8", "json", "psnr")[("p00", 0)] == float("inf")
    assert run.scores.observations("int8", "raw", "psnr")[("p00", 0)] == float("inf")
    assert run.image_size == (1024, 1024)  # from run.json settings


def test_scores_with_unknown_variant(small_run):
    _rewrite_scores(small_run, lambda lines: lines + ["q2_k,p00,0,json,signage,hpsv2,0.2"])
    with pytest.raises(
        RunFolderError, match=r"scores\.csv:\d+: variant 'q2_k' is not in run\.json variants \(fp8, int8\)"
    ):
        load_run(small_run)


def test_scores_with_unknown_prompt(small_run):
    _rewrite_scores(small_run, lambda lines: lines + ["int8,p99,0,json,signage,hpsv2,0.2"])
    with pytest.raises(RunFolderError, match="prompt_id 'p99' is not in run.json prompt_ids"):
        load_run(small_run)


def test_scores_missing_columns_are_named(small_run):
    def drop(lines):
        return [",".join(f for k, f in enumerate(line.split(",")) if k not in (2, 6)) for line in lines]

    _rewrite_scores(small_run, drop)
    with pytest.raises(RunFolderError, match="missing column\\(s\\) seed, value"):
        load_run(small_run)


def test_scores_bad_value_and_seed(small_run):
    _rewrite_scores(small_run, lambda lines: lines + ["int8,p00,0,json,signage,hpsv2,high"])
    with pytest.raises(RunFolderError, match="value 'high' is not a number"):
        load_run(small_run)
    _rewrite_scores(small_run, lambda lines: lines[:-1] + ["int8,p00,zero,json,signage,hpsv2,0.1"])
    with pytest.raises(RunFolderError, match="seed 'zero' is not an integer"):
        load_run(small_run)


def test_conflicting_duplicate_score(small_run):
    _rewrite_scores(small_run, lambda lines: lines + [lines[1].rsplit(",", 1)[0] + ",12345"])
    with pytest.raises(RunFolderError, match="second, different value"):
        load_run(small_run)


def test_metric_missing_from_metrics_json(small_run):
    metrics = json.loads((small_run / "metrics.json").read_text())["metrics"]
    del metrics["clip_score"]  # and write the bare {name: entry} form, which is read too
    (small_run / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(RunFolderError, match="metrics.json: no entry for metric\\(s\\) clip_score"):
        load_run(small_run)


def test_missing_or_broken_run_json(tmp_path, small_run):
    with pytest.raises(RunFolderError, match="run.json not found"):
        load_run(tmp_path / "nowhere")
    (small_run / "run.json").write_text("{not json")
    with pytest.raises(DitqError, match="run.json: not valid JSON"):
        load_run(small_run)


def test_bad_byte_counts(small_run):
    run = json.loads((small_run / "run.json").read_text())
    run["variants"]["int8"]["resident_bytes"]["transformer"] = "9 GB"
    (small_run / "run.json").write_text(json.dumps(run))
    with pytest.raises(
        RunFolderError, match="variants.int8.resident_bytes.transformer: expected a non-negative integer"
    ):
        load_run(small_run)


def test_bare_metrics_json_and_missing_images_note(small_run):
    from synthetic_run import FAST

    from ditq.report import build_report

    data = json.loads((small_run / "metrics.json").read_text())
    (small_run / "metrics.json").write_text(json.dumps(data["metrics"]))  # the bare {name: entry} form
    assert load_run(small_run).metrics["hpsv2"].family == "preference"
    data["missing_images"] = ["images/int8/json/p00_s0.png"]
    (small_run / "metrics.json").write_text(json.dumps(data))
    md = build_report(small_run, settings=FAST).markdown.read_text()
    assert "metrics.json lists 1 image(s) missing on disk: images/int8/json/p00_s0.png." in md


def test_empty_category_reads_as_uncategorized(small_run):
    _rewrite_scores(
        small_run, lambda lines: [lines[0]] + [line.replace(",signage,", ",,") for line in lines[1:]]
    )
    run = load_run(small_run)
    assert "uncategorized" in run.scores.categories()


def test_only_nan_and_non_psnr_infinities_are_dropped(small_run):
    _rewrite_scores(
        small_run,
        lambda lines: (
            lines
            + [
                "int8,p00,1,json,signage,hpsv2,nan",
                "int8,p01,1,json,signage,clip_score,inf",
                "int8,p02,1,json,signage,psnr,inf",
            ]
        ),
    )
    run = load_run(small_run)
    assert run.scores.dropped_nonfinite == {("int8", "hpsv2"): 1, ("int8", "clip_score"): 1}
    assert run.scores.observations("int8", "json", "psnr")[("p02", 1)] == float("inf")


def test_blocked_rows_mark_images_left_out(small_run):
    flag = ("int8,p01,0,json,", "fp8,p02,0,json,")

    def edit(lines):
        return [
            line.rsplit(",", 1)[0] + ",1.0" if line.startswith(flag) and ",blocked," in line else line
            for line in lines
        ]

    _rewrite_scores(small_run, edit)
    run = load_run(small_run)
    assert run.scores.blocked == {("int8", "json", "p01", 0), ("fp8", "json", "p02", 0)}
    kept = run.scores.observations("int8", "json", "lpips", unblocked=True, reference="fp8")
    assert set(kept) == {("p00", 0)}  # p01: the image was blocked; p02: its reference image was
    assert set(run.scores.observations("int8", "json", "hpsv2", unblocked=True)) == {("p00", 0), ("p02", 0)}
    assert run.scores.blocked_count("int8", "json", "lpips", reference="fp8") == 2
