"""Prompt records and the JSONL files that hold them: strict reading with line numbers, crash-safe appending.

A prompt file has one JSON object per line with at least `id` (unique) and `prompt`; suite records add
`category`, `texts` (exact strings the image must render), the template fields and `caption`. A caption file
written by `ditq captions expand` holds the same records with `caption` (canonical JSON text) filled in.

Appending is crash-safe: each record is written as one complete line with a single `write`, then flushed and
fsynced, so after a crash at most the last line is torn. `open_resumable` detects such a torn tail, cuts it off
(every complete line before it is kept) and reports the ids already done.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

from ditq.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PromptRecord:
    """One benchmark prompt.

    `caption` is the canonical JSON caption text (empty when not expanded yet); `texts` are the exact strings an
    image must render (for OCR scoring; empty for prompts without text); `fields` holds everything else the
    record carried (the template expander's inputs such as `subject`, `medium`, `palette`).
    """

    id: str
    category: str
    prompt: str
    caption: str = ""
    texts: tuple[str, ...] = ()
    fields: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> PromptRecord:
        """Build from a parsed JSONL line; `where` ("file:line") prefixes errors."""
        head = f"{where}: " if where else ""
        for key in ("id", "prompt"):
            if not isinstance(data.get(key), str) or not data[key].strip():
                raise ConfigError(f"{head}{key!r} must be a non-empty string")
        texts = data.get("texts", [])
        if not isinstance(texts, list) or not all(isinstance(t, str) and t for t in texts):
            raise ConfigError(f"{head}'texts' must be a list of non-empty strings")
        caption = data.get("caption", "")
        if isinstance(caption, Mapping):
            from ditq.prompts.schema import canonical_json

            caption = canonical_json(caption)
        if not isinstance(caption, str):
            raise ConfigError(f"{head}'caption' must be a JSON object or its text")
        category = data.get("category", "")
        if not isinstance(category, str):
            raise ConfigError(f"{head}'category' must be a string")
        known = {"id", "category", "prompt", "caption", "texts"}
        return cls(
            id=data["id"],
            category=category,
            prompt=data["prompt"],
            caption=caption,
            texts=tuple(texts),
            fields=MappingProxyType({k: v for k, v in data.items() if k not in known}),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSONL form: `id, category, prompt, texts`, then the template fields, then `caption` last."""
        out: dict[str, Any] = {"id": self.id, "category": self.category, "prompt": self.prompt}
        out["texts"] = list(self.texts)
        out.update(self.fields)
        if self.caption:
            out["caption"] = self.caption
        return out

    def get(self, key: str, default: Any = None) -> Any:
        """A top-level field by name, whether a declared attribute or one of `fields`."""
        if key in {"id", "category", "prompt", "caption"}:
            return getattr(self, key)
        if key == "texts":
            return list(self.texts)
        return self.fields.get(key, default)


def dumps_line(record: Mapping[str, Any]) -> str:
    """One JSONL line (with its newline): minified, non-ASCII kept."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, object)` for each non-blank line; raise `ConfigError` naming file and line for a line
    that is not a JSON object."""
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{path}:{number}: malformed JSON: {exc.msg} at column {exc.colno}"
                ) from None
            if not isinstance(obj, dict):
                raise ConfigError(
                    f"{path}:{number}: expected a JSON object per line, got {type(obj).__name__}"
                )
            yield number, obj


def read_prompt_records(path: str | Path) -> list[PromptRecord]:
    """Read a prompt JSONL file: every line a record, ids unique (a repeat names both lines)."""
    records: list[PromptRecord] = []
    first_line: dict[str, int] = {}
    for number, obj in iter_jsonl(path):
        record = PromptRecord.from_dict(obj, where=f"{path}:{number}")
        if record.id in first_line:
            raise ConfigError(
                f"{path}:{number}: duplicate prompt id {record.id!r} (first on line {first_line[record.id]})"
            )
        first_line[record.id] = number
        records.append(record)
    return records


def append_line(handle: IO[bytes], record: Mapping[str, Any]) -> None:
    """Append one record as a complete line and make it durable (single write, flush, fsync)."""
    handle.write(dumps_line(record).encode("utf-8"))
    handle.flush()
    os.fsync(handle.fileno())


def open_resumable(path: str | Path) -> tuple[IO[bytes], set[str]]:
    """Open a JSONL output for appending after a possible crash; return the handle and the ids already in it.

    A last line without its newline, or one that does not parse, is a torn write: it is cut off and logged.
    A bad line before the last one is not a crash artefact and raises `ConfigError` (the file is left as is).
    """
    path = Path(path)
    done: set[str] = set()
    if path.exists():
        data = path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # `tail` is b"" when the file ends with a newline
        keep = len(data) - len(tail)
        for number, raw in enumerate(complete, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
                    raise ValueError("not a record with a string id")
            except ValueError as exc:
                if number == len(complete) and not tail:
                    keep -= len(raw) + 1
                    log.warning("%s:%d: dropping an unreadable last line (%s)", path, number, exc)
                    break
                raise ConfigError(
                    f"{path}:{number}: unreadable record in the middle of the file: {exc}"
                ) from None
            if obj["id"] in done:
                raise ConfigError(f"{path}:{number}: duplicate prompt id {obj['id']!r}")
            done.add(obj["id"])
        if keep < len(data):
            if tail:
                log.warning(
                    "%s:%d: dropping a torn last line (%d bytes, no newline)",
                    path,
                    len(complete) + 1,
                    len(tail),
                )
            with path.open("r+b") as handle:
                handle.truncate(keep)
                handle.flush()
                os.fsync(handle.fileno())
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("ab"), done
