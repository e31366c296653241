"""The report's memory: the Pareto axis is the peak device memory of a generation, measured on CUDA where the
manifest has it and planned by `ditq plan` otherwise (never the host process's resident set), labelled which; the
whole pipeline on disk; the 24 GiB fit; and unknowns with their reason where the folder is gone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from synthetic_run import FAST, HOST, write_run

from ditq.cli import main
from ditq.report import build_report, load_run, pareto_frontier
from ditq.report.analysis import Analysis
from ditq.report.formatting import size_text
from ditq.report.memory import variant_memories

RSS = 987_654_321_000  # a process_rss value no device peak could be: the report must never show it
WEIGHTS = (".safetensors", ".gguf", ".bin")


def _manifest(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines() if line.strip()]


def _write_manifest(run: Path, records: list[dict]) -> None:
    (run / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _table_after(md: str, heading: str) -> dict[str, dict[str, str]]:
    """The first Markdown table after `## heading`, as {first cell: {header: cell}}."""
    lines = md[md.index(f"## {heading}\n") :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Variant"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    return {cells[0]: dict(zip(table[0], cells, strict=True)) for cells in table[2:]}


def _pareto_rows(md: str) -> dict[str, dict[str, str]]:
    return _table_after(md, "Quality–memory Pareto plot")


def _memory_rows(md: str) -> dict[str, dict[str, str]]:
    return _table_after(md, "Memory")


@pytest.fixture
def cuda_run(tmp_path) -> Path:
    """The synthetic run (CUDA records) where q4_k ran its images with a peak above every other variant's, some
    of them resumed on the host (process_rss, larger still)."""
    run = write_run(tmp_path / "run", n_prompts=6, images=False)
    records = _manifest(run)
    for i, r in enumerate(records):
        if r["variant"] == "q4_k":
            r["peak_mem_bytes"] = 31_000_000_000 + i
            if i % 3 == 0:
                r.update(peak_mem_kind="process_rss", peak_mem_bytes=RSS, device="cpu")
    _write_manifest(run, records)
    return run


def test_the_axis_is_the_largest_measured_cuda_peak(cuda_run):
    records = _manifest(cuda_run)
    expected = {}
    for r in records:
        if r["peak_mem_kind"] == "cuda_allocated":
            expected[r["variant"]] = max(expected.get(r["variant"], 0), r["peak_mem_bytes"])
    memories = variant_memories(load_run(cuda_run))
    assert {n: m.peak.bytes for n, m in memories.items()} == expected
    assert all(m.peak.source == "measured" for m in memories.values())
    assert memories["fp8"].peak.label == f"measured on {HOST['gpu']}"
    assert "offload none" in memories["fp8"].peak.detail

    paths = build_report(cuda_run, settings=FAST)
    md, html = paths.markdown.read_text(), paths.index_html.read_text()
    rows = _pareto_rows(md)
    for name, n in expected.items():
        assert rows[name]["Peak device memory per image"] == size_text(n)
        assert rows[name]["Source"] == f"measured on {HOST['gpu']}"
    assert f"measured on {HOST['gpu']}" in html and size_text(RSS) not in md + html
    assert "x: peak device memory of generating one image" in md


def test_the_frontier_is_pareto_py_over_the_chosen_axis(cuda_run):
    """q4_k is the smallest transformer but has the largest peak: on the resident frontier, off the peak one."""
    run = load_run(cuda_run)
    analysis = Analysis(run, FAST)
    names = list(run.variants)
    quality = [analysis.mean(n, "hpsv2", analysis.main_mode).estimate for n in names]
    peaks = [m.peak.bytes for m in variant_memories(run).values()]
    resident = [run.variants[n].resident_bytes["transformer"] for n in names]
    for memory, xs in (("peak", peaks), ("resident", resident)):
        md = build_report(cuda_run, memory=memory, settings=FAST).markdown.read_text()
        rows = _pareto_rows(md)
        front = pareto_frontier(xs, quality)
        assert [rows[n]["On frontier"] for n in names] == ["yes" if f else "no" for f in front]
    assert not pareto_frontier(peaks, quality)[names.index("q4_k")]
    assert pareto_frontier(resident, quality)[names.index("q4_k")]


@pytest.fixture(scope="module")
def nf4_dir(tiny_fp8_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nf4") / "tiny-nf4"
    assert main(["quantize", str(tiny_fp8_dir), "--recipe", "nf4", "-o", str(out)]) == 0
    return out


def _host_run(root: Path, folders: dict[str, Path | str], offload: dict[str, str]) -> Path:
    """A run of the tiny pipelines on the host: every record's peak is the process's resident set."""
    run = write_run(root, variants=tuple(folders), n_prompts=4, seeds=(0,), images=False)
    data = json.loads((run / "run.json").read_text())
    data["settings"].update(height=64, width=64, max_sequence_length=2048)
    data.pop("host")
    for name, folder in folders.items():
        spec = data["variants"][name]
        spec.update(model=str(folder), folder=str(folder), offload=offload[name])
        if Path(folder).is_dir():
            sizes = {c: sum(f.stat().st_size for f in (Path(folder) / c).glob("*.safetensors"))
                     for c in ("transformer", "unconditional_transformer", "text_encoder", "vae")}  # fmt: skip
            spec["bytes_on_disk"] = sizes
    (run / "run.json").write_text(json.dumps(data))
    records = _manifest(run)
    for r in records:
        r.update(peak_mem_kind="process_rss", peak_mem_bytes=RSS, device="cpu", offload=offload[r["variant"]])
    _write_manifest(run, records)
    return run


def test_without_cuda_records_the_planner_gives_the_axis(tiny_fp8_dir, nf4_dir, tmp_path):
    """The planner of each folder at the run's 64×64 and the tiny model's 512 text tokens: a run's `none` has no
    text encoder on the device (it encodes first), so it is the planner's `encoder`; `group` is itself."""
    from ditq.quant.plan import parse_vram, plan_model

    folders = {"fp8": tiny_fp8_dir, "nf4": nf4_dir}
    offload = {"fp8": "none", "nf4": "group"}
    run = _host_run(tmp_path / "run", folders, offload)
    memories = variant_memories(load_run(run))
    for name, folder in folders.items():
        (row,) = plan_model(str(folder), None, 64, 64, parse_vram("24GiB"), text_tokens=512)[
            "variants"
        ].values()
        stages = row["policies"]["encoder" if offload[name] == "none" else offload[name]]["stages"]
        mem = memories[name]
        assert mem.peak.source == "planned" and mem.peak.label == "planned"
        assert mem.peak.bytes == max(stages["denoise"]["total"], stages["decode"]["total"])
        assert mem.fit.fits is row["fits"] is True  # the tiny model fits anything
        assert mem.fit.policy == row["policy"]
        assert mem.fit.transfer_bytes_per_step == row["transfer_bytes_per_step"]
        assert mem.fit.peak_bytes == row["peak_bytes"]
        expected_disk = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.suffix in WEIGHTS)
        assert mem.disk_bytes == expected_disk  # run.json's four components and the prompt-enhancer head
    # the text encoder is not on the device in a run's denoising: less than the planner's whole-pipeline none
    (row,) = plan_model(str(tiny_fp8_dir), None, 64, 64, parse_vram("24GiB"), text_tokens=512)[
        "variants"
    ].values()
    assert memories["fp8"].peak.bytes < row["policies"]["none"]["stages"]["denoise"]["total"]

    paths = build_report(run, settings=FAST)
    md, html = paths.markdown.read_text(), paths.index_html.read_text()
    pareto, table = _pareto_rows(md), _memory_rows(md)
    for name, mem in memories.items():
        assert pareto[name]["Peak device memory per image"] == size_text(mem.peak.bytes)
        assert pareto[name]["Source"] == "planned"
        assert table[name]["Source"] == "planned"
        assert table[name]["Fits a 24 GiB card"] == "yes"
        assert table[name]["Policy at 24 GiB"] == mem.fit.policy
        assert table[name]["Moved per step"] == size_text(mem.fit.transfer_bytes_per_step)
        assert table[name]["On disk, whole pipeline"] == size_text(mem.disk_bytes)
    assert "Planned: `ditq plan` of the variant's folder" in md and ">planned<" in html
    assert size_text(RSS) not in md + html


def test_a_missing_folder_is_unknown_with_its_reason(tiny_fp8_dir, tmp_path):
    gone = tmp_path / "moved-away"
    folders = {"fp8": tiny_fp8_dir, "int8": tiny_fp8_dir, "nf4": gone}
    run = _host_run(tmp_path / "run", folders, dict.fromkeys(folders, "none"))
    memories = variant_memories(load_run(run))
    nf4 = memories["nf4"]
    assert nf4.peak.bytes is None and nf4.peak.source == "unknown" and nf4.fit.fits is None
    assert f"no pipeline folder at {gone}" in nf4.peak.detail and "process_rss" in nf4.peak.detail
    assert nf4.disk_bytes == 2 * 5_220_000_000  # what run.json records (the two transformers)
    md = build_report(run, settings=FAST).markdown.read_text()
    table = _memory_rows(md)
    assert table["nf4"]["Peak device memory / image"] == "unknown"
    assert table["nf4"]["Fits a 24 GiB card"] == "unknown" and table["fp8"]["Fits a 24 GiB card"] == "yes"
    assert "Unknown: nf4, peak: its 8 image record(s) hold process_rss" in md
    assert "Not plotted: nf4 (peak device memory unknown:" in md
    assert "nf4, fit:" not in md  # the same reason, said once
    assert set(_pareto_rows(md)) == {"fp8", "int8"}


def test_a_folder_the_planner_cannot_read_is_unknown(tiny_fp8_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_fp8_dir, broken)
    (broken / "transformer" / "config.json").write_text("{ not json")
    run = _host_run(tmp_path / "run", {"fp8": tiny_fp8_dir, "int8": broken}, {"fp8": "none", "int8": "none"})
    memories = variant_memories(load_run(run))
    assert memories["int8"].peak.bytes is None
    detail = memories["int8"].peak.detail
    assert f"no plan of {broken}" in detail and "config.json: not valid JSON" in detail
    md = build_report(run, settings=FAST).markdown.read_text()
    assert "Unknown: int8, peak:" in md and _memory_rows(md)["fp8"]["Source"] == "planned"


def test_cli_memory_option(cuda_run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["report", str(cuda_run), "-o", str(out), "--memory", "disk", "--resamples", "200"]) == 0
    md = (out / "report.md").read_text()
    assert "x: bytes on disk of the conditional transformer" in md
    assert _pareto_rows(md)["nf4"]["Bytes on disk per transformer"] == "5.22 GB"


def test_sources_mix_per_variant_and_name_cuda_without_a_gpu_name(tiny_fp8_dir, tmp_path):
    """int8's images ran on CUDA (no GPU name in run.json: "measured on CUDA"), fp8's on the host (planned)."""
    folders = {"fp8": tiny_fp8_dir, "int8": tiny_fp8_dir}
    run = _host_run(tmp_path / "run", folders, dict.fromkeys(folders, "none"))
    records = _manifest(run)
    for i, r in enumerate(records):
        if r["variant"] == "int8":
            r.update(peak_mem_kind="cuda_allocated", peak_mem_bytes=40_000_000 + i, device="cuda:0")
    _write_manifest(run, records)
    memories = variant_memories(load_run(run))
    assert memories["int8"].peak.label == "measured on CUDA" and memories["fp8"].peak.label == "planned"
    assert memories["int8"].peak.bytes == max(r["peak_mem_bytes"] for r in records if r["variant"] == "int8")
    md = build_report(run, settings=FAST).markdown.read_text()
    rows = _pareto_rows(md)
    assert rows["int8"]["Source"] == "measured on CUDA" and rows["fp8"]["Source"] == "planned"
    assert "Measured: the largest `torch.cuda.max_memory_allocated`" in md and "Planned: `ditq plan`" in md


def test_a_policy_the_planner_does_not_know_is_unknown(tiny_fp8_dir, tmp_path):
    run = _host_run(
        tmp_path / "run", {"fp8": tiny_fp8_dir, "int8": tiny_fp8_dir}, {"fp8": "none", "int8": "turbo"}
    )
    memories = variant_memories(load_run(run))
    assert (
        memories["int8"].peak.bytes is None
        and "offload turbo is not a policy" in memories["int8"].peak.detail
    )
    assert memories["int8"].fit.fits is True  # the card's fit does not depend on how the run placed it
