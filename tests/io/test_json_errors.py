"""Every corrupt or wrongly typed JSON file ditq reads is one error naming the file; a verb that meets one exits 2
with one line on stderr, and the run folder it was given still resumes once the file is fixed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from ditq.cli import main
from ditq.errors import CheckpointError, DitqError
from ditq.io.jsonfile import get_field, read_json, read_jsonl
from ditq.metrics.runfolder import RunFolder, RunFolderError
from ditq.models.loading import check_folder, load_pipeline
from ditq.models.record import VariantRecord
from ditq.report import load_run
from ditq.runs.manifest import finished, read_run_record

# The ways a JSON file arrives broken: cut in the middle, not UTF-8, a list where an object belongs.
CORRUPTIONS = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "not-utf8": lambda raw: b"\xff\xfe" + raw,
    "list": lambda raw: b"[1, 2]",
}


def _corrupt(path: Path, how: str) -> None:
    path.write_bytes(CORRUPTIONS[how](path.read_bytes()))


def _set(path: Path, **fields) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(fields)
    path.write_text(json.dumps(data), encoding="utf-8")


# --- the reader ---------------------------------------------------------------------------------------------


def test_read_json_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "a": 1,\n  "b": }\n')  # the value of "b" is missing: line 3, column 8
    with pytest.raises(CheckpointError) as err:
        read_json(path, "a test config")
    assert str(err.value).startswith(f"{path}: not valid JSON (Expecting value at line 3 column 8)")
    assert "expected a test config" in str(err.value)


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_read_json_refuses_each_corruption(tmp_path, how):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 64, "name": "é"}), encoding="utf-8")
    _corrupt(path, how)
    with pytest.raises(CheckpointError) as err:
        read_json(path, "a test config")
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "a test config" in message
    assert {"truncated": "not valid JSON", "not-utf8": "not UTF-8", "list": "top level is a JSON array"}[
        how
    ] in message


def test_read_json_missing_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing\.json: no such file; expected a test config"):
        read_json(tmp_path / "nothing.json", "a test config")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_json(tmp_path, "a test config")


def test_get_field_types(tmp_path):
    data = {"n": 3, "flag": True, "name": "x", "map": []}
    assert get_field(data, "n", int, "f.json") == 3
    assert get_field(data, "n", float, "f.json") == 3  # an integer is a number
    assert get_field(data, "absent", int, "f.json", default=7) == 7
    with pytest.raises(
        CheckpointError, match=r"f\.json: field 'flag' is a JSON boolean \(true\), expected an integer"
    ):
        get_field(data, "flag", int, "f.json")
    with pytest.raises(
        CheckpointError, match=r"f\.json: field 'map' is a JSON array \(\[\]\), expected an object"
    ):
        get_field(data, "map", dict, "f.json")
    with pytest.raises(CheckpointError, match=r"f\.json: field 'absent' is missing"):
        get_field(data, "absent", str, "f.json")


def test_read_jsonl_torn_tail_and_bad_lines(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n{"a": 3, "b')
    assert read_jsonl(path, "a record", torn_tail=True) == [(1, {"a": 1}), (3, {"a": 2})]
    with pytest.raises(CheckpointError, match=r"manifest\.jsonl line 4: not valid JSON"):
        read_jsonl(path, "a record")
    path.write_bytes(b'{"a": 1}\n{"a": \n{"a": 3}\n')  # a bad line that is not the last is never a torn write
    with pytest.raises(CheckpointError, match=r"manifest\.jsonl line 2: not valid JSON"):
        read_jsonl(path, "a record", torn_tail=True)
    path.write_bytes(b'{"a": 1}\n[1]\n{"a": 3}\n')
    with pytest.raises(CheckpointError, match=r"manifest\.jsonl line 2: a JSON array, expected a record"):
        read_jsonl(path, "a record", torn_tail=True)
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n{"a": 3}\n')
    with pytest.raises(CheckpointError, match=r"manifest\.jsonl line 2: not UTF-8 text"):
        read_jsonl(path, "a record")


# --- pipeline folders: checked before the libraries read them ----------------------------------------------

FOLDER_FILES = (
    "model_index.json",
    "transformer/config.json",
    "unconditional_transformer/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "ditq_tiny.json",
    "ditq.json",
)


@pytest.fixture
def model(tiny_fp8_dir, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_fp8_dir, folder)
    record = VariantRecord(variant="fp8", formats={"transformer": "fp8", "unconditional_transformer": "fp8"})
    (folder / "ditq.json").write_text(json.dumps(record.to_json()))
    return folder


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
@pytest.mark.parametrize("name", FOLDER_FILES)
def test_every_json_file_of_a_pipeline_folder_is_checked(model, name, how):
    check_folder(model)  # the copy is valid
    _corrupt(model / name, how)
    with pytest.raises(CheckpointError) as err:
        check_folder(model)
    assert str(err.value).startswith(f"{model / name}: ")


@pytest.mark.parametrize(
    "name, fields, said",
    [
        (
            "model_index.json",
            {"_class_name": 5},
            "field '_class_name' is a JSON integer (5), expected a string",
        ),
        ("model_index.json", {"vae": "AutoencoderKLFlux2"}, "component 'vae' is a JSON string"),
        ("vae/config.json", {"_class_name": ["AutoencoderKLFlux2"]}, "field '_class_name' is a JSON array"),
        (
            "ditq_tiny.json",
            {"default_size": "64"},
            "field 'default_size' is a JSON string (\"64\"), expected an",
        ),
        ("ditq.json", {"formats": ["fp8"]}, "field 'formats' is list, expected dict"),
    ],
)
def test_fields_of_the_wrong_type_name_file_and_field(model, name, fields, said):
    _set(model / name, **fields)
    with pytest.raises(CheckpointError) as err:
        check_folder(model)
    assert str(err.value).startswith(f"{model / name}: ") and said in str(err.value)


@pytest.mark.parametrize(
    "weight_map, said",
    [
        ([], "'weight_map' is list, expected an object"),
        ({"w": 5}, "weight_map entry 'w' is 5, expected a file name"),
    ],
)
def test_a_shard_index_weight_map_of_the_wrong_type(model, weight_map, said):
    index = model / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError) as err:
        check_folder(model)
    assert str(err.value).startswith(f"{index}: ") and said in str(err.value)


@pytest.mark.parametrize(
    "name, fields, parts, folder, library",
    [
        ("vae/config.json", {"block_out_channels": 5}, "encoder", "vae", "TypeError"),
        (
            "scheduler/scheduler_config.json",
            {"num_train_timesteps": "abc"},
            "encoder",
            "scheduler",
            "TypeError",
        ),
        ("tokenizer/tokenizer.json", {"model": 5}, "encoder", "tokenizer", "Exception"),
        (
            "tokenizer/tokenizer_config.json",
            {"added_tokens_decoder": []},
            "encoder",
            "tokenizer",
            "AttributeError",
        ),
        ("text_encoder/config.json", {"text_config": []}, "encoder", "text_encoder", "StrictDataclass"),
        ("transformer/config.json", {"num_layers": "x"}, "denoiser", "transformer", "TypeError"),
    ],
)
def test_a_config_the_library_refuses_names_the_component_folder(model, name, fields, parts, folder, library):
    """Valid JSON of a shape diffusers or transformers cannot build from: the library's own exception, as a
    CheckpointError naming the component folder and the library's first line."""
    _set(model / name, **fields)
    with pytest.raises(CheckpointError) as err:
        load_pipeline(model, parts=parts)
    message = str(err.value)
    assert message.startswith(f"{model / folder}: cannot load ") and library in message
    assert "\n" not in message
    assert torch.get_default_dtype() == torch.float32  # a build that failed midway leaves no global dtype behind


def test_cli_inspect_and_generate_exit_2_with_one_line(model, tiny_fp8_dir, tmp_path, capsys):
    _corrupt(model / "model_index.json", "truncated")
    assert main(["inspect", str(model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(model / "model_index.json") in err[0] and "Traceback" not in err[0]
    shutil.copy2(tiny_fp8_dir / "model_index.json", model / "model_index.json")
    _set(model / "vae" / "config.json", block_out_channels=5)
    out = tmp_path / "out"
    args = ["generate", "--model", str(model), "--prompt", "a", "--steps", "1", "-o", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(model / "vae") in err[0] and not list(out.glob("**/*.png"))


# --- run folders: run, eval and report ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_fp8_dir, tmp_path_factory) -> Path:
    """A run folder of one image, written by `ditq run` (read-only: copy it to modify)."""
    out = tmp_path_factory.mktemp("json-errors") / "run"
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
    return out


@pytest.fixture
def run_dir(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def _state(run_dir: Path) -> dict[str, str]:
    """sha256 of every file a resume reads: the manifest, the prompts and the images."""
    files = [run_dir / "manifest.jsonl", run_dir / "prompts.jsonl", *sorted(run_dir.glob("images/**/*.png"))]
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_run_json_readers(run_dir, how):
    _corrupt(run_dir / "run.json", how)
    path = run_dir / "run.json"
    for read, error in (
        (read_run_record, CheckpointError),
        (RunFolder.read, RunFolderError),
        (load_run, DitqError),
    ):
        with pytest.raises(error) as err:
            read(path if read is read_run_record else run_dir)
        assert str(err.value).startswith(f"{path}: "), str(err.value)


@pytest.mark.parametrize(
    "fields, said",
    [
        ({"variants": []}, "field 'variants' is a JSON array"),
        ({"loras": [{"strength": "x"}]}, "field 'strength' is a JSON string"),
    ],
)
def test_run_json_fields_of_the_wrong_type(run_dir, fields, said):
    _set(run_dir / "run.json", **fields)
    with pytest.raises(CheckpointError) as err:
        read_run_record(run_dir / "run.json")
    assert str(err.value).startswith(f"{run_dir / 'run.json'}: ") and said in str(err.value)


def test_manifest_line_of_the_wrong_type(run_dir):
    manifest = run_dir / "manifest.jsonl"
    rec = json.loads(manifest.read_text().splitlines()[0])
    for bad, said in (
        ({"seed": "0"}, "field 'seed' is a JSON string"),
        ({"path": 5}, "field 'path' is a JSON integer"),
    ):
        manifest.write_text(json.dumps({**rec, **bad}) + "\n" + json.dumps(rec) + "\n")
        with pytest.raises(CheckpointError, match=rf"manifest\.jsonl line 1: {said}"):
            finished(run_dir)
    manifest.write_text(json.dumps({**rec, "path": "../elsewhere.png"}) + "\n")
    with pytest.raises(CheckpointError, match="must be relative and inside the run folder"):
        finished(run_dir)


def test_cli_report_and_eval_exit_2_with_one_line(run_dir, capsys):
    _corrupt(run_dir / "run.json", "not-utf8")
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run_dir / "run.json") in err[0]
    assert main(["eval", str(run_dir), "--metrics", "psnr", "--no-progress", "--no-checks"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run_dir / "run.json") in err[0]


def test_a_failed_run_leaves_the_folder_resumable(run_dir, tiny_fp8_dir, capsys):
    """`ditq run` on a folder whose run.json is corrupt exits 2 naming it and changes nothing; once run.json is
    restored the same command resumes: every image is kept, none is generated again."""
    before = _state(run_dir)
    good = (run_dir / "run.json").read_bytes()
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
        str(run_dir),
    ]
    for how in sorted(CORRUPTIONS):
        _corrupt(run_dir / "run.json", how)
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(run_dir / "run.json") in err[0], err
        assert _state(run_dir) == before
        (run_dir / "run.json").write_bytes(good)
    manifest = run_dir / "manifest.jsonl"
    manifest.write_text(manifest.read_text() + '{"variant": "fp8", "seed": "zero"}\n')
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{manifest} line 2: field" in err[0], err
    manifest.write_text(manifest.read_text().splitlines()[0] + "\n")
    assert main(args) == 0
    assert _state(run_dir) == before  # resumed: the one image kept, the manifest rewritten to the same line
