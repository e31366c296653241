"""The rules of Ideogram 4's native JSON caption, in one place.

A caption is one JSON object (sent to the model as a minified string)::

    {"high_level_description": str,                      optional
     "style_description": {                              optional
         "aesthetics": str, "lighting": str,
         "photo": str, "medium": str,                    a photograph ...
         # or "medium": str, "art_style": str,           ... anything else (never both photo and art_style)
         "color_palette": ["#RRGGBB", ...]},             optional, at most 16, always last
     "compositional_deconstruction": {                   required
         "background": str,
         "elements": [                                   may be empty (lint: at least one)
             {"type": "obj", "bbox": [y0, x0, y1, x1], "desc": str, "color_palette": [...]},
             {"type": "text", "bbox": [...], "text": str, "desc": str, "color_palette": [...]}]}}

Key order matters (the model was trained on one order): every object lists its keys exactly in the orders below.
`bbox` is `[y_min, x_min, y_max, x_max]`, integers on a 0-1000 grid with min <= max; element palettes hold at most
5 colours, all uppercase `#RRGGBB`.

`ditq.prompts.validate` checks these at two levels (`ditq.prompts.rules` lists every rule and its source): the
official caption verifier's rules, and ditq's stricter lint rules (top-level key order, strings that are strings
and not blank, at least one element, boxes with an area).

`caption_json_schema()` expresses the lint level as a draft 2020-12 JSON Schema for structured-output APIs, except
key order and min < max, which JSON Schema cannot state: `ditq.prompts.validate` checks them.
"""

from __future__ import annotations

import json
from typing import Any

TOP_LEVEL_ORDER = ("high_level_description", "style_description", "compositional_deconstruction")
TOP_LEVEL_REQUIRED = ("compositional_deconstruction",)

STYLE_ORDER_PHOTO = ("aesthetics", "lighting", "photo", "medium", "color_palette")
STYLE_ORDER_ART = ("aesthetics", "lighting", "medium", "art_style", "color_palette")
STYLE_KEYS = frozenset(STYLE_ORDER_PHOTO) | frozenset(STYLE_ORDER_ART)
STYLE_OPTIONAL = frozenset({"color_palette"})

COMPOSITION_ORDER = ("background", "elements")

ELEMENT_ORDER = {
    "obj": ("type", "bbox", "desc", "color_palette"),
    "text": ("type", "bbox", "text", "desc", "color_palette"),
}
ELEMENT_OPTIONAL = frozenset({"bbox", "color_palette"})
ELEMENT_KEYS = frozenset(ELEMENT_ORDER["text"])

BBOX_MIN = 0
BBOX_MAX = 1000
STYLE_PALETTE_MAX = 16
ELEMENT_PALETTE_MAX = 5
HEX_COLOR_PATTERN = "^#[0-9A-F]{6}$"

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def canonical_json(caption: Any) -> str:
    """The one serialization ditq feeds the model and stores: minified, keys in the order given, non-ASCII kept.

    A string is parsed first, so `canonical_json(canonical_json(c)) == canonical_json(c)`.
    """
    if isinstance(caption, bytes | bytearray):
        caption = caption.decode("utf-8")
    if isinstance(caption, str):
        caption = json.loads(caption)
    return json.dumps(caption, separators=(",", ":"), ensure_ascii=False)


def _string(min_length: int = 1, max_length: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": min_length}
    if max_length is not None:
        schema["maxLength"] = max_length
    return schema


def _palette(max_items: int) -> dict[str, Any]:
    return {"type": "array", "items": {"$ref": "#/$defs/hex_color"}, "maxItems": max_items}


def _style(kind_key: str, order: tuple[str, ...]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for key in order:
        properties[key] = {"$ref": "#/$defs/palette16"} if key == "color_palette" else _string()
    return {
        "type": "object",
        "properties": properties,
        "required": [key for key in order if key not in STYLE_OPTIONAL],
        "additionalProperties": False,
        "description": f"style of {'a photograph' if kind_key == 'photo' else 'any non-photographic image'}",
    }


def _element(kind: str) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for key in ELEMENT_ORDER[kind]:
        if key == "type":
            properties[key] = {"const": kind}
        elif key == "bbox":
            properties[key] = {"$ref": "#/$defs/bbox"}
        elif key == "color_palette":
            properties[key] = {"$ref": "#/$defs/palette5"}
        else:
            properties[key] = _string()
    return {
        "type": "object",
        "properties": properties,
        "required": [key for key in ELEMENT_ORDER[kind] if key not in ELEMENT_OPTIONAL],
        "additionalProperties": False,
    }


def caption_json_schema() -> dict[str, Any]:
    """A draft 2020-12 JSON Schema of the caption, for `response_format` of structured-output chat APIs.

    Alternatives use `anyOf` (more servers accept it than `oneOf`; the branches are disjoint anyway). The
    `properties` are listed in the required key order, which constrained decoders such as outlines follow, but the
    order itself is checked only by `ditq.prompts.validate_caption`. `min < max` inside a bbox is not expressible
    either and is likewise left to the validator.
    """
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "Ideogram 4 structured caption",
        "type": "object",
        "properties": {
            "high_level_description": _string(),
            "style_description": {"anyOf": [{"$ref": "#/$defs/style_photo"}, {"$ref": "#/$defs/style_art"}]},
            "compositional_deconstruction": {
                "type": "object",
                "properties": {
                    "background": _string(),
                    "elements": {
                        "type": "array",
                        "items": {
                            "anyOf": [{"$ref": "#/$defs/obj_element"}, {"$ref": "#/$defs/text_element"}]
                        },
                        "minItems": 1,
                    },
                },
                "required": list(COMPOSITION_ORDER),
                "additionalProperties": False,
            },
        },
        "required": list(TOP_LEVEL_REQUIRED),
        "additionalProperties": False,
        "$defs": {
            "hex_color": {"type": "string", "pattern": HEX_COLOR_PATTERN},
            "palette16": _palette(STYLE_PALETTE_MAX),
            "palette5": _palette(ELEMENT_PALETTE_MAX),
            "bbox": {
                "type": "array",
                "description": "[y_min, x_min, y_max, x_max] on a 0-1000 grid, min < max",
                "items": {"type": "integer", "minimum": BBOX_MIN, "maximum": BBOX_MAX},
                "minItems": 4,
                "maxItems": 4,
            },
            "style_photo": _style("photo", STYLE_ORDER_PHOTO),
            "style_art": _style("art_style", STYLE_ORDER_ART),
            "obj_element": _element("obj"),
            "text_element": _element("text"),
        },
    }


def _generation_string(max_length: int | None) -> dict[str, Any]:
    # Raw JSON text between the quotes: a non-space first character, then characters or simple escapes. No bare
    # quote, backslash or control character can appear, so the text always parses and is never blank.
    rest = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt])'
    count = "*" if max_length is None else f"{{0,{max(max_length - 1, 0)}}}"
    return {"type": "string", "pattern": rf'[^"\\\x00-\x1f\s]{rest}{count}'}


def generation_json_schema(
    *,
    max_string_length: int | None = None,
    max_elements: int | None = None,
    style: bool = True,
    palettes: bool = True,
) -> dict[str, Any]:
    """A JSON Schema for constrained decoding (outlines) whose every output passes the validator.

    Differences from `caption_json_schema`: `properties` are listed in the required key order (constrained decoders
    emit them in that order, so order holds by construction); strings are patterns that cannot be blank; `bbox` is
    left out (integer bounds and min < max are not enforced by decoders); `max_string_length` and `max_elements`
    bound the output so that generation ends within a token budget even for a model with random weights.
    """
    text = _generation_string(max_string_length)
    color = {"type": "string", "pattern": HEX_COLOR_PATTERN.strip("^$")}

    def palette(limit: int) -> dict[str, Any]:
        return {"type": "array", "items": color, "maxItems": limit}

    def style_variant(order: tuple[str, ...]) -> dict[str, Any]:
        keys = [k for k in order if palettes or k != "color_palette"]
        props = {k: palette(STYLE_PALETTE_MAX) if k == "color_palette" else text for k in keys}
        return {
            "type": "object",
            "properties": props,
            "required": [k for k in keys if k not in STYLE_OPTIONAL],
        }

    def element(kind: str) -> dict[str, Any]:
        keys = [k for k in ELEMENT_ORDER[kind] if k != "bbox" and (palettes or k != "color_palette")]
        props: dict[str, Any] = {}
        for key in keys:
            props[key] = (
                {"const": kind}
                if key == "type"
                else palette(ELEMENT_PALETTE_MAX)
                if key == "color_palette"
                else text
            )
        return {
            "type": "object",
            "properties": props,
            "required": [k for k in keys if k not in ELEMENT_OPTIONAL],
        }

    elements: dict[str, Any] = {
        "type": "array",
        "items": {"anyOf": [element("obj"), element("text")]},
        "minItems": 1,
    }
    if max_elements is not None:
        elements["maxItems"] = max_elements
    properties: dict[str, Any] = {"high_level_description": text}
    if style:
        properties["style_description"] = {
            "anyOf": [style_variant(STYLE_ORDER_PHOTO), style_variant(STYLE_ORDER_ART)]
        }
    properties["compositional_deconstruction"] = {
        "type": "object",
        "properties": {"background": text, "elements": elements},
        "required": list(COMPOSITION_ORDER),
    }
    return {
        "type": "object",
        "properties": properties,
        "required": ["high_level_description", "compositional_deconstruction"],
    }
