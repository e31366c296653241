"""Check a caption against the official Ideogram 4 caption rules, and optionally ditq's stricter lint rules.

    >>> validate_caption('{"compositional_deconstruction":{"background":"sky","elements":[]}}')
    []
    >>> [str(p) for p in validate_caption('{"compositional_deconstruction":{"background":"sky","elements":[]}}',
    ...                                   level="lint")]
    ['$.compositional_deconstruction.elements: empty-elements: needs at least one element (lint)']

At the default `official` level a caption gets an error exactly where the official verifier warns (see
`ditq.prompts.rules`); the `lint` level adds ditq's stricter checks. Each problem names the JSON path
(`$.compositional_deconstruction.elements[2].bbox`), a rule id of `RULES` (with its source) and what was
expected. Any JSON value, parsed or as text, gives a list of problems and never an exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ditq.errors import ConfigError, InvalidInputError
from ditq.prompts import schema
from ditq.prompts.rules import LEVELS, LINT, OFFICIAL, RULES

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEX_COLOR = re.compile(r"#[0-9A-F]{6}")
# A \u escape of a code point above U+007F (the ASCII range itself may be escaped freely).
_NON_ASCII_ESCAPE = re.compile(r"\\u(?!00[0-7][0-9a-fA-F])[0-9a-fA-F]{4}")
_STYLE_TEXT_KEYS = ("aesthetics", "lighting", "photo", "medium", "art_style")


@dataclass(frozen=True)
class CaptionProblem:
    """One broken rule: where (`path`), which rule (`rule`, a key of `RULES`), a message, and the `level`
    ("official": the official verifier refuses the caption; "lint": only ditq's stricter checks do)."""

    path: str
    rule: str
    message: str
    level: str = OFFICIAL

    @property
    def source(self) -> str:
        """Where the rule comes from: "official verifier", "official prompting guide", "ditq lint", ..."""
        return RULES[self.rule].source

    def __str__(self) -> str:
        text = f"{self.path}: {self.rule}: {self.message}"
        return text if self.level == OFFICIAL else f"{text} ({self.level})"


class CaptionError(InvalidInputError, ConfigError):
    """A caption broke one or more rules; `problems` holds them all (CLI exit status 1)."""

    def __init__(self, problems: Sequence[CaptionProblem], where: str = "") -> None:
        self.problems = list(problems)
        head = f"{where}: " if where else ""
        shown = "; ".join(str(p) for p in self.problems[:5])
        more = f"; ... {len(self.problems) - 5} more" if len(self.problems) > 5 else ""
        super().__init__(f"{head}invalid caption ({len(self.problems)} problem(s)): {shown}{more}")


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
    """Parse caption text keeping key order and noting duplicate keys, as `json.loads` reads it (the last of
    a repeated key wins). Raises `ValueError` (`json.JSONDecodeError` for malformed text) or `RecursionError`."""
    if isinstance(text, bytes | bytearray):
        text = text.decode("utf-8")
    return json.loads(text, object_pairs_hook=_object_pairs)


def _printable(text: str) -> str:
    """`text` with lone surrogates (which JSON's \\ud800 escapes can produce) escaped, so it can be printed."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _child(path: str, key: Any) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    if isinstance(key, str):
        if _IDENTIFIER.fullmatch(key):
            return f"{path}.{key}"
        return f"{path}[{_printable(json.dumps(key, ensure_ascii=False))}]"
    return f"{path}[{type(key).__name__} key]"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    for kind, name in ((Mapping, "an object"), (list, "an array"), (str, "a string"), (int, "an integer")):
        if isinstance(value, kind):
            return name
    return "a number" if isinstance(value, float) else type(value).__name__


def _show(value: Any) -> str:
    """A short, safe rendering of a value for a message (containers by kind: they may be deeply nested)."""
    if isinstance(value, str | int | float | bool) or value is None:
        text = _printable(json.dumps(value, ensure_ascii=False))
        return text if len(text) <= 60 else text[:57] + "..."
    return _type_name(value)


class _Checker:
    """One pass over a parsed caption. With `full=False` it follows the official verifier exactly, including
    where it stops looking; with `full=True` it checks everything, the lint rules included."""

    def __init__(self, full: bool) -> None:
        self.full = full
        self.problems: list[CaptionProblem] = []

    def add(self, path: str, rule: str, message: str) -> None:
        self.problems.append(CaptionProblem(path, rule, message))

    def is_object(self, value: Any, path: str, what: str) -> bool:
        if not isinstance(value, Mapping):
            self.add(path, "wrong-type", f"{what} must be an object, got {_type_name(value)}")
            return False
        if self.full:
            for key in getattr(value, "duplicates", ()):
                self.add(_child(path, key), "duplicate-key", f"key {key!r} appears more than once")
        return True

    def unknown_keys(
        self, obj: Mapping, path: str, allowed: Sequence[str] | frozenset[str], where: str
    ) -> None:
        for key in obj:
            if key not in allowed:
                self.add(_child(path, key), "unknown-key", f"{_show(key)} is not a key of {where}")

    def order(self, obj: Mapping, path: str, expected: Sequence[str]) -> None:
        """Every key of `expected` present (missing-key), in that order (wrong-order)."""
        for key in expected:
            if key not in obj:
                self.add(path, "missing-key", f"{key!r} is required")
        present = [key for key in obj if key in expected]
        wanted = [key for key in expected if key in obj]
        if present != wanted:
            self.add(path, "wrong-order", f"keys are ({', '.join(present)}), expected ({', '.join(wanted)})")

    def text(self, value: Any, path: str, *, checked_type: bool) -> None:
        """A string field; `checked_type`: the official verifier checks its type (else that is lint)."""
        if not isinstance(value, str):
            if checked_type or self.full:
                rule = "wrong-type" if checked_type else "not-a-string"
                self.add(path, rule, f"expected a string, got {_type_name(value)}")
        elif self.full and not value.strip():
            self.add(path, "empty-string", "must not be empty or only whitespace")

    def palette(self, value: Any, path: str, limit: int) -> None:
        if not isinstance(value, list):
            self.add(path, "wrong-type", f"expected an array of #RRGGBB strings, got {_type_name(value)}")
            return
        if len(value) > limit:
            self.add(path, "too-many-colors", f"{len(value)} colours, at most {limit} allowed")
            if not self.full:
                return
        for i, color in enumerate(value):
            if not (isinstance(color, str) and _HEX_COLOR.fullmatch(color)):
                upper = isinstance(color, str) and _HEX_COLOR.fullmatch(color.upper())
                hint = " (use uppercase hex digits)" if upper else ""
                self.add(_child(path, i), "bad-color", f"{_show(color)} is not #RRGGBB{hint}")

    def bbox(self, value: Any, path: str) -> None:
        if not isinstance(value, list) or len(value) != 4:
            self.add(path, "bad-bbox", f"expected [y_min, x_min, y_max, x_max], got {_show(value)}")
            return
        if not all(isinstance(v, int) for v in value):  # the official check: Python counts true/false as ints
            shown = ", ".join(_show(v) for v in value)
            self.add(path, "bad-bbox", f"values must be integers, got [{shown}]")
            return
        if self.full and any(isinstance(v, bool) for v in value):
            self.add(path, "bool-in-bbox", "values must be numbers, not true/false")
        y0, x0, y1, x1 = (int(v) for v in value)
        lo, hi = schema.BBOX_MIN, schema.BBOX_MAX
        if not all(lo <= v <= hi for v in (y0, x0, y1, x1)):
            self.add(path, "bad-bbox", f"values must lie in [{lo}, {hi}], got {[y0, x0, y1, x1]}")
        for name, low, high in (("y", y0, y1), ("x", x0, x1)):
            if low > high:
                self.add(path, "bad-bbox", f"{name}_min ({low}) must not exceed {name}_max ({high})")
            elif self.full and low == high:
                self.add(path, "zero-area-bbox", f"{name}_min equals {name}_max ({low}): the box has no area")

    def caption(self, caption: Any) -> None:
        path = "$"
        if not self.is_object(caption, path, "a caption"):
            return
        self.unknown_keys(caption, path, schema.TOP_LEVEL_ORDER, "the caption")
        if self.full:
            present = [key for key in caption if key in schema.TOP_LEVEL_ORDER]
            wanted = [key for key in schema.TOP_LEVEL_ORDER if key in caption]
            if present != wanted:
                message = f"keys are ({', '.join(present)}), expected ({', '.join(wanted)})"
                self.add(path, "top-level-order", message)
        if "high_level_description" in caption:
            hld = caption["high_level_description"]
            self.text(hld, _child(path, "high_level_description"), checked_type=True)
        if "style_description" in caption:
            self.style(caption["style_description"], _child(path, "style_description"))
        if "compositional_deconstruction" in caption:
            comp = caption["compositional_deconstruction"]
            self.composition(comp, _child(path, "compositional_deconstruction"))
        else:
            self.add(path, "missing-key", "'compositional_deconstruction' is required")

    def style(self, style: Any, path: str) -> None:
        if not self.is_object(style, path, "style_description"):
            return
        self.unknown_keys(style, path, schema.STYLE_KEYS, "style_description")
        has_photo, has_art = "photo" in style, "art_style" in style
        if has_photo == has_art:
            if has_photo:
                message = (
                    "holds both 'photo' and 'art_style'; a photograph has 'photo', anything else 'art_style'"
                )
                self.add(path, "photo-and-art-style", message)
            else:
                self.add(path, "missing-key", "needs 'photo' (a photograph) or 'art_style' (anything else)")
            if not self.full:
                return
            order = tuple(k for k in schema.STYLE_ORDER_PHOTO if k != "photo")
        else:
            order = schema.STYLE_ORDER_PHOTO if has_photo else schema.STYLE_ORDER_ART
        self.order(style, path, [k for k in order if k not in schema.STYLE_OPTIONAL or k in style])
        if self.full:
            for key in _STYLE_TEXT_KEYS:
                if key in style:
                    self.text(style[key], _child(path, key), checked_type=False)
        if "color_palette" in style:
            self.palette(style["color_palette"], _child(path, "color_palette"), schema.STYLE_PALETTE_MAX)

    def composition(self, comp: Any, path: str) -> None:
        if not self.is_object(comp, path, "compositional_deconstruction"):
            return
        background = comp.get("background")
        if "background" not in comp:
            self.add(path, "missing-key", "'background' is required")
            if not self.full:
                return
        elif not isinstance(background, str):
            message = f"expected a string, got {_type_name(background)}"
            self.add(_child(path, "background"), "wrong-type", message)
            if not self.full:
                return
        else:
            self.text(background, _child(path, "background"), checked_type=True)
        if "elements" not in comp:
            self.add(path, "missing-key", "'elements' is required")
            if not self.full:
                return
        if "background" in comp and "elements" in comp:
            self.order(comp, path, schema.COMPOSITION_ORDER)
        self.unknown_keys(comp, path, schema.COMPOSITION_ORDER, "compositional_deconstruction")
        if "elements" not in comp:
            return
        elements, elements_path = comp["elements"], _child(path, "elements")
        if not isinstance(elements, list):
            self.add(
                elements_path, "wrong-type", f"expected an array of elements, got {_type_name(elements)}"
            )
            return
        if self.full and not elements:
            self.add(elements_path, "empty-elements", "needs at least one element")
        for i, element in enumerate(elements):
            self.element(element, _child(elements_path, i))

    def element(self, element: Any, path: str) -> None:
        if not self.is_object(element, path, "an element"):
            return
        self.unknown_keys(element, path, schema.ELEMENT_KEYS, "an element")
        kind = element.get("type")
        if "type" not in element:
            self.add(path, "missing-key", "'type' is required ('obj' or 'text')")
            kind = None
        elif not (isinstance(kind, str) and kind in schema.ELEMENT_ORDER):
            self.add(_child(path, "type"), "bad-element-type", f"{_show(kind)} is not 'obj' or 'text'")
            kind = None
        if kind is None and not self.full:
            return
        if kind is not None:
            order = schema.ELEMENT_ORDER[kind]
            self.order(element, path, [k for k in order if k not in schema.ELEMENT_OPTIONAL or k in element])
            for key in element:
                if key in schema.ELEMENT_KEYS and key not in order:
                    self.add(_child(path, key), "unknown-key", f"{key!r} is not a key of an {kind!r} element")
        if "bbox" in element:
            self.bbox(element["bbox"], _child(path, "bbox"))
        if self.full:
            for key in ("text", "desc"):
                if key in element:
                    self.text(element[key], _child(path, key), checked_type=False)
        if "color_palette" in element:
            self.palette(element["color_palette"], _child(path, "color_palette"), schema.ELEMENT_PALETTE_MAX)


def _parse_for_check(caption: Any) -> tuple[Any, list[CaptionProblem]]:
    """(parsed caption, problems of the text itself) for text input; (caption, []) otherwise."""
    if not isinstance(caption, str | bytes | bytearray):
        return caption, []
    problems: list[CaptionProblem] = []
    if isinstance(caption, bytes | bytearray):
        try:
            caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, [
                CaptionProblem("$", "invalid-json", f"not UTF-8 text ({exc.reason} at byte {exc.start})")
            ]
    found = _NON_ASCII_ESCAPE.findall(caption)
    if found and caption.isascii():
        examples = ", ".join(sorted(set(found))[:3])
        message = (
            f"{len(found)} \\u escape(s) of non-ASCII characters ({examples}) and no literal non-ASCII character: "
            "the text was written with ensure_ascii=True; store the characters as UTF-8 (ensure_ascii=False)"
        )
        problems.append(CaptionProblem("$", "escaped-non-ascii", message))
    try:
        return parse_caption(caption), problems
    except json.JSONDecodeError as exc:
        message = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    except RecursionError:
        message = "nested too deeply to parse"
    except ValueError as exc:  # e.g. an integer literal longer than Python's digit limit
        message = str(exc).split(";")[0]
    return None, [*problems, CaptionProblem("$", "invalid-json", message)]


def validate_caption(caption: Any, *, level: str = OFFICIAL) -> list[CaptionProblem]:
    """Every rule `caption` breaks; an empty list means it is valid at `level`.

    `caption` is a parsed object (a mapping, key order as inserted), its JSON text (`str` or UTF-8 `bytes`), or any
    other value (refused as not an object). Text is also checked for non-ASCII written only as `\\u` escapes.
    level: "official" (the default): exactly the official verifier's findings; "lint": those, then ditq's stricter
    findings (`CaptionProblem.level == "lint"`).
    """
    if level not in LEVELS:
        raise ConfigError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    parsed, problems = _parse_for_check(caption)
    if any(p.rule == "invalid-json" for p in problems):
        return problems
    official = _Checker(full=False)
    official.caption(parsed)
    problems += official.problems
    if level == LINT:
        seen = {(p.path, p.rule, p.message) for p in problems}
        full = _Checker(full=True)
        full.caption(parsed)
        for p in full.problems:
            if (p.path, p.rule, p.message) not in seen:
                seen.add((p.path, p.rule, p.message))
                problems.append(CaptionProblem(p.path, p.rule, p.message, LINT))
    return problems


def is_valid_caption(caption: Any, *, level: str = OFFICIAL) -> bool:
    """True when `validate_caption(caption, level=level)` finds nothing."""
    return not validate_caption(caption, level=level)


def check_caption(caption: Any, where: str = "", *, level: str = OFFICIAL) -> dict[str, Any]:
    """The raising variant: return the parsed caption, or raise `CaptionError` (a `ConfigError`) listing every
    problem at `level`; `where` (e.g. `"prompts.jsonl:12"`) prefixes the message."""
    problems = validate_caption(caption, level=level)
    if problems:
        raise CaptionError(problems, where)
    return parse_caption(caption) if isinstance(caption, str | bytes | bytearray) else dict(caption)


def reply_problems(text: str) -> list[CaptionProblem]:
    """Both levels' problems of a caption written by an expander's model, except what ditq's canonical
    re-serialization fixes itself (`\\u` escapes: `canonical_json` writes the characters)."""
    return [p for p in validate_caption(text, level=LINT) if p.rule != "escaped-non-ascii"]
