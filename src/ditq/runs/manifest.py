"""Run folders: `run.json` (what the run is), `manifest.jsonl` (one line per finished image).

Lines are appended whole and flushed to disk one at a time, so an interrupted run keeps every finished image; a
torn last line is ignored on reading. With several processes each rank appends to `manifest.rank{r}.jsonl` and
rank 0 merges them into `manifest.jsonl` (deduplicated by image key) at the end. Appends and the merge take an
exclusive `flock` on `RUN/.manifest.lock`, so a merge never replaces a file between another process's append and
its own read of it: no line is lost, whoever appends while it runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ditq.errors import CheckpointError, ConfigError
from ditq.io.jsonfile import get_field, kind_name, read_json
from ditq.io.jsonfile import read_jsonl as read_json_lines

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
MANIFEST = "manifest.jsonl"
MANIFEST_LOCK = ".manifest.lock"
# Fields of run.json that every later invocation must match exactly.
FROZEN_FIELDS = ("suite", "prompt_ids", "seeds", "caption_modes", "settings", "reference_variant")
# Execution options recorded per variant that change its pixels: a resumed run must use the same.
PIXEL_OPTIONS = ("attention", "dtype", "fp8_compute")


def image_key(rec: dict) -> tuple[str, str, int, str]:
    return (rec["variant"], rec["prompt_id"], int(rec["seed"]), rec["caption_mode"])


def read_jsonl(path: Path) -> list[dict]:
    """The records of a manifest (or any JSON-lines file of the run); [] when it does not exist. A torn last line
    (an interrupted write) is ignored; any other bad line is a CheckpointError naming the file and line."""
    if not path.is_file():
        return []
    return [rec for _, rec in read_json_lines(path, "a manifest record", torn_tail=True)]


def _image_records(path: Path) -> Iterator[dict]:
    """The records of a manifest, each checked to have the fields a resume and a merge read."""
    if not path.is_file():
        return
    for number, rec in read_json_lines(path, "a manifest record", torn_tail=True):
        where = f"{path} line {number}"
        for name in ("variant", "prompt_id", "caption_mode", "path"):
            get_field(rec, name, str, where)
        get_field(rec, "seed", int, where)
        get_field(rec, "sha256", str, where, default=None)
        rel = Path(rec["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise CheckpointError(f"{where}: path {rec['path']!r} must be relative and inside the run folder")
        yield rec


def read_run_record(path: Path) -> dict[str, Any]:
    """`run.json` as an object whose `variants` (an object of objects) and `loras` (an array of objects) have the
    shape the run reads; else a CheckpointError naming the file and field."""
    record = read_json(path, "a run record (run.json)")
    where = str(path)
    variants = get_field(record, "variants", dict, where, default={})
    for name, var in variants.items():
        if not isinstance(var, dict):
            raise CheckpointError(f"{where}: variants.{name} is not an object {{model, ...}}")
    loras = get_field(record, "loras", (list, type(None)), where, default=None) or []
    for i, lora in enumerate(loras):
        if not isinstance(lora, dict):
            raise CheckpointError(f"{where}: loras[{i}] is a JSON {kind_name(lora)}, expected an object")
        get_field(lora, "strength", float, f"{where}: loras[{i}]", default=1.0)
    return record


@contextlib.contextmanager
def manifest_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on the run folder's manifests, held for one append or one whole merge (blocking: each
    holds it for milliseconds). Released when the descriptor closes, also when the process dies."""
    import fcntl

    fd = os.open(Path(run_dir) / MANIFEST_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def append_jsonl(path: Path, rec: dict) -> None:
    """Append one record as a whole line and flush it to disk; a torn last line left by a crash is dropped first.
    Holds the folder's manifest lock, so a merge running in another process cannot drop the line."""
    data = (json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n").encode()
    with manifest_lock(path.parent), open(path, "ab+") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                keep = f.read().rfind(b"\n") + 1
                f.truncate(keep)
                log.warning("%s: dropped a torn last line (an interrupted write)", path)
        f.seek(0, os.SEEK_END)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True))
    os.replace(tmp, path)


def manifest_files(run_dir: Path) -> list[Path]:
    return [run_dir / MANIFEST, *sorted(run_dir.glob("manifest.rank*.jsonl"))]


def finished(run_dir: Path, verify: bool = False) -> dict[tuple, dict]:
    """Image key -> manifest record, for images whose file still exists (the latest record of a key wins).

    `verify` (what a resume uses) also requires the file's sha256 to be the one recorded: a PNG truncated by a
    crash or replaced since is generated again, with a warning naming it."""
    done: dict[tuple, dict] = {}
    for path in manifest_files(run_dir):
        for rec in _image_records(path):
            if (run_dir / rec["path"]).is_file():
                done[image_key(rec)] = rec
    if verify:
        import hashlib

        for key, rec in list(done.items()):
            want = rec.get("sha256")
            if want and hashlib.sha256((run_dir / rec["path"]).read_bytes()).hexdigest() != want:
                log.warning(
                    "%s: does not match its manifest's sha256 (truncated or replaced); generating it again",
                    run_dir / rec["path"],
                )
                del done[key]
    return done


def merge_manifests(run_dir: Path, order: Iterable[tuple]) -> int:
    """Fold rank manifests into manifest.jsonl (one line per image, in job order); returns the line count.

    Runs under the manifest lock from the read to the removal of the rank files: a line another process appends
    meanwhile waits for the lock and then lands in the new manifest.jsonl or a new rank file, never in a file the
    merge has read and is about to replace."""
    ranked = {k: i for i, k in enumerate(order)}
    with manifest_lock(run_dir):
        done = finished(run_dir)
        recs = sorted(done.values(), key=lambda r: ranked.get(image_key(r), len(ranked)))
        tmp = run_dir / (MANIFEST + ".partial")
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in recs:
                f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, run_dir / MANIFEST)
        for p in run_dir.glob("manifest.rank*.jsonl"):
            p.unlink()
    return len(recs)


def check_compatible(existing: dict, new: dict, run_dir: Path) -> None:
    """Refuse to mix images made with other settings, another suite or other seeds into one run folder."""
    for key in FROZEN_FIELDS:
        if existing.get(key) != new.get(key):
            a, b = json.dumps(existing.get(key))[:120], json.dumps(new.get(key))[:120]
            raise ConfigError(
                f"{run_dir / RUN_FILE}: this run was made with {key} = {a}, not {b}; "
                "use another output folder to run other settings"
            )
    _check_loras(existing.get("loras") or [], new.get("loras") or [], run_dir)
    for name, var in new.get("variants", {}).items():
        old = existing.get("variants", {}).get(name)
        if old and old.get("model") != var.get("model"):
            raise ConfigError(
                f"{run_dir / RUN_FILE}: variant {name!r} was made from {old.get('model')}, not {var.get('model')}"
            )
        for key in PIXEL_OPTIONS:
            if old and key in old and key in var and old[key] != var[key]:
                raise ConfigError(
                    f"{run_dir / RUN_FILE}: variant {name!r} was made with {key} {old[key]}, not {var[key]}; "
                    "use another output folder (or another variant name) to run it otherwise"
                )


def _check_loras(old: list[dict], new: list[dict], run_dir: Path) -> None:
    """The LoRAs are part of what every image is: the same files (by sha256), strengths and rules, in order."""
    from ditq.lora.spec import lora_key

    if lora_key(old) == lora_key(new):
        return

    def said(recs: list[dict]) -> str:
        return (
            ", ".join(f"{r.get('path')}:{r.get('strength')} ({str(r.get('sha256'))[:12]})" for r in recs)
            or "none"
        )

    raise ConfigError(
        f"{run_dir / RUN_FILE}: this run was made with LoRAs {said(old)}, not {said(new)}; "
        "use another output folder to run other LoRAs"
    )
