"""The caption validator against the official worked examples, one failing case per rule, and the JSON Schema."""

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


def official_examples() -> list[str]:
    """The worked example outputs in the system message diffusers ships for Ideogram 4's prompt enhancer."""
    from diffusers.pipelines.ideogram4.prompt_enhancer import CAPTION_SYSTEM_MESSAGE

    return [
        line.removeprefix("Output: ")
        for line in CAPTION_SYSTEM_MESSAGE.splitlines()
        if line.startswith("Output: ")
    ]


# A caption using every optional part, written by hand from the prompting guide's rules.
FULL = {
    "high_level_description": "A red kite over a green hill, a photograph.",
    "style_description": {
        "aesthetics": "clean, natural",
        "lighting": "soft afternoon sun",
        "photo": "35mm lens, eye-level",
        "medium": "photograph",
        "color_palette": ["#C8102E", "#2E933C", "#87CEEB"],
    },
    "compositional_deconstruction": {
        "background": "A grassy hill under a pale blue sky.",
        "elements": [
            {
                "type": "obj",
                "bbox": [100, 300, 400, 700],
                "desc": "A red diamond kite.",
                "color_palette": ["#C8102E"],
            },
            {
                "type": "text",
                "bbox": [800, 100, 900, 900],
                "text": "FLY HIGH",
                "desc": "White capitals.",
                "color_palette": ["#FFFFFF"],
            },
        ],
    },
}


def with_change(path: list, value=None, delete: bool = False) -> dict:
    caption = copy.deepcopy(FULL)
    target = caption
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return caption


def reorder(obj: dict, keys: list[str]) -> dict:
    return {k: obj[k] for k in keys}


CD = "$.compositional_deconstruction"
SD = "$.style_description"
ART_STYLE = {"aesthetics": "a", "lighting": "l", "medium": "watercolor painting", "art_style": "loose washes"}

FAILING = [
    # (name, caption, expected (path, rule))
    (
        "top-level unknown key",
        with_change(["negative_prompt"], "blurry"),
        ("$.negative_prompt", "unknown-key"),
    ),
    ("missing composition", with_change(["compositional_deconstruction"], delete=True), ("$", "missing-key")),
    (
        "top-level order",
        reorder(FULL, ["style_description", "high_level_description", "compositional_deconstruction"]),
        ("$", "wrong-order"),
    ),
    (
        "description not a string",
        with_change(["high_level_description"], 42),
        ("$.high_level_description", "wrong-type"),
    ),
    (
        "blank description",
        with_change(["high_level_description"], "  "),
        ("$.high_level_description", "empty-string"),
    ),
    ("style not an object", with_change(["style_description"], "photo"), (SD, "wrong-type")),
    (
        "photo and art_style",
        with_change(["style_description"], {**FULL["style_description"], "art_style": "x"}),
        (SD, "photo-and-art-style"),
    ),
    (
        "neither photo nor art_style",
        with_change(["style_description", "photo"], delete=True),
        (SD, "missing-key"),
    ),
    (
        "style missing lighting",
        with_change(["style_description", "lighting"], delete=True),
        (SD, "missing-key"),
    ),
    (
        "photo style order",
        with_change(
            ["style_description"],
            reorder(
                FULL["style_description"], ["aesthetics", "lighting", "medium", "photo", "color_palette"]
            ),
        ),
        (SD, "wrong-order"),
    ),
    (
        "art style order",
        with_change(
            ["style_description"], reorder(ART_STYLE, ["aesthetics", "lighting", "art_style", "medium"])
        ),
        (SD, "wrong-order"),
    ),
    (
        "palette not last",
        with_change(
            ["style_description"],
            reorder(
                FULL["style_description"], ["color_palette", "aesthetics", "lighting", "photo", "medium"]
            ),
        ),
        (SD, "wrong-order"),
    ),
    ("style unknown key", with_change(["style_description", "mood"], "calm"), (f"{SD}.mood", "unknown-key")),
    (
        "lowercase colour",
        with_change(["style_description", "color_palette"], ["#c8102e"]),
        (f"{SD}.color_palette[0]", "bad-color"),
    ),
    (
        "short colour",
        with_change(["style_description", "color_palette"], ["#FFF", "#000000"]),
        (f"{SD}.color_palette[0]", "bad-color"),
    ),
    (
        "17 colours",
        with_change(["style_description", "color_palette"], ["#000000"] * 17),
        (f"{SD}.color_palette", "too-many-colors"),
    ),
    (
        "palette not a list",
        with_change(["style_description", "color_palette"], "#000000"),
        (f"{SD}.color_palette", "wrong-type"),
    ),
    (
        "composition order",
        with_change(
            ["compositional_deconstruction"],
            reorder(FULL["compositional_deconstruction"], ["elements", "background"]),
        ),
        (CD, "wrong-order"),
    ),
    (
        "missing background",
        with_change(["compositional_deconstruction", "background"], delete=True),
        (CD, "missing-key"),
    ),
    (
        "missing elements",
        with_change(["compositional_deconstruction", "elements"], delete=True),
        (CD, "missing-key"),
    ),
    (
        "empty elements",
        with_change(["compositional_deconstruction", "elements"], []),
        (f"{CD}.elements", "empty-elements"),
    ),
    (
        "elements not a list",
        with_change(["compositional_deconstruction", "elements"], {}),
        (f"{CD}.elements", "wrong-type"),
    ),
    (
        "element not an object",
        with_change(["compositional_deconstruction", "elements", 1], "text"),
        (f"{CD}.elements[1]", "wrong-type"),
    ),
    (
        "element type unknown",
        with_change(["compositional_deconstruction", "elements", 0, "type"], "image"),
        (f"{CD}.elements[0].type", "bad-element-type"),
    ),
    (
        "element without type",
        with_change(["compositional_deconstruction", "elements", 0, "type"], delete=True),
        (f"{CD}.elements[0]", "missing-key"),
    ),
    (
        "text without text",
        with_change(["compositional_deconstruction", "elements", 1, "text"], delete=True),
        (f"{CD}.elements[1]", "missing-key"),
    ),
    (
        "obj without desc",
        with_change(["compositional_deconstruction", "elements", 0, "desc"], delete=True),
        (f"{CD}.elements[0]", "missing-key"),
    ),
    (
        "text key on obj",
        with_change(["compositional_deconstruction", "elements", 0, "text"], "HI"),
        (f"{CD}.elements[0].text", "unknown-key"),
    ),
    (
        "obj key order",
        with_change(
            ["compositional_deconstruction", "elements", 0],
            reorder(
                FULL["compositional_deconstruction"]["elements"][0], ["type", "desc", "bbox", "color_palette"]
            ),
        ),
        (f"{CD}.elements[0]", "wrong-order"),
    ),
    (
        "text key order",
        with_change(
            ["compositional_deconstruction", "elements", 1],
            reorder(
                FULL["compositional_deconstruction"]["elements"][1],
                ["type", "bbox", "desc", "text", "color_palette"],
            ),
        ),
        (f"{CD}.elements[1]", "wrong-order"),
    ),
    (
        "empty text",
        with_change(["compositional_deconstruction", "elements", 1, "text"], ""),
        (f"{CD}.elements[1].text", "empty-string"),
    ),
    (
        "bbox of three",
        with_change(["compositional_deconstruction", "elements", 0, "bbox"], [1, 2, 3]),
        (f"{CD}.elements[0].bbox", "bad-bbox"),
    ),
    (
        "bbox floats",
        with_change(["compositional_deconstruction", "elements", 0, "bbox"], [0.1, 0.2, 0.5, 0.6]),
        (f"{CD}.elements[0].bbox", "bad-bbox"),
    ),
    (
        "bbox booleans",
        with_change(["compositional_deconstruction", "elements", 0, "bbox"], [0, 0, True, 9]),
        (f"{CD}.elements[0].bbox", "bad-bbox"),
    ),
    (
        "bbox out of grid",
        with_change(["compositional_deconstruction", "elements", 0, "bbox"], [0, 0, 500, 1001]),
        (f"{CD}.elements[0].bbox", "bad-bbox"),
    ),
    (
        "bbox y_min >= y_max",
        with_change(["compositional_deconstruction", "elements", 0, "bbox"], [600, 0, 500, 100]),
        (f"{CD}.elements[0].bbox", "bad-bbox"),
    ),
    (
        "bbox zero width",
        with_change(["compositional_deconstruction", "elements", 0, "bbox"], [0, 300, 500, 300]),
        (f"{CD}.elements[0].bbox", "bad-bbox"),
    ),
    (
        "six element colours",
        with_change(["compositional_deconstruction", "elements", 0, "color_palette"], ["#000000"] * 6),
        (f"{CD}.elements[0].color_palette", "too-many-colors"),
    ),
    (
        "element colour name",
        with_change(["compositional_deconstruction", "elements", 1, "color_palette"], ["white"]),
        (f"{CD}.elements[1].color_palette[0]", "bad-color"),
    ),
    ("not an object", ["compositional_deconstruction"], ("$", "wrong-type")),
]


def test_validate_caption_official_examples_pass():
    examples = official_examples()
    assert len(examples) == 2
    for text in examples:
        assert validate_caption(text) == []
        assert validate_caption(json.loads(text)) == []


def test_validate_caption_full_example_passes():
    assert validate_caption(FULL) == []
    assert validate_caption(canonical_json(FULL)) == []


@pytest.mark.parametrize(("name", "caption", "expected"), FAILING, ids=[case[0] for case in FAILING])
def test_validate_caption_rule_fails_with_path(name, caption, expected):
    problems = validate_caption(caption)
    assert expected in {(p.path, p.rule) for p in problems}, [str(p) for p in problems]
    assert all(p.rule in RULES for p in problems)
    assert not is_valid_caption(caption)


def test_validate_caption_collects_every_problem():
    caption = copy.deepcopy(FULL)
    caption["extra"] = 1
    caption["style_description"]["color_palette"] = ["#abcdef", "#12345G"]
    elements = caption["compositional_deconstruction"]["elements"]
    elements[0]["bbox"] = [500, 0, 400, 100]
    elements[1]["text"] = ""
    elements.append({"type": "shape", "desc": "x"})
    found = {(p.path, p.rule) for p in validate_caption(caption)}
    assert found >= {
        ("$.extra", "unknown-key"),
        (f"{SD}.color_palette[0]", "bad-color"),
        (f"{SD}.color_palette[1]", "bad-color"),
        (f"{CD}.elements[0].bbox", "bad-bbox"),
        (f"{CD}.elements[1].text", "empty-string"),
        (f"{CD}.elements[2].type", "bad-element-type"),
    }


def test_validate_caption_text_input_rules():
    assert [(p.path, p.rule) for p in validate_caption('{"compositional_deconstruction": ')] == [
        ("$", "invalid-json")
    ]
    dup = '{"compositional_deconstruction":{"background":"a","background":"b","elements":[{"type":"obj","desc":"d"}]}}'
    assert (f"{CD}.background", "duplicate-key") in {(p.path, p.rule) for p in validate_caption(dup)}
    escaped = json.dumps(
        {"compositional_deconstruction": {"background": "café", "elements": [{"type": "obj", "desc": "d"}]}}
    )
    problems = validate_caption(escaped)
    assert [(p.rule, p.severity) for p in problems] == [("escaped-non-ascii", "warning")]
    assert is_valid_caption(escaped)  # a warning is not an error
    assert validate_caption(canonical_json(json.loads(escaped))) == []


def test_validate_caption_minimal_caption_passes():
    # Only compositional_deconstruction is required (official verifier).
    assert (
        validate_caption(
            {
                "compositional_deconstruction": {
                    "background": "sky",
                    "elements": [{"type": "obj", "desc": "a kite"}],
                }
            }
        )
        == []
    )


def test_check_caption_raises_config_error_naming_where_and_rule():
    bad = with_change(["compositional_deconstruction", "elements", 0, "bbox"], [0, 0, 0, 0])
    with pytest.raises(CaptionError) as info:
        check_caption(bad, where="captions.jsonl:7")
    assert isinstance(info.value, ConfigError)
    message = str(info.value)
    assert message.startswith("captions.jsonl:7: ")
    assert f"{CD}.elements[0].bbox: bad-bbox" in message
    assert "\n" not in message
    assert check_caption(canonical_json(FULL)) == FULL


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
    assert canonical_json(text) == text
    assert canonical_json(text.encode("utf-8")) == text
    assert canonical_json(
        reorder(FULL, ["compositional_deconstruction", "high_level_description", "style_description"])
    ).startswith('{"compositional_deconstruction"')  # order is kept, never sorted


def test_caption_json_schema_is_valid_draft_2020_12_and_agrees_with_validator():
    schema = caption_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for text in official_examples():
        assert not list(validator.iter_errors(json.loads(text)))
    assert not list(validator.iter_errors(FULL))
    assert not list(
        validator.iter_errors(
            {
                "high_level_description": "x",
                "style_description": ART_STYLE,
                **{"compositional_deconstruction": FULL["compositional_deconstruction"]},
            }
        )
    )
    # Everything the schema can express, it rejects too; order, min < max and blank-only strings are the validator's.
    validator_only = {"wrong-order", "duplicate-key"}
    for name, caption, (_path, rule) in FAILING:
        if rule in validator_only or name in {"bbox y_min >= y_max", "bbox zero width", "blank description"}:
            assert is_valid_caption(caption) is False
            continue
        assert list(validator.iter_errors(caption)), f"schema accepts case {name!r}"
