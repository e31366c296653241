"""Reading the JSON files ditq is handed (configs, `model_index.json`, tokenizer files, `ditq.json`, `run.json`,
manifests): every failure is one `DitqError` whose message starts with the path and says what was expected.

    read_json(folder / "model_index.json", "a diffusers pipeline index")   -> dict
    read_jsonl(run_dir / "manifest.jsonl", "a run manifest", torn_tail=True) -> [(line number, dict), ...]
    get_field(obj, "_class_name", str, where)                               -> the value, or the error

Missing files, unreadable files (a folder, no permission), bytes that are not UTF-8, invalid JSON (with its line
and column), a top level of the wrong type (a list where an object is expected) and fields of the wrong type become
`CheckpointError` (or the `error` class a caller names, e.g. a run-folder error). Parsing is the standard library's
(NaN and Infinity are read as json.dumps writes them); the strict parser of safetensors headers is separate.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ditq.errors import CheckpointError, DitqError

log = logging.getLogger(__name__)

_KIND = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
}
_TYPE_NAME = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}


def kind_name(value: Any) -> str:
    """The JSON name of a parsed value's type: object, array, string, integer, number, boolean or null."""
    if value is None:
        return "null"
    for t in (bool, int, float, str, list, dict):
        if isinstance(value, t):
            return _TYPE_NAME[t]
    return type(value).__name__


def _is(value: Any, expect: type | tuple[type, ...]) -> bool:
    kinds = expect if isinstance(expect, tuple) else (expect,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # true/false is not an integer or a number here
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


def _expected(expect: type | tuple[type, ...]) -> str:
    kinds = expect if isinstance(expect, tuple) else (expect,)
    return " or ".join(_KIND.get(k, k.__name__) for k in kinds)


def parse_json(
    path: str | os.PathLike,
    raw: bytes | str,
    what: str,
    expect: type | tuple[type, ...] | None = dict,
    error: type[DitqError] = CheckpointError,
) -> Any:
    """`raw` (the content of `path`) parsed as JSON whose top level is `expect` (None: any value)."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{path}: not UTF-8 text (byte {exc.start}); expected {what} in JSON") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise error(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); expected {what}"
        ) from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to read; expected {what}") from None
    if expect is not None and not _is(data, expect):
        raise error(f"{path}: top level is a JSON {kind_name(data)}, expected {what} as {_expected(expect)}")
    return data


def read_bytes(path: str | os.PathLike, what: str, error: type[DitqError] = CheckpointError) -> bytes:
    """The bytes of `path`; a missing or unreadable file is `error` naming it."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such file; expected {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder; expected {what} (a JSON file)") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc}); expected {what}") from None


def read_json(
    path: str | os.PathLike,
    what: str,
    expect: type | tuple[type, ...] | None = dict,
    error: type[DitqError] = CheckpointError,
) -> Any:
    """The JSON value in `path`, whose top level must be `expect` (default an object; None: any value).

    `what` names the file's role for the message, e.g. "a diffusers pipeline index"."""
    return parse_json(path, read_bytes(path, what, error), what, expect, error)


def read_jsonl(
    path: str | os.PathLike,
    what: str,
    error: type[DitqError] = CheckpointError,
    torn_tail: bool = False,
) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON-lines file; each line must be an object.

    `torn_tail` tolerates (with a warning) a last line that does not parse: what a process killed in the middle of
    an append leaves. Any other bad line is `error` naming the file and line."""
    path = Path(path)
    lines = read_bytes(path, what, error).split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            if torn_tail and number == len(lines):
                log.warning("%s: ignoring a torn last line (an interrupted write)", path)
                continue
            if isinstance(exc, UnicodeDecodeError):
                raise error(f"{where}: not UTF-8 text (byte {exc.start}); expected {what}") from None
            reason = (
                f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "too deep"
            )
            raise error(f"{where}: not valid JSON ({reason}); expected {what}, one object per line") from None
        if not isinstance(record, dict):
            raise error(f"{where}: a JSON {kind_name(record)}, expected {what}, one object per line")
        out.append((number, record))
    return out


_REQUIRED = object()


def get_field(
    obj: dict[str, Any],
    name: str,
    expect: type | tuple[type, ...],
    where: str,
    default: Any = _REQUIRED,
    error: type[DitqError] = CheckpointError,
) -> Any:
    """`obj[name]`, which must be `expect` (bool is never an integer); `default` when absent, else `error`.

    `where` starts the message: the path, or the path and line."""
    if name not in obj:
        if default is _REQUIRED:
            raise error(f"{where}: field {name!r} is missing; expected {_expected(expect)}")
        return default
    value = obj[name]
    if not _is(value, expect):
        raise error(
            f"{where}: field {name!r} is a JSON {kind_name(value)} ({_short(value)}), expected {_expected(expect)}"
        )
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["get_field", "kind_name", "parse_json", "read_bytes", "read_json", "read_jsonl"]
