"""Merging manifests while other processes append to them loses no line and duplicates none."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

from ditq.runs.manifest import MANIFEST, append_jsonl, image_key, manifest_files, merge_manifests

WRITERS = 3  # writer 0 appends to manifest.jsonl itself (a one-process run), the others to rank files
PER_WRITER = 150


def _record(writer: int, i: int) -> dict:
    return {
        "variant": "fp8",
        "prompt_id": f"w{writer}p{i:04d}",
        "seed": 0,
        "caption_mode": "json",
        "path": f"images/fp8/json/w{writer}p{i:04d}_s0.png",
    }


def _all_keys() -> list[tuple]:
    return [image_key(_record(w, i)) for w in range(WRITERS) for i in range(PER_WRITER)]


def _append(run_dir: str, writer: int, start) -> None:
    start.wait()
    path = Path(run_dir) / (MANIFEST if writer == 0 else f"manifest.rank{writer}.jsonl")
    for i in range(PER_WRITER):
        append_jsonl(path, _record(writer, i))


def _merge(run_dir: str, start, stop, merges) -> None:
    start.wait()
    order = _all_keys()
    while not stop.is_set():
        merge_manifests(Path(run_dir), order)
        merges.value += 1


def _lines(run_dir: Path) -> list[tuple]:
    keys = []
    for path in manifest_files(run_dir):
        for line in path.read_text(encoding="utf-8").splitlines():
            keys.append(image_key(json.loads(line)))
    return keys


def test_merging_while_processes_append_loses_no_line(tmp_path):
    run_dir = tmp_path / "run"
    for w in range(WRITERS):
        for i in range(PER_WRITER):  # merge keeps the records whose image exists
            image = run_dir / _record(w, i)["path"]
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(b"png")
    ctx = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    )
    start, stop, merges = ctx.Barrier(WRITERS + 1), ctx.Event(), ctx.Value("i", 0)
    writers = [ctx.Process(target=_append, args=(str(run_dir), w, start)) for w in range(WRITERS)]
    merger = ctx.Process(target=_merge, args=(str(run_dir), start, stop, merges))
    for p in [*writers, merger]:
        p.start()
    deadline = time.monotonic() + 60
    for p in writers:
        p.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    merger.join(max(1.0, deadline - time.monotonic()))
    alive = [p for p in [*writers, merger] if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a writer or the merger did not finish"
    assert [p.exitcode for p in [*writers, merger]] == [0] * (WRITERS + 1)
    assert merges.value > 1, "the merge never overlapped the appends"

    # every appended line is in exactly one manifest file, once
    lines = _lines(run_dir)
    want = _all_keys()
    missing = set(want) - set(lines)
    assert not missing, f"{len(missing)} of {len(want)} lines lost"
    assert len(lines) == len(want) and len(set(lines)) == len(want)

    # and a final merge folds them into manifest.jsonl, in job order, with no rank file left
    assert merge_manifests(run_dir, want) == len(want)
    assert manifest_files(run_dir) == [run_dir / MANIFEST]
    assert _lines(run_dir) == want
