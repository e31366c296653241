"""Check a caption against the rules in `ditq.prompts.schema`, collecting every problem with its JSON path.

    >>> [str(p) for p in validate_caption('{"compositional_deconstruction":{"background":"sky","elements":[]}}')]
    ['$.compositional_deconstruction.elements: empty-elements: needs at least one element']

Each problem names the JSON path (`$.compositional_deconstruction.elements[2].bbox`), a rule id from `RULES` and
what was expected. Checking goes on after a problem wherever the structure still allows it, so one pass lists them
all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditq.errors import ConfigError
from ditq.prompts import schema

RULES = {
    "invalid-json": "the text is not one JSON value",
    "duplicate-key": "a key appears twice in one object",
    "wrong-type": "a value has the wrong JSON type",
    "unknown-key": "a key the caption format does not define here",
    "missing-key": "a required key is absent",
    "wrong-order": "keys are present but not in the required order",
    "photo-and-art-style": "style_description holds both 'photo' and 'art_style'",
    "empty-string": "a text field is empty or only whitespace",
    "empty-elements": "compositional_deconstruction.elements is an empty list",
    "bad-element-type": "an element's type is neither 'obj' nor 'text'",
    "bad-bbox": "a bbox is not four integers 0-1000 with y_min < y_max and x_min < x_max",
    "bad-color": "a colour is not an uppercase #RRGGBB string",
    "too-many-colors": "a palette is longer than allowed (16 for the style, 5 for an element)",
    "escaped-non-ascii": "non-ASCII written as \\u escapes (warning: the canonical form keeps the characters)",
    "duplicate-id": "two records of one file share an id (files only)",
    "missing-caption": "a record has no caption field (files only)",
}

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEX_COLOR = re.compile(schema.HEX_COLOR_PATTERN)
_NON_ASCII_ESCAPE = re.compile(r"\\u(?!00[0-7][0-9a-fA-F])[0-9a-fA-F]{4}")


@dataclass(frozen=True)
class CaptionProblem:
    """One broken rule: where (`path`), which rule (`rule`, a key of `RULES`) and a human message."""

    path: str
    rule: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        text = f"{self.path}: {self.rule}: {self.message}"
        return text if self.severity == "error" else f"{text} ({self.severity})"


class CaptionError(ConfigError):
    """A caption broke one or more rules; `problems` holds them all."""

    def __init__(self, problems: Sequence[CaptionProblem], where: str = "") -> None:
        self.problems = list(problems)
        errors = [p for p in self.problems if p.severity == "error"]
        head = f"{where}: " if where else ""
        shown = "; ".join(str(p) for p in errors[:5])
        more = f"; ... {len(errors) - 5} more" if len(errors) > 5 else ""
        super().__init__(f"{head}invalid caption ({len(errors)} problem(s)): {shown}{more}")


class _ParsedObject(dict):
    """A dict parsed from text that remembers keys which appeared twice (json keeps only the last)."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> _ParsedObject:
    obj = _ParsedObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicates = tuple(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def parse_caption(text: str | bytes) -> Any:
    """Parse caption text keeping key order and noting duplicate keys; raises `json.JSONDecodeError`."""
    if isinstance(text, bytes | bytearray):
        text = text.decode("utf-8")
    return json.loads(text, object_pairs_hook=_object_pairs)


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if _IDENTIFIER.match(key) else f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    for kind, name in (
        (Mapping, "object"),
        (list, "array"),
        (str, "string"),
        (int, "integer"),
        (float, "number"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


class _Checker:
    def __init__(self) -> None:
        self.problems: list[CaptionProblem] = []

    def add(self, path: str, rule: str, message: str, severity: str = "error") -> None:
        self.problems.append(CaptionProblem(path, rule, message, severity))

    def is_object(self, value: Any, path: str) -> bool:
        if isinstance(value, Mapping):
            for key in getattr(value, "duplicates", ()):
                self.add(_child(path, key), "duplicate-key", f"key {key!r} appears more than once")
            return True
        self.add(path, "wrong-type", f"expected an object, got {_type_name(value)}")
        return False

    def keys(
        self, obj: Mapping, path: str, order: Sequence[str], optional: frozenset[str], allowed: frozenset[str]
    ) -> None:
        """Unknown keys (outside `allowed`), missing required keys, and the order of the keys of `order` present."""
        for key in obj:
            if key not in allowed:
                self.add(
                    _child(path, key),
                    "unknown-key",
                    f"{key!r} is not a key here; allowed: {', '.join(order)}",
                )
        for key in order:
            if key not in obj and key not in optional:
                self.add(path, "missing-key", f"{key!r} is required")
        present = [key for key in obj if key in order]
        expected = [key for key in order if key in obj]
        if present != expected:
            self.add(
                path, "wrong-order", f"keys are ({', '.join(present)}), expected ({', '.join(expected)})"
            )

    def text(self, value: Any, path: str) -> None:
        if not isinstance(value, str):
            self.add(path, "wrong-type", f"expected a string, got {_type_name(value)}")
        elif not value.strip():
            self.add(path, "empty-string", "must not be empty")

    def palette(self, value: Any, path: str, limit: int) -> None:
        if not isinstance(value, list):
            self.add(path, "wrong-type", f"expected an array of #RRGGBB strings, got {_type_name(value)}")
            return
        if len(value) > limit:
            self.add(path, "too-many-colors", f"{len(value)} colours, at most {limit} allowed")
        for i, color in enumerate(value):
            if not isinstance(color, str) or not _HEX_COLOR.match(color):
                hint = (
                    " (use uppercase hex digits)"
                    if isinstance(color, str) and _HEX_COLOR.match(color.upper())
                    else ""
                )
                self.add(
                    _child(path, i),
                    "bad-color",
                    f"{json.dumps(color, ensure_ascii=False)} is not #RRGGBB{hint}",
                )

    def bbox(self, value: Any, path: str) -> None:
        if not isinstance(value, list) or len(value) != 4:
            self.add(path, "bad-bbox", "expected [y_min, x_min, y_max, x_max]")
            return
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            self.add(path, "bad-bbox", f"values must be integers, got {json.dumps(value)}")
            return
        lo, hi = schema.BBOX_MIN, schema.BBOX_MAX
        if not all(lo <= v <= hi for v in value):
            self.add(path, "bad-bbox", f"values must lie in [{lo}, {hi}], got {value}")
        y0, x0, y1, x1 = value
        if y0 >= y1:
            self.add(path, "bad-bbox", f"y_min ({y0}) must be < y_max ({y1})")
        if x0 >= x1:
            self.add(path, "bad-bbox", f"x_min ({x0}) must be < x_max ({x1})")

    def caption(self, caption: Any) -> None:
        path = "$"
        if not self.is_object(caption, path):
            return
        self.keys(
            caption,
            path,
            schema.TOP_LEVEL_ORDER,
            frozenset(schema.TOP_LEVEL_ORDER) - set(schema.TOP_LEVEL_REQUIRED),
            frozenset(schema.TOP_LEVEL_ORDER),
        )
        if "high_level_description" in caption:
            self.text(caption["high_level_description"], _child(path, "high_level_description"))
        if "style_description" in caption:
            self.style(caption["style_description"], _child(path, "style_description"))
        if "compositional_deconstruction" in caption:
            self.composition(
                caption["compositional_deconstruction"], _child(path, "compositional_deconstruction")
            )

    def style(self, style: Any, path: str) -> None:
        if not self.is_object(style, path):
            return
        has_photo, has_art = "photo" in style, "art_style" in style
        if has_photo and has_art:
            self.add(
                path,
                "photo-and-art-style",
                "holds both 'photo' and 'art_style'; a photograph has 'photo', anything else 'art_style'",
            )
            order = tuple(k for k in schema.STYLE_ORDER_PHOTO if k != "photo")
            self.keys(style, path, order, schema.STYLE_OPTIONAL, schema.STYLE_KEYS)
        elif not has_photo and not has_art:
            self.add(path, "missing-key", "needs 'photo' (a photograph) or 'art_style' (anything else)")
            order = tuple(k for k in schema.STYLE_ORDER_PHOTO if k != "photo")
            self.keys(style, path, order, schema.STYLE_OPTIONAL, schema.STYLE_KEYS)
        else:
            order = schema.STYLE_ORDER_PHOTO if has_photo else schema.STYLE_ORDER_ART
            self.keys(style, path, order, schema.STYLE_OPTIONAL, frozenset(order))
        for key in ("aesthetics", "lighting", "photo", "medium", "art_style"):
            if key in style:
                self.text(style[key], _child(path, key))
        if "color_palette" in style:
            self.palette(style["color_palette"], _child(path, "color_palette"), schema.STYLE_PALETTE_MAX)

    def composition(self, comp: Any, path: str) -> None:
        if not self.is_object(comp, path):
            return
        order = schema.COMPOSITION_ORDER
        self.keys(comp, path, order, frozenset(), frozenset(order))
        if "background" in comp:
            self.text(comp["background"], _child(path, "background"))
        if "elements" not in comp:
            return
        elements, elements_path = comp["elements"], _child(path, "elements")
        if not isinstance(elements, list):
            self.add(
                elements_path, "wrong-type", f"expected an array of elements, got {_type_name(elements)}"
            )
            return
        if not elements:
            self.add(elements_path, "empty-elements", "needs at least one element")
        for i, element in enumerate(elements):
            self.element(element, _child(elements_path, i))

    def element(self, element: Any, path: str) -> None:
        if not self.is_object(element, path):
            return
        kind = element.get("type")
        if kind not in schema.ELEMENT_ORDER:
            if "type" not in element:
                self.add(path, "missing-key", "'type' is required ('obj' or 'text')")
            else:
                self.add(
                    _child(path, "type"),
                    "bad-element-type",
                    f"{json.dumps(kind, ensure_ascii=False)} is not 'obj' or 'text'",
                )
            for key in element:
                if key not in schema.ELEMENT_KEYS:
                    self.add(_child(path, key), "unknown-key", f"{key!r} is not an element key")
        else:
            order = schema.ELEMENT_ORDER[kind]
            self.keys(element, path, order, schema.ELEMENT_OPTIONAL, frozenset(order))
        if "bbox" in element:
            self.bbox(element["bbox"], _child(path, "bbox"))
        for key in ("text", "desc"):
            if key in element:
                self.text(element[key], _child(path, key))
        if "color_palette" in element:
            self.palette(element["color_palette"], _child(path, "color_palette"), schema.ELEMENT_PALETTE_MAX)


def validate_caption(caption: Any) -> list[CaptionProblem]:
    """Every rule `caption` breaks, in document order; an empty list means it is valid.

    `caption` is a parsed object (a `dict`, key order as inserted) or its JSON text. Text is also checked for
    duplicate keys and for non-ASCII written as `\\u` escapes (a warning: `severity == "warning"`).
    """
    checker = _Checker()
    if isinstance(caption, str | bytes | bytearray):
        text = caption.decode("utf-8") if isinstance(caption, bytes | bytearray) else caption
        try:
            caption = parse_caption(text)
        except json.JSONDecodeError as exc:
            return [CaptionProblem("$", "invalid-json", f"{exc.msg} at line {exc.lineno} column {exc.colno}")]
        if _NON_ASCII_ESCAPE.search(text) and text.isascii():
            checker.add(
                "$",
                "escaped-non-ascii",
                "non-ASCII characters are written as \\u escapes; store them as UTF-8",
                severity="warning",
            )
    checker.caption(caption)
    return checker.problems


def is_valid_caption(caption: Any) -> bool:
    """True when `validate_caption` finds no error (warnings allowed)."""
    return not any(p.severity == "error" for p in validate_caption(caption))


def check_caption(caption: Any, where: str = "") -> dict[str, Any]:
    """The raising variant: return the parsed caption, or raise `CaptionError` (a `ConfigError`) listing every
    problem; `where` (e.g. `"prompts.jsonl:12"`) prefixes the message."""
    problems = validate_caption(caption)
    if any(p.severity == "error" for p in problems):
        raise CaptionError(problems, where)
    return parse_caption(caption) if isinstance(caption, str | bytes | bytearray) else dict(caption)


@dataclass(frozen=True)
class LineProblem:
    """A problem found in a JSONL file: 1-based line number, the record id when the line has one, the problem."""

    line: int
    record_id: str
    problem: CaptionProblem


def validate_caption_file(path: str | Path, field: str = "caption") -> Iterator[LineProblem]:
    """Every problem in a JSONL file of captions, line by line; paths are relative to each caption.

    A line is either a caption itself or a record (an object with an `id`) whose `field` holds the caption, as an
    object or as JSON text. Malformed lines and repeated ids are reported too; reading goes on to the end.
    """
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    first_seen: dict[str, int] = {}
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = parse_caption(line)
            except json.JSONDecodeError as exc:
                yield LineProblem(
                    number, "", CaptionProblem("$", "invalid-json", f"{exc.msg} at column {exc.colno}")
                )
                continue
            record_id = obj.get("id") if isinstance(obj, Mapping) and isinstance(obj.get("id"), str) else ""
            if record_id:
                if record_id in first_seen:
                    message = f"id {record_id!r} already used on line {first_seen[record_id]}"
                    yield LineProblem(number, record_id, CaptionProblem("$.id", "duplicate-id", message))
                else:
                    first_seen[record_id] = number
            if isinstance(obj, Mapping) and field in obj:
                caption = obj[field]
            elif record_id:
                yield LineProblem(
                    number,
                    record_id,
                    CaptionProblem("$", "missing-caption", f"record has no {field!r} field"),
                )
                continue
            else:
                caption = obj
            for problem in validate_caption(caption):
                yield LineProblem(number, record_id, problem)
