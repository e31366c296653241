"""The caption validator, rule by rule, both ways: each official rule refuses a broken caption and accepts its
fixed twin; the lint level adds ditq's stricter rules. Cases are written from the rules (see ditq.prompts.rules)
on a hand-made bakery poster, not taken from the suite."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from ditq.errors import ConfigError
from ditq.prompts import (
    RULES,
    CaptionError,
    canonical_json,
    caption_json_schema,
    check_caption,
    is_valid_caption,
    validate_caption,
)
from ditq.prompts.rules import DITQ_LINT, GUIDE, VERIFIER
from ditq.prompts.validate import reply_problems


def official_examples() -> list[str]:
    """The worked example outputs in the system message diffusers ships for Ideogram 4's prompt enhancer."""
    from diffusers.pipelines.ideogram4.prompt_enhancer import CAPTION_SYSTEM_MESSAGE

    return [
        line.removeprefix("Output: ")
        for line in CAPTION_SYSTEM_MESSAGE.splitlines()
        if line.startswith("Output: ")
    ]


POSTER = {
    "high_level_description": "A bakery window poster announcing fresh croissants, a flat illustration.",
    "style_description": {
        "aesthetics": "warm, friendly, hand-drawn",
        "lighting": "flat even light",
        "medium": "digital illustration",
        "art_style": "flat vector shapes with a paper grain",
        "color_palette": ["#F4E1C1", "#B5651D", "#3B2F2F"],
    },
    "compositional_deconstruction": {
        "background": "A cream paper backdrop with a thin brown border.",
        "elements": [
            {"type": "obj", "bbox": [300, 250, 750, 750], "desc": "A golden croissant, slightly tilted."},
            {
                "type": "text",
                "bbox": [80, 150, 220, 850],
                "text": "FRESH TODAY",
                "desc": "Bold brown capitals across the top.",
                "color_palette": ["#3B2F2F"],
            },
        ],
    },
}
PHOTO_STYLE = {
    "aesthetics": "crisp",
    "lighting": "window light",
    "photo": "50mm, eye level",
    "medium": "photograph",
}
CD = "$.compositional_deconstruction"
SD = "$.style_description"
E0, E1 = f"{CD}.elements[0]", f"{CD}.elements[1]"


def edit(path: list, value=None, *, delete: bool = False, base: dict = POSTER) -> dict:
    caption = copy.deepcopy(base)
    target = caption
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return caption


def ordered(obj: dict, keys: list[str]) -> dict:
    return {k: obj[k] for k in keys}


def elements_edit(i: int, key: str, value=None, *, delete: bool = False) -> dict:
    return edit(["compositional_deconstruction", "elements", i, key], value, delete=delete)


def found(problems) -> set[tuple[str, str]]:
    return {(p.path, p.rule) for p in problems}


# (name, refused caption, (path, rule) it must report, accepted twin): every official rule, both ways.
OFFICIAL = [
    ("root not an object", [POSTER], ("$", "wrong-type"), POSTER),
    ("unknown root key", edit(["aspect_ratio"], "16:9"), ("$.aspect_ratio", "unknown-key"), POSTER),
    (
        "no composition",
        edit(["compositional_deconstruction"], delete=True),
        ("$", "missing-key"),
        {"compositional_deconstruction": POSTER["compositional_deconstruction"]},
    ),
    (
        "description not a string",
        edit(["high_level_description"], ["a", "b"]),
        ("$.high_level_description", "wrong-type"),
        edit(["high_level_description"], delete=True),
    ),
    ("style not an object", edit(["style_description"], "flat"), (SD, "wrong-type"), edit(["style_description"], delete=True)),
    ("unknown style key", edit(["style_description", "mood"], "calm"), (f"{SD}.mood", "unknown-key"), POSTER),
    (
        "photo and art_style",
        edit(["style_description", "photo"], "35mm"),
        (SD, "photo-and-art-style"),
        edit(["style_description"], PHOTO_STYLE),
    ),
    (
        "neither photo nor art_style",
        edit(["style_description", "art_style"], delete=True),
        (SD, "missing-key"),
        edit(["style_description"], PHOTO_STYLE),
    ),
    (
        "art style without aesthetics",
        edit(["style_description", "aesthetics"], delete=True),
        (SD, "missing-key"),
        edit(["style_description", "color_palette"], delete=True),  # the palette is the one optional style key
    ),
    (
        "photo style out of order",
        edit(["style_description"], ordered(PHOTO_STYLE, ["aesthetics", "photo", "lighting", "medium"])),
        (SD, "wrong-order"),
        edit(["style_description"], PHOTO_STYLE),
    ),
    (
        "palette before art_style",
        edit(
            ["style_description"],
            ordered(
                POSTER["style_description"], ["aesthetics", "lighting", "medium", "color_palette", "art_style"]
            ),
        ),
        (SD, "wrong-order"),
        POSTER,
    ),
    ("composition not an object", edit(["compositional_deconstruction"], []), (CD, "wrong-type"), POSTER),
    (
        "no background",
        edit(["compositional_deconstruction", "background"], delete=True),
        (CD, "missing-key"),
        edit(["compositional_deconstruction", "background"], ""),  # blank is lint, not official
    ),
    (
        "background a number",
        edit(["compositional_deconstruction", "background"], 3),
        (f"{CD}.background", "wrong-type"),
        POSTER,
    ),
    (
        "no elements",
        edit(["compositional_deconstruction", "elements"], delete=True),
        (CD, "missing-key"),
        edit(["compositional_deconstruction", "elements"], []),  # empty is lint, not official
    ),
    (
        "elements before background",
        edit(
            ["compositional_deconstruction"],
            ordered(POSTER["compositional_deconstruction"], ["elements", "background"]),
        ),
        (CD, "wrong-order"),
        POSTER,
    ),
    (
        "unknown composition key",
        edit(["compositional_deconstruction", "foreground"], "steam"),
        (f"{CD}.foreground", "unknown-key"),
        POSTER,
    ),
    ("elements an object", edit(["compositional_deconstruction", "elements"], {"0": {}}), (f"{CD}.elements", "wrong-type"), POSTER),
    ("element a string", edit(["compositional_deconstruction", "elements", 0], "croissant"), (E0, "wrong-type"), POSTER),
    ("unknown element key", elements_edit(1, "font", "Futura"), (f"{E1}.font", "unknown-key"), POSTER),
    ("text key on an obj", elements_edit(0, "text", "CROISSANT"), (f"{E0}.text", "unknown-key"), POSTER),
    ("element without type", elements_edit(0, "type", delete=True), (E0, "missing-key"), POSTER),
    ("element type 'image'", elements_edit(0, "type", "image"), (f"{E0}.type", "bad-element-type"), POSTER),
    ("element type a list", elements_edit(0, "type", ["obj"]), (f"{E0}.type", "bad-element-type"), POSTER),
    ("element type an object", elements_edit(0, "type", {"obj": 1}), (f"{E0}.type", "bad-element-type"), POSTER),
    ("obj without desc", elements_edit(0, "desc", delete=True), (E0, "missing-key"), elements_edit(0, "bbox", delete=True)),
    (
        "text without text",
        elements_edit(1, "text", delete=True),
        (E1, "missing-key"),
        elements_edit(1, "color_palette", delete=True),
    ),
    (
        "text element out of order",
        edit(
            ["compositional_deconstruction", "elements", 1],
            ordered(
                POSTER["compositional_deconstruction"]["elements"][1],
                ["type", "text", "bbox", "desc", "color_palette"],
            ),
        ),
        (E1, "wrong-order"),
        POSTER,
    ),
    ("bbox of five", elements_edit(0, "bbox", [1, 2, 3, 4, 5]), (f"{E0}.bbox", "bad-bbox"), POSTER),
    ("bbox of strings", elements_edit(0, "bbox", ["0", "0", "9", "9"]), (f"{E0}.bbox", "bad-bbox"), POSTER),
    ("bbox of floats", elements_edit(0, "bbox", [0.5, 0, 10, 10]), (f"{E0}.bbox", "bad-bbox"), POSTER),
    ("bbox below 0", elements_edit(0, "bbox", [-1, 0, 10, 10]), (f"{E0}.bbox", "bad-bbox"), elements_edit(0, "bbox", [0, 0, 1000, 1000])),
    ("bbox y_min > y_max", elements_edit(0, "bbox", [501, 0, 500, 10]), (f"{E0}.bbox", "bad-bbox"), elements_edit(0, "bbox", [500, 0, 500, 10])),
    ("bbox x_min > x_max", elements_edit(0, "bbox", [0, 11, 10, 10]), (f"{E0}.bbox", "bad-bbox"), elements_edit(0, "bbox", [0, 10, 10, 10])),
    ("palette a string", edit(["style_description", "color_palette"], "#B5651D"), (f"{SD}.color_palette", "wrong-type"), POSTER),
    ("lowercase colour", edit(["style_description", "color_palette"], ["#b5651d"]), (f"{SD}.color_palette[0]", "bad-color"), edit(["style_description", "color_palette"], ["#B5651D"])),
    ("colour with a newline", elements_edit(1, "color_palette", ["#3B2F2F\n"]), (f"{E1}.color_palette[0]", "bad-color"), POSTER),
    ("colour name", elements_edit(1, "color_palette", ["brown"]), (f"{E1}.color_palette[0]", "bad-color"), POSTER),
    ("colour a number", elements_edit(1, "color_palette", [3879727]), (f"{E1}.color_palette[0]", "bad-color"), POSTER),
    ("17 style colours", edit(["style_description", "color_palette"], ["#000000"] * 17), (f"{SD}.color_palette", "too-many-colors"), edit(["style_description", "color_palette"], ["#000000"] * 16)),
    ("6 element colours", elements_edit(1, "color_palette", ["#FFFFFF"] * 6), (f"{E1}.color_palette", "too-many-colors"), elements_edit(1, "color_palette", ["#FFFFFF"] * 5)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "refused", "expected", "accepted"), OFFICIAL, ids=[c[0] for c in OFFICIAL])
def test_official_rule_both_ways(name, refused, expected, accepted):
    problems = validate_caption(refused)
    assert expected in found(problems), [str(p) for p in problems]
    assert all(p.level == "official" and p.source == VERIFIER for p in problems)
    assert validate_caption(json.dumps(refused, ensure_ascii=False)) == problems  # text reads the same
    assert validate_caption(accepted) == [], [str(p) for p in validate_caption(accepted)]


def test_every_official_rule_has_a_case():
    official_rules = {rule.id for rule in RULES.values() if rule.source == VERIFIER}
    covered = {rule for _name, _caption, (_path, rule), _ok in OFFICIAL} | {
        "invalid-json",
        "escaped-non-ascii",
    }
    assert covered == official_rules


def test_official_examples_pass_both_levels():
    examples = official_examples()
    assert len(examples) == 2
    for text in examples:
        assert validate_caption(text, level="lint") == []
        assert validate_caption(json.loads(text), level="lint") == []
    assert validate_caption(POSTER, level="lint") == []


def test_invalid_json_text_both_ways():
    text = canonical_json(POSTER)
    assert found(validate_caption(text[:-1])) == {("$", "invalid-json")}
    assert validate_caption(text) == []
    assert found(validate_caption(b"\xff" + text.encode())) == {("$", "invalid-json")}
    assert found(validate_caption("[" * 100_000)) == {
        ("$", "invalid-json")
    }  # too deep for json: no traceback
    assert found(validate_caption('{"a": ' + "9" * 5000 + "}")) == {
        ("$", "invalid-json")
    }  # over Python's digit limit


def test_escaped_non_ascii_both_ways():
    caption = edit(["compositional_deconstruction", "elements", 1, "text"], "CRÈME BRÛLÉE")
    escaped = json.dumps(caption)  # ensure_ascii=True: \u00c8 ...
    assert "\\u00c8" in escaped and escaped.isascii()
    problems = validate_caption(escaped)
    assert [(p.path, p.rule, p.level) for p in problems] == [("$", "escaped-non-ascii", "official")]
    assert "3 \\u escape(s)" in problems[0].message and "ensure_ascii=False" in problems[0].message
    assert not is_valid_caption(escaped)
    assert validate_caption(json.dumps(caption, ensure_ascii=False)) == []
    # ASCII may be escaped freely; escapes beside literal non-ASCII are taken as intended (the verifier's rule).
    assert validate_caption(json.dumps(POSTER).replace("A bakery", "\\u0041 bakery")) == []
    mixed = json.dumps(caption).replace("A bakery", "A bakery · 今日")
    assert validate_caption(mixed) == []
    # An expander re-serializes its model's reply canonically, which writes the characters: not its problem.
    assert reply_problems(escaped) == []
    assert validate_caption(canonical_json(json.loads(escaped))) == []


# What the official verifier accepts but ditq's lint level flags: (name, caption, (path, rule), source).
LINT = [
    ("empty elements", edit(["compositional_deconstruction", "elements"], []), (f"{CD}.elements", "empty-elements"), DITQ_LINT),
    ("zero-height box", elements_edit(0, "bbox", [400, 100, 400, 900]), (f"{E0}.bbox", "zero-area-bbox"), DITQ_LINT),
    ("boolean box", elements_edit(0, "bbox", [False, False, True, True]), (f"{E0}.bbox", "bool-in-bbox"), DITQ_LINT),
    ("top-level order", ordered(POSTER, ["compositional_deconstruction", "style_description", "high_level_description"]), ("$", "top-level-order"), GUIDE),
    ("desc a number", elements_edit(0, "desc", 5), (f"{E0}.desc", "not-a-string"), GUIDE),
    ("text null", elements_edit(1, "text", None), (f"{E1}.text", "not-a-string"), GUIDE),
    ("aesthetics a list", edit(["style_description", "aesthetics"], ["warm"]), (f"{SD}.aesthetics", "not-a-string"), GUIDE),
    ("blank description", edit(["high_level_description"], " "), ("$.high_level_description", "empty-string"), DITQ_LINT),
    ("blank background", edit(["compositional_deconstruction", "background"], ""), (f"{CD}.background", "empty-string"), DITQ_LINT),
    ("blank text", elements_edit(1, "text", "\n"), (f"{E1}.text", "empty-string"), DITQ_LINT),
]  # fmt: skip


@pytest.mark.parametrize(("name", "caption", "expected", "source"), LINT, ids=[c[0] for c in LINT])
def test_lint_rule_official_accepts_lint_flags(name, caption, expected, source):
    assert validate_caption(caption) == []
    assert is_valid_caption(caption) and not is_valid_caption(caption, level="lint")
    problems = validate_caption(caption, level="lint")
    assert expected in found(problems), [str(p) for p in problems]
    assert all(p.level == "lint" for p in problems)
    assert RULES[expected[1]].source == source
    with pytest.raises(CaptionError):
        check_caption(caption, level="lint")


def test_only_composition_is_valid_at_both_levels():
    caption = {"compositional_deconstruction": POSTER["compositional_deconstruction"]}
    assert validate_caption(caption, level="lint") == []


def test_duplicate_key_is_lint_and_the_last_value_counts():
    text = canonical_json(POSTER).replace('"background":', '"background":7,"background":', 1)
    assert validate_caption(text) == []  # as json.loads reads it: the second (a string) wins
    assert (f"{CD}.background", "duplicate-key") in found(validate_caption(text, level="lint"))
    background = json.dumps(POSTER["compositional_deconstruction"]["background"])
    last_wins = canonical_json(POSTER).replace(
        f'"background":{background}', f'"background":{background},"background":7'
    )
    assert (f"{CD}.background", "wrong-type") in found(validate_caption(last_wins))


def test_lint_checks_on_where_the_official_verifier_stops():
    # Both photo and art_style: the official verifier stops looking at the style; lint still reads its palette.
    caption = edit(["style_description", "photo"], "35mm")
    caption["style_description"]["color_palette"] = ["#abcdef"]
    assert found(validate_caption(caption)) == {(SD, "photo-and-art-style")}
    lint = [p for p in validate_caption(caption, level="lint") if p.level == "lint"]
    assert (f"{SD}.color_palette[0]", "bad-color") in found(lint)
    # Too many colours: the official verifier does not look at each colour; lint does.
    caption = edit(["style_description", "color_palette"], ["#000000"] * 16 + ["red"])
    assert found(validate_caption(caption)) == {(f"{SD}.color_palette", "too-many-colors")}
    assert (f"{SD}.color_palette[16]", "bad-color") in found(validate_caption(caption, level="lint"))
    # A bad element type: the official verifier skips the element; lint still checks its box.
    caption = elements_edit(0, "type", "shape")
    caption["compositional_deconstruction"]["elements"][0]["bbox"] = [9, 9, 1, 1]
    assert found(validate_caption(caption)) == {(f"{E0}.type", "bad-element-type")}
    assert (f"{E0}.bbox", "bad-bbox") in found(validate_caption(caption, level="lint"))


def test_every_problem_is_collected_in_document_order():
    caption = copy.deepcopy(POSTER)
    caption["extra"] = 1
    caption["style_description"]["color_palette"] = ["#abcdef", "#12345G"]
    elements = caption["compositional_deconstruction"]["elements"]
    elements[0]["bbox"] = [500, 0, 400, 100]
    elements.append({"type": "shape", "desc": "x"})
    problems = validate_caption(caption)
    assert [(p.path, p.rule) for p in problems] == [
        ("$.extra", "unknown-key"),
        (f"{SD}.color_palette[0]", "bad-color"),
        (f"{SD}.color_palette[1]", "bad-color"),
        (f"{E0}.bbox", "bad-bbox"),
        (f"{CD}.elements[2].type", "bad-element-type"),
    ]


def test_check_caption_raises_config_error_naming_where_and_rule():
    bad = elements_edit(0, "bbox", [0, 0, 1001, 5])
    with pytest.raises(CaptionError) as info:
        check_caption(bad, where="captions.jsonl:7")
    assert isinstance(info.value, ConfigError)
    message = str(info.value)
    assert message.startswith("captions.jsonl:7: invalid caption (1 problem(s)): ")
    assert f"{E0}.bbox: bad-bbox" in message and "\n" not in message
    assert check_caption(canonical_json(POSTER), level="lint") == POSTER
    with pytest.raises(ConfigError, match="level must be one of official, lint"):
        validate_caption(POSTER, level="strict")


def test_problem_text_names_the_level_and_source():
    (problem,) = validate_caption(edit(["compositional_deconstruction", "elements"], []), level="lint")
    assert str(problem) == f"{CD}.elements: empty-elements: needs at least one element (lint)"
    assert problem.source == DITQ_LINT
    (problem,) = validate_caption(elements_edit(0, "type", "image"))
    assert str(problem) == f"{E0}.type: bad-element-type: \"image\" is not 'obj' or 'text'"


def test_canonical_json_is_minified_ordered_and_keeps_non_ascii():
    caption = {
        "compositional_deconstruction": {
            "background": "Café · 東京",
            "elements": [{"type": "obj", "desc": "d"}],
        }
    }
    text = canonical_json(caption)
    assert (
        text
        == '{"compositional_deconstruction":{"background":"Café · 東京","elements":[{"type":"obj","desc":"d"}]}}'
    )
    assert canonical_json(text) == text and canonical_json(text.encode("utf-8")) == text
    keys = ["compositional_deconstruction", "high_level_description", "style_description"]
    assert canonical_json(ordered(POSTER, keys)).startswith('{"compositional_deconstruction"')  # never sorted


def test_caption_json_schema_is_draft_2020_12_and_holds_the_lint_level():
    schema = caption_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for text in official_examples():
        assert not list(validator.iter_errors(json.loads(text)))
    assert not list(validator.iter_errors(POSTER))
    assert not list(validator.iter_errors(edit(["style_description"], PHOTO_STYLE)))
    # What JSON Schema can express it refuses too; key order, min <= max and blank-only strings are the
    # validator's. (jsonschema matches patterns with Python's re, whose `$` also matches before a final newline.)
    validator_only = {"wrong-order", "top-level-order", "duplicate-key", "zero-area-bbox", "bool-in-bbox"}
    skipped = ("bbox y_min", "bbox x_min", "blank", "colour with a newline")
    for name, caption, (_path, rule), *_ in OFFICIAL + LINT:
        if rule in validator_only or name.startswith(skipped):
            continue
        assert list(validator.iter_errors(caption)), f"schema accepts case {name!r}"
