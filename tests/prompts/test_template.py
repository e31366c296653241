"""The template expander: deterministic, valid captions from rich or bare records."""

from __future__ import annotations

import json

import pytest

from ditq.errors import ConfigError
from ditq.prompts import EXPANDERS, PromptRecord, validate_caption
from ditq.prompts.expanders.template import TemplateExpander, guess_medium, quoted_strings


def record(prompt: str, **fields) -> PromptRecord:
    texts = tuple(fields.pop("texts", ()))
    return PromptRecord(
        id="p-1", category=fields.pop("category", ""), prompt=prompt, texts=texts, fields=fields
    )


def test_template_bare_prompt_becomes_valid_caption_with_quoted_text():
    expander = EXPANDERS.get("template")()
    caption = expander.expand(record('A vintage travel poster reading "VISIT LISBOA" and “Since 1928”'))
    assert validate_caption(caption, level="lint") == []
    obj = json.loads(caption)
    texts = [e["text"] for e in obj["compositional_deconstruction"]["elements"] if e["type"] == "text"]
    assert texts == ["VISIT LISBOA", "Since 1928"]
    assert obj["style_description"]["medium"] == "poster" and "art_style" in obj["style_description"]


def test_template_photo_gets_photo_key_and_is_deterministic():
    expander = TemplateExpander()
    r = record("a golden retriever on a skateboard")
    first = expander.expand(r)
    assert first == TemplateExpander().expand(r)
    style = json.loads(first)["style_description"]
    assert list(style) == ["aesthetics", "lighting", "photo", "medium"]


def test_template_rich_fields_place_objects_and_uppercase_palette():
    r = record(
        "three shapes",
        medium="3D render",
        layout="grid",
        palette=["#aa0011", "#00FF00"],
        objects=[{"desc": "a red cube", "position": "left"}, {"desc": "a blue ball", "position": "right"}],
    )
    obj = json.loads(TemplateExpander().expand(r))
    elements = obj["compositional_deconstruction"]["elements"]
    assert [e["bbox"][1] < 500 for e in elements] == [
        True,
        False,
    ]  # left object left of center, right one right
    assert obj["style_description"]["color_palette"] == ["#AA0011", "#00FF00"]


def test_template_bad_fields_raise_config_error():
    with pytest.raises(ConfigError, match="unknown position"):
        TemplateExpander().expand(record("x", objects=[{"desc": "a", "position": "upstairs"}]))
    with pytest.raises(ConfigError, match="bad-color"):
        TemplateExpander().expand(record("x", palette=["red"]))
    with pytest.raises(ConfigError, match="unknown layout"):
        TemplateExpander().expand(record("x", layout="spiral"))


def test_template_helpers():
    assert quoted_strings('sign "OPEN" and «Fermé» and 「営業中」') == ["OPEN", "Fermé", "営業中"]
    assert guess_medium("an oil painting of a pear", has_text=False)[0] == "painting"
    assert guess_medium("a cat", has_text=True) == ("graphic design", "poster")
