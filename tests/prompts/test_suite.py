"""The shipped benchmark suite: size, balance, valid captions, ground-truth strings, subsets and feeding modes."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from ditq.errors import ConfigError
from ditq.prompts import CATEGORIES, TEXT_CATEGORIES, load_suite, suite_records, validate_caption
from ditq.prompts.build_suite import is_up_to_date
from ditq.prompts.suite import SMOKE_CATEGORIES, suite_path


@pytest.fixture(scope="module")
def full():
    return load_suite("full")


def test_suite_full_has_300_balanced_records_with_unique_ids(full):
    assert len(full) == 300
    ids = [r.id for r in full]
    assert len(set(ids)) == len(ids)
    assert Counter(r.category for r in full) == {c: 30 for c in CATEGORIES}
    assert len(CATEGORIES) == 10
    for record in full:
        prefix, number = record.id.rsplit("-", 1)
        assert prefix.isalpha() and len(number) == 3 and number.isdigit()


def test_suite_every_caption_validates_and_is_canonical(full):
    for record in full:
        assert validate_caption(record.caption, level="lint") == [], record.id
        assert (
            json.dumps(json.loads(record.caption), separators=(",", ":"), ensure_ascii=False)
            == record.caption
        )


def text_elements(caption: str) -> list[str]:
    elements = json.loads(caption)["compositional_deconstruction"]["elements"]
    return [e["text"] for e in elements if e["type"] == "text"]


def test_suite_text_prompts_carry_their_strings_verbatim(full):
    for record in full:
        rendered = text_elements(record.caption)
        if record.category in TEXT_CATEGORIES:
            assert record.texts, f"{record.id} has no ground-truth string"
        for text in record.texts:
            assert text in rendered, f"{record.id}: {text!r} is not a text element"
            assert text in record.prompt, f"{record.id}: {text!r} is not in the raw prompt"
        if not record.texts:
            assert rendered == [], f"{record.id} renders text it does not score"


def test_suite_scripts_cover_the_documented_writing_systems(full):
    scripts = {r.fields["script"] for r in full if r.category == "multiscript"}
    assert {"latin", "cyrillic", "greek", "han", "kana", "hangul", "arabic", "devanagari"} <= scripts
    accented = [
        t for r in full if r.category == "multiscript" and r.fields["script"] == "latin" for t in r.texts
    ]
    assert all(not t.isascii() for t in accented)


def test_suite_template_fields_are_present(full):
    for record in full:
        assert record.fields["subject"] and record.fields["setting"] and record.fields["layout"], record.id


def test_suite_subsets_are_stratified_and_deterministic():
    quick = load_suite("quick")
    assert len(quick) == 30
    assert Counter(r.category for r in quick) == {c: 3 for c in CATEGORIES}
    smoke = load_suite("smoke")
    assert [r.category for r in smoke] == list(SMOKE_CATEGORIES)
    assert [r.id for r in load_suite("quick")] == [r.id for r in quick]
    full_ids = [r.id for r in load_suite("full")]
    assert [r.id for r in quick] == [i for i in full_ids if i in {r.id for r in quick}]  # file order kept


def test_suite_records_json_and_raw_modes(full):
    by_id = {r.id: r for r in full}
    for item in suite_records("smoke", mode="json"):
        assert item.text == by_id[item.id].caption and item.texts == by_id[item.id].texts
    for item in suite_records("smoke", mode="raw"):
        assert item.text == by_id[item.id].prompt
    with pytest.raises(ConfigError, match="caption mode"):
        suite_records("full", mode="yaml")
    with pytest.raises(ConfigError, match="unknown suite"):
        load_suite("huge")


def test_suite_file_is_reproduced_by_the_builder():
    assert suite_path().is_file()
    assert is_up_to_date(suite_path())
