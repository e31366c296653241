"""The caption rules ditq checks, each with the source it comes from.

Two levels:

- **official**: exactly what the official Ideogram 4 caption verifier (`ideogram-oss/ideogram4`,
  `src/ideogram4/caption_verifier.py`) warns about. The official pipeline refuses a caption with any warning by
  default (`raise_on_caption_issues=True`), so ditq reports each of them as an error.
- **lint**: ditq's stricter checks on top (`ditq captions validate --strict` makes them errors): rules the official
  prompting guide states but the verifier does not check, habits that keep captions useful (no blank strings, at
  least one element, boxes with an area), and the official rules applied past the point where the official
  verifier stops looking (it returns early after, for example, a style holding both `photo` and `art_style`).

`source` says where a rule comes from: "official verifier", "official prompting guide", "ditq lint", or
"ditq records" for the rules of ditq's own JSONL record files.
"""

from __future__ import annotations

from dataclasses import dataclass

OFFICIAL = "official"
LINT = "lint"
LEVELS = (OFFICIAL, LINT)

VERIFIER = "official verifier"
GUIDE = "official prompting guide"
DITQ_LINT = "ditq lint"
DITQ_RECORDS = "ditq records"


@dataclass(frozen=True)
class Rule:
    """One rule: its id (used in every problem), what it requires, and where the requirement comes from."""

    id: str
    description: str
    source: str


_RULES = (
    # The official verifier's rules.
    Rule("invalid-json", "the text is one JSON value", VERIFIER),
    Rule(
        "escaped-non-ascii",
        "non-ASCII characters are stored as UTF-8, not only as \\u escapes (a text with \\u escapes of "
        "non-ASCII characters and no literal non-ASCII character is refused)",
        VERIFIER,
    ),
    Rule(
        "wrong-type",
        "the caption, style_description, compositional_deconstruction and each element are objects; "
        "elements and palettes are arrays; high_level_description and background are strings",
        VERIFIER,
    ),
    Rule("unknown-key", "every key is one the caption format defines at that place", VERIFIER),
    Rule(
        "missing-key",
        "compositional_deconstruction with background and elements; a style with photo or art_style has every "
        "key of its order; an element has type and desc, a text element also text",
        VERIFIER,
    ),
    Rule(
        "wrong-order", "keys of the style, the composition and each element in the required order", VERIFIER
    ),
    Rule("photo-and-art-style", "style_description holds 'photo' or 'art_style', never both", VERIFIER),
    Rule("bad-element-type", "an element's type is 'obj' or 'text'", VERIFIER),
    Rule(
        "bad-bbox",
        "a bbox is four integers in 0-1000, [y_min, x_min, y_max, x_max] with y_min <= y_max and x_min <= x_max",
        VERIFIER,
    ),
    Rule("bad-color", "a colour is an uppercase #RRGGBB string", VERIFIER),
    Rule("too-many-colors", "at most 16 colours in the style palette and 5 in an element palette", VERIFIER),
    # Stricter rules (lint level).
    Rule(
        "top-level-order",
        "top-level keys in the order high_level_description, style_description, compositional_deconstruction",
        GUIDE,
    ),
    Rule(
        "not-a-string",
        "aesthetics, lighting, photo, medium, art_style, desc and text are strings (the verifier does not "
        "check their type)",
        GUIDE,
    ),
    Rule("duplicate-key", "no key appears twice in one object (JSON parsers keep only the last)", DITQ_LINT),
    Rule("empty-string", "no text field is empty or only whitespace", DITQ_LINT),
    Rule("empty-elements", "compositional_deconstruction.elements holds at least one element", DITQ_LINT),
    Rule("zero-area-bbox", "a bbox has an area: y_min < y_max and x_min < x_max", DITQ_LINT),
    Rule(
        "bool-in-bbox", "bbox values are JSON numbers, not true/false (which Python counts as 1/0)", DITQ_LINT
    ),
    # Record files.
    Rule("duplicate-id", "the records of one file have distinct ids", DITQ_RECORDS),
    Rule("missing-caption", "a record has the caption field", DITQ_RECORDS),
)

RULES: dict[str, Rule] = {rule.id: rule for rule in _RULES}
