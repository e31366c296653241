"""One writer per run folder and rank."""

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
