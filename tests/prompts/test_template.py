"""The template expander: deterministic, valid captions from rich or bare records."""

from __future__ import annotations

import json

import pytest

from ditq.errors import ConfigError
from ditq.prompts import EXPANDERS, PromptRecord, validate_caption
from ditq.prompts.expanders.template import TemplateExpander, guess_medium, quoted_strings, requested_texts


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


# Hand-checked: what each prompt asks the image to show.
REQUESTED = {
    "neon sign that says OPEN": ["OPEN"],
    "a neon sign reading OPEN 24 HOURS in pink": ["OPEN 24 HOURS"],
    "a book titled Moby Dick on a table": ["Moby Dick"],
    "a mug with the words good morning on it": ["good morning"],
    'poster "SUMMER FEST" with the words Live Music at the bottom': ["SUMMER FEST", "Live Music"],
    "a sign reading Café de Flore, Paris": ["Café de Flore"],
    "a shop sign saying 営業中 at night": ["営業中"],
    "a banner with the text: SALE 50% OFF": ["SALE 50% OFF"],
    "A road sign reading STOP. A cat sits nearby.": ["STOP"],
    "a sign that reads welcome home in gold letters": ["welcome home"],
    'a sign reading "OPEN" that says OPEN': ["OPEN"],
    # The cue words in their other senses ask for no text.
    "a girl reading a book under a tree": [],
    "a man reads the newspaper": [],
    "a t-shirt printed with flowers": [],
    "the name of the band is unknown": [],
}


@pytest.mark.parametrize("prompt", REQUESTED)
def test_requested_texts_quoted_and_unquoted(prompt):
    assert requested_texts(prompt) == REQUESTED[prompt]


def test_template_unquoted_text_becomes_a_text_element():
    caption = json.loads(TemplateExpander().expand(record("a neon sign that says OPEN")))
    texts = [e["text"] for e in caption["compositional_deconstruction"]["elements"] if e["type"] == "text"]
    assert texts == ["OPEN"]


def test_requested_texts_match_the_suite_strings():
    """The shipped suite's 300 hand-written `texts` as the reference: the prompts' strings are the same
    characters (four prompts quote two strings as one), and no prompt without text yields any."""
    from ditq.metrics.text import normalize_text
    from ditq.prompts import TEXT_CATEGORIES, load_suite

    for r in load_suite("full"):
        found = requested_texts(r.prompt)
        if r.category in TEXT_CATEGORIES or r.texts:
            assert normalize_text("".join(found)) == normalize_text("".join(r.texts)), r.id
        else:
            assert found == [], r.id
