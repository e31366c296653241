"""A new user's mistakes are caught: checked before the heavy imports, one line naming the path or the rule, and
exit codes that say which it was (1 invalid input, 2 usage or file error, 70 a crash)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ditq.cli import CRASH, main

PY = sys.executable


def _one_line(err: str, *needles: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def _cli_in_subprocess(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DITQ_CACHE": str(cwd / "cache")}
    return subprocess.run([PY, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_a_missing_model_is_reported_without_importing_torch(tmp_path):
    """The check runs before torch, diffusers and the quantizers are imported, so it answers at once."""
    code = (
        "import sys\nfrom ditq.cli import main\n"
        "rc = main(['generate', '--model', 'no/such/folder', '--prompt', 'a cat'])\n"
        "print(rc, 'torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    done = _cli_in_subprocess(code, tmp_path)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    _one_line(done.stderr, "--model no/such/folder", "no such folder")


@pytest.mark.parametrize("verb", ["generate", "quantize", "run", "bench", "plan", "inspect", "calibrate"])
def test_every_model_verb_checks_its_model_first(verb, tmp_path, capsys):
    missing = str(tmp_path / "missing-model")
    args = {
        "generate": ["generate", "--model", missing, "--prompt", "a"],
        "quantize": ["quantize", missing, "--recipe", "q4_k", "-o", str(tmp_path / "o")],
        "run": ["run", "--model", missing, "-o", str(tmp_path / "r")],
        "bench": ["bench", "--model", missing, "-o", str(tmp_path / "b")],
        "plan": ["plan", missing],
        "inspect": ["inspect", missing],
        "calibrate": ["calibrate", missing, "-o", str(tmp_path / "s.safetensors")],
    }[verb]
    assert main(args) == 2
    _one_line(capsys.readouterr().err, missing, "no such folder")
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists() and not (tmp_path / "b").exists()


def test_a_model_file_and_a_fifo_prompts_file_are_refused(tmp_path, capsys):
    afile = tmp_path / "model.safetensors"
    afile.write_bytes(b"x")
    assert main(["generate", "--model", str(afile), "--prompt", "a"]) == 2
    _one_line(capsys.readouterr().err, str(afile), "got a file")
    fifo = tmp_path / "prompts.txt"
    os.mkfifo(fifo)
    assert main(["generate", "--prompts", str(fifo)]) == 2  # reading it would block forever
    _one_line(capsys.readouterr().err, str(fifo), "FIFO")
    assert main(["generate", "--prompts", str(tmp_path / "none.txt")]) == 2
    _one_line(capsys.readouterr().err, "none.txt", "no such file")
    assert main(["generate", "--prompt", "a", "--lora", f"{tmp_path / 'style.safetensors'}:0.8"]) == 2
    _one_line(capsys.readouterr().err, "style.safetensors", "no such file")


def test_a_prompt_that_starts_with_a_brace_must_be_a_valid_caption(tmp_path, capsys):
    """A missing brace, or JSON that breaks the caption rules, is an invalid input (exit 1) naming the rule; with
    --raw the same text passes as raw text (the run then stops at the next check, the bad --seed)."""
    base = ["generate", "-o", str(tmp_path / "o"), "--seed", "x"]
    assert main([*base, "--prompt", '{"high_level_description": "a cat"']) == 1
    _one_line(capsys.readouterr().err, "--prompt", "invalid-json", "--raw")
    assert main([*base, "--prompt", '{"high_level_description": "a cat"}']) == 1
    _one_line(capsys.readouterr().err, "missing-key", "compositional_deconstruction")
    assert main([*base, "--raw", "--prompt", '{"high_level_description": "a cat"']) == 2
    _one_line(capsys.readouterr().err, "--seed 'x'")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a fox"}) + "\n" + json.dumps({"caption": "{not json"}) + "\n")
    assert main([*base, "--prompts", str(prompts)]) == 1
    _one_line(capsys.readouterr().err, f"{prompts} prompt 2", "invalid-json")


def test_prompt_and_caption_files_that_do_not_read_are_one_line_naming_them(tmp_path, capsys):
    """Not UTF-8, a line that is not an object, a line without a prompt: exit 2 naming the file (and the line)."""
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert main(["generate", "--prompts", str(bad)]) == 2
    _one_line(capsys.readouterr().err, str(bad), "UTF-8")
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "a fox"}\n["a list"]\n')
    assert main(["generate", "--prompts", str(lines)]) == 2
    _one_line(capsys.readouterr().err, str(lines), "line 2")
    lines.write_text('{"prompt": "a fox"}\n{"seed": 3}\n')
    assert main(["calibrate", "tiny", "--captions", str(lines), "-o", str(tmp_path / "s.safetensors")]) == 2
    _one_line(capsys.readouterr().err, f"{lines}:2", "'caption' or 'prompt'")
    assert (
        main(["calibrate", "tiny", "--captions", str(tmp_path / "no.jsonl"), "-o", str(tmp_path / "s")]) == 2
    )
    _one_line(capsys.readouterr().err, "no.jsonl", "no such file")


def _pipeline_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "model_index.json").write_text('{"_class_name": "Ideogram4Pipeline"}')
    return path


def _run_folder(path: Path) -> Path:
    (path / "images").mkdir(parents=True)
    (path / "run.json").write_text("{}")
    return path


@pytest.mark.parametrize(
    ("verb", "make", "kind"),
    [
        ("run", _pipeline_folder, "pipeline"),
        ("bench", _run_folder, "run"),
        ("generate", _pipeline_folder, "pipeline"),
        ("quantize", _run_folder, "run"),
        ("convert", _run_folder, "run"),
        ("report", _pipeline_folder, "pipeline"),
    ],
)
def test_an_output_folder_of_another_kind_is_refused_and_left_as_it_was(verb, make, kind, tmp_path, capsys):
    """The new user's `ditq quantize tiny --recipe nf4 -o bench-out/run` replaced a run folder; now every verb
    that writes a folder refuses one of another kind, before loading anything."""
    out = make(tmp_path / "taken")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    run_dir = _run_folder(tmp_path / "scored")
    args = {
        "run": ["run", "-o", str(out)],
        "bench": ["bench", "-o", str(out)],
        "generate": ["generate", "--prompt", "a", "-o", str(out)],
        "quantize": ["quantize", "tiny", "--recipe", "nf4", "-o", str(out)],
        "convert": ["convert", str(run_dir / "run.json"), "--from", "auto", "--base", "tiny", "-o", str(out)],
        "report": ["report", str(run_dir), "-o", str(out)],
    }[verb]
    assert main(args) == 2
    _one_line(capsys.readouterr().err, str(out), f"a ditq {kind} folder", "--force")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_folder_kinds_accept_their_own_and_empty_folders(tmp_path):
    from ditq.cli.checks import check_output_folder, folder_kind

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".ditq-run.lock").write_text("")
    assert folder_kind(tmp_path / "empty") == "empty"
    assert folder_kind(_run_folder(tmp_path / "run")) == "run"
    assert folder_kind(_pipeline_folder(tmp_path / "pipe")) == "pipeline"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "000_s0.png").write_bytes(b"")
    assert folder_kind(tmp_path / "imgs") == "images"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("")
    assert folder_kind(tmp_path / "docs") is None
    check_output_folder(tmp_path / "run", "run", force=False)
    check_output_folder(tmp_path / "empty", "pipeline", force=False)
    check_output_folder(tmp_path / "imgs", "images", force=False)
    check_output_folder(tmp_path / "docs", "run", force=True)  # --force writes into it
    with pytest.raises(Exception, match="a folder of other files"):
        check_output_folder(tmp_path / "docs", "images", force=False)


def test_a_full_disk_names_the_file_and_exits_2(tmp_path, capsys):
    """/dev/full fails every write with ENOSPC, as a full disk does, and reports no file name of its own."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    assert main(["captions", "schema", "-o", "/dev/full"]) == 2
    _one_line(capsys.readouterr().err, "/dev/full", "No space left on device")
    assert main(["captions", "suite", "--export", "/dev/full", "--subset", "smoke"]) == 2
    _one_line(capsys.readouterr().err, "/dev/full", "No space left on device")


def test_a_read_only_folder_names_the_path_and_exits_2(tmp_path, capsys, monkeypatch):
    """A read-only filesystem (EROFS from the kernel; simulated, since permission bits do not stop root)."""
    target = tmp_path / "ro" / "suite.jsonl"
    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *a, **k):
        if tmp_path / "ro" in (self, *self.parents):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    assert main(["captions", "suite", "--export", str(target), "--subset", "smoke"]) == 2
    _one_line(capsys.readouterr().err, str(tmp_path / "ro"), "Read-only file system")
    assert not target.exists()


def test_a_crash_is_neither_an_input_nor_a_usage_error(capsys, monkeypatch):
    """An exception that is not ditq's own error is a bug: its traceback is shown and the status is 70."""
    import ditq.cli.captions as captions

    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(captions, "run_schema", broken)  # the parser is built per call: it picks this up
    assert main(["captions", "schema"]) == CRASH
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err and "internal error" in err


def test_imports_print_nothing_and_help_stays_light(tmp_path):
    """Importing every module of the package prints nothing (no kernel-missing lines, no deprecation warnings),
    and `ditq --help` for every verb imports neither torch nor diffusers."""
    code = (
        "import importlib, pkgutil, ditq\n"
        "for m in pkgutil.walk_packages(ditq.__path__, 'ditq.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
    )
    done = _cli_in_subprocess(code, tmp_path)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr[-2000:]
    code = (
        "import sys, contextlib, io\nfrom ditq.cli import VERB_MODULES, main\n"
        "for verb in VERB_MODULES:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n            main([verb, '--help'])\n        except SystemExit:\n            pass\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    done = _cli_in_subprocess(code, tmp_path)
    assert done.stdout.split() == ["False", "False"], done.stderr[-2000:]


def test_the_light_names_match_the_registries_they_mirror():
    from ditq import names
    from ditq.models import execution
    from ditq.quant import plan
    from ditq.quant.recipes import recipe_names
    from ditq.stats import bootstrap

    assert tuple(recipe_names()) == names.RECIPE_NAMES
    assert execution.OFFLOAD == names.OFFLOAD and execution.ATTENTION == names.ATTENTION
    assert plan.CARDS == names.CARDS and plan.DEFAULT_VARIANTS == names.PLAN_VARIANTS
    assert (bootstrap.DEFAULT_RESAMPLES, bootstrap.DEFAULT_SEED) == (
        names.BOOTSTRAP_RESAMPLES,
        names.BOOTSTRAP_SEED,
    )
