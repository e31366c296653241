"""Validate a JSONL file of captions line by line (`ditq captions validate`).

A line is either a caption itself or a record (an object with an `id`) whose `field` holds the caption, as an
object or as JSON text. A caption given as text is checked as text (the official verifier's `\\u`-escape rule
applies to it); one given as an object is checked as the object ditq will serialize itself. Malformed lines and
repeated ids are reported too; reading goes on to the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ditq.errors import ConfigError
from ditq.prompts.rules import LINT, OFFICIAL
from ditq.prompts.validate import CaptionProblem, parse_caption, validate_caption


@dataclass(frozen=True)
class LineProblem:
    """A problem found in a JSONL file: 1-based line number, the record id when the line has one, the problem."""

    line: int
    record_id: str
    problem: CaptionProblem


def validate_caption_file(
    path: str | Path, field: str = "caption", *, level: str = LINT
) -> Iterator[LineProblem]:
    """Every problem in a JSONL file of captions, line by line, at `level` (default: both levels, each problem
    carrying its own `level`); paths are relative to each caption."""
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    first_seen: dict[str, int] = {}
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = parse_caption(line.encode("utf-8", "surrogateescape"))
            except (ValueError, RecursionError):
                # The line is not JSON: validating it as caption text gives the precise reason.
                for problem in validate_caption(line.encode("utf-8", "surrogateescape"), level=level):
                    yield LineProblem(number, "", problem)
                continue
            record_id = obj.get("id") if isinstance(obj, Mapping) and isinstance(obj.get("id"), str) else ""
            if record_id:
                if record_id in first_seen:
                    message = f"id {record_id!r} already used on line {first_seen[record_id]}"
                    yield LineProblem(
                        number, record_id, CaptionProblem("$.id", "duplicate-id", message, OFFICIAL)
                    )
                else:
                    first_seen[record_id] = number
            if isinstance(obj, Mapping) and field in obj:
                caption = obj[field]
            elif record_id:
                message = f"record has no {json.dumps(field)} field"
                yield LineProblem(
                    number, record_id, CaptionProblem("$", "missing-caption", message, OFFICIAL)
                )
                continue
            else:
                caption = line  # the line is the caption: check its text
            for problem in validate_caption(caption, level=level):
                yield LineProblem(number, record_id, problem)
