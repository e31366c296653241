"""Reading a run folder's run.json, prompts.jsonl and manifest.jsonl, and the scores.csv that eval keeps.

scores.csv is long format, one row per (image, metric):

    variant,prompt_id,seed,caption_mode,category,metric,value

`value` is Python's shortest round-trip float text (`repr`), `inf` for a PSNR of identical images. Rows are
sorted by variant, caption mode, prompt id, seed and metric, and the file is replaced atomically (written to a
temporary file in the folder, then renamed), so a crash never leaves half a file.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditq.errors import DitqError
from ditq.io.files import write_atomic
from ditq.io.jsonfile import read_json, read_jsonl

SCORE_COLUMNS = ("variant", "prompt_id", "seed", "caption_mode", "category", "metric", "value")

# (prompt_id, seed, caption_mode): what pairs an image with the reference variant's image.
ImageKey = tuple[str, int, str]
# (variant, prompt_id, seed, caption_mode, metric): one row of scores.csv.
RowKey = tuple[str, str, int, str, str]


class RunFolderError(DitqError):
    """A run folder file is missing or malformed."""


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    category: str = ""
    texts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageRecord:
    variant: str
    prompt_id: str
    seed: int
    caption_mode: str
    category: str
    path: str  # relative to the run folder

    @property
    def key(self) -> ImageKey:
        return (self.prompt_id, self.seed, self.caption_mode)


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise RunFolderError(f"{path} does not exist; expected a run folder written by `ditq run`")
    return read_json(path, "a run record (run.json)", expect=dict, error=RunFolderError)


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise RunFolderError(f"{path} does not exist; expected a run folder written by `ditq run`")
    # a run killed mid-append leaves a torn last manifest line, which `ditq run` also ignores (and rewrites)
    torn_tail = path.name == "manifest.jsonl"
    return read_jsonl(path, f"a {path.stem} record", error=RunFolderError, torn_tail=torn_tail)


def _field(record: dict, name: str, kind: type, where: str, default: object = ...) -> object:
    if name not in record:
        if default is ...:
            raise RunFolderError(f"{where}: missing field {name!r}")
        return default
    value = record[name]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise RunFolderError(f"{where}: field {name!r} must be {kind.__name__}, got {value!r}")
    return value


@dataclass
class RunFolder:
    """The inputs of `ditq eval`: run settings, prompts by id, and the images in the manifest."""

    root: Path
    run: dict
    prompts: dict[str, PromptRecord]
    images: list[ImageRecord]

    @classmethod
    def read(cls, root: str | Path) -> RunFolder:
        root = Path(root)
        if not root.is_dir():
            raise RunFolderError(f"{root} is not a folder; expected a run folder written by `ditq run`")
        run = _read_json(root / "run.json")
        _field(run, "reference_variant", str, str(root / "run.json"), None)

        prompts: dict[str, PromptRecord] = {}
        for number, record in _read_jsonl(root / "prompts.jsonl"):
            where = f"{root / 'prompts.jsonl'} line {number}"
            texts = _field(record, "texts", list, where, [])
            if not all(isinstance(t, str) for t in texts):
                raise RunFolderError(f"{where}: field 'texts' must be a list of strings")
            prompt = PromptRecord(
                id=_field(record, "id", str, where),
                prompt=_field(record, "prompt", str, where),
                category=_field(record, "category", str, where, ""),
                texts=tuple(texts),
            )
            prompts[prompt.id] = prompt

        by_key: dict[tuple[str, ImageKey], ImageRecord] = {}
        for number, record in _read_jsonl(root / "manifest.jsonl"):
            where = f"{root / 'manifest.jsonl'} line {number}"
            prompt_id = _field(record, "prompt_id", str, where)
            if prompt_id not in prompts:
                raise RunFolderError(f"{where}: prompt_id {prompt_id!r} is not in prompts.jsonl")
            image = ImageRecord(
                variant=_field(record, "variant", str, where),
                prompt_id=prompt_id,
                seed=_field(record, "seed", int, where),
                caption_mode=_field(record, "caption_mode", str, where),
                category=_field(record, "category", str, where, prompts[prompt_id].category),
                path=_field(record, "path", str, where),
            )
            by_key[(image.variant, image.key)] = image  # a regenerated image's later line wins
        return cls(root=root, run=run, prompts=prompts, images=list(by_key.values()))

    def image_path(self, image: ImageRecord) -> Path:
        return self.root / image.path


def load_image(path: Path) -> np.ndarray:
    """An image file as uint8 [H, W, 3] RGB."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def format_value(value: float) -> str:
    return repr(float(value))


class ScoreTable:
    """The rows of scores.csv, keyed by (variant, prompt_id, seed, caption_mode, metric)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[RowKey, dict[str, str]] = {}
        self.dirty = False
        if path.is_file():
            self._load()

    def _load(self) -> None:
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != SCORE_COLUMNS:
                raise RunFolderError(
                    f"{self.path}: header {reader.fieldnames}, expected {','.join(SCORE_COLUMNS)}"
                )
            for number, row in enumerate(reader, start=2):
                try:
                    key = (
                        row["variant"],
                        row["prompt_id"],
                        int(row["seed"]),
                        row["caption_mode"],
                        row["metric"],
                    )
                    float(row["value"])
                except (TypeError, ValueError):
                    raise RunFolderError(f"{self.path} line {number}: bad seed or value in {row}") from None
                self.rows[key] = row

    def __contains__(self, key: RowKey) -> bool:
        return key in self.rows

    def add(self, image: ImageRecord, metric: str, value: float) -> None:
        key = (image.variant, image.prompt_id, image.seed, image.caption_mode, metric)
        self.rows[key] = {
            "variant": image.variant,
            "prompt_id": image.prompt_id,
            "seed": str(image.seed),
            "caption_mode": image.caption_mode,
            "category": image.category,
            "metric": metric,
            "value": format_value(value),
        }
        self.dirty = True

    def count(self, metric: str) -> int:
        return sum(1 for key in self.rows if key[4] == metric)

    def flagged(self, metric: str) -> list[RowKey]:
        """Keys of the rows of a check metric whose value is 1 (at least 0.5)."""
        return [key for key, row in self.rows.items() if key[4] == metric and float(row["value"]) >= 0.5]

    def write(self) -> None:
        """Replace scores.csv atomically with the sorted rows."""
        ordered = sorted(
            self.rows.items(), key=lambda item: (item[0][0], item[0][3], item[0][1], item[0][2], item[0][4])
        )
        write_atomic(self.path, lambda f: _write_csv(f, [row for _, row in ordered]), newline="")
        self.dirty = False


def _write_csv(f, rows: list[dict[str, str]]) -> None:
    writer = csv.DictWriter(f, fieldnames=SCORE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def write_json_atomic(path: Path, data: object) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=False) + "\n"))
