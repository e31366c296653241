"""One writer per run folder and rank; a resume checks the images it keeps."""

from __future__ import annotations

import pytest

from ditq.errors import ConfigError
from ditq.runs.lock import run_lock


def test_a_second_writer_of_the_same_rank_is_refused_naming_the_holder(tmp_path):
    with run_lock(tmp_path, 0):
        with pytest.raises(ConfigError, match=r"another ditq run \(pid \d+\) is writing rank 0"):
            with run_lock(tmp_path, 0):
                pass
        with run_lock(tmp_path, 1):  # another rank of a sharded run has its own lock
            pass
    with run_lock(tmp_path, 0):  # released on exit
        pass


def test_ditq_run_refuses_a_folder_another_run_is_writing(tiny_fp8_dir, tmp_path, capsys):
    from ditq.cli import main

    out = tmp_path / "run"
    args = [
        "run",
        "--model",
        str(tiny_fp8_dir),
        "--variants",
        "fp8",
        "--limit",
        "1",
        "--steps",
        "1",
        "-o",
        str(out),
    ]
    out.mkdir()
    with run_lock(out, 0):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "another ditq run" in err and err.count("\n") == 1
        assert not list(out.glob("images/**/*.png"))
    assert main(args) == 0
    assert len(list(out.glob("images/**/*.png"))) == 1


def test_a_resume_regenerates_a_png_that_no_longer_matches_its_sha256(tiny_fp8_dir, tmp_path):
    """A PNG truncated after the manifest recorded it (a crash, a full disk) is generated again on resume, to the
    same bytes; intact ones are kept."""
    from ditq.cli import main

    out = tmp_path / "run"
    args = [
        "run",
        "--model",
        str(tiny_fp8_dir),
        "--variants",
        "fp8",
        "--limit",
        "2",
        "--steps",
        "1",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    pngs = sorted(out.glob("images/**/*.png"))
    assert len(pngs) == 2
    good = {p: p.read_bytes() for p in pngs}
    intact_mtime = pngs[1].stat().st_mtime_ns
    pngs[0].write_bytes(good[pngs[0]][: len(good[pngs[0]]) // 2])
    assert main(args) == 0
    assert pngs[0].read_bytes() == good[pngs[0]]  # regenerated, identical
    assert pngs[1].stat().st_mtime_ns == intact_mtime  # untouched


def test_run_json_records_the_int8_gemm_the_cpu_probe_chose(tiny_fp8_dir, tmp_path):
    import json

    from ditq.cli import main
    from ditq.formats.int8_ops import cpu_gemm

    out = tmp_path / "run"
    args = [
        "run",
        "--model",
        str(tiny_fp8_dir),
        "--variants",
        "fp8",
        "--limit",
        "1",
        "--steps",
        "1",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    rec = json.loads((out / "run.json").read_text())["host"]["int8_cpu_gemm"]
    assert rec["gemm"] == cpu_gemm().gemm and rec["gemm"] in ("int_mm", "float")
    assert rec["reason"].startswith(("measured", "torch._int_mm does not run"))
