"""Prompt records and crash-safe JSONL appending; the instruction text built from the caption rules."""

from __future__ import annotations

import json

import pytest

from ditq.errors import ConfigError
from ditq.prompts import PromptRecord, validate_caption
from ditq.prompts.records import append_line, iter_jsonl, open_resumable, read_prompt_records
from ditq.prompts.spec import _EXAMPLE, caption_instructions, repair_message, user_message


def test_record_round_trip_keeps_extra_fields_and_caption_last():
    data = {
        "id": "a-1",
        "category": "poster",
        "prompt": "p",
        "texts": ["HI"],
        "subject": "s",
        "caption": {"x": 1},
    }
    record = PromptRecord.from_dict(data)
    assert record.caption == '{"x":1}' and record.texts == ("HI",) and record.fields == {"subject": "s"}
    out = record.to_dict()
    assert list(out) == ["id", "category", "prompt", "texts", "subject", "caption"]
    assert PromptRecord.from_dict(out) == record
    assert record.get("subject") == "s" and record.get("texts") == ["HI"] and record.get("missing", 3) == 3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prompt": "p"}, "'id' must be a non-empty string"),
        ({"id": "a", "prompt": " "}, "'prompt' must be a non-empty string"),
        ({"id": "a", "prompt": "p", "texts": "HI"}, "'texts' must be a list"),
        ({"id": "a", "prompt": "p", "texts": [""]}, "'texts' must be a list of non-empty strings"),
        ({"id": "a", "prompt": "p", "caption": 5}, "'caption' must be a JSON object"),
    ],
)
def test_record_bad_fields_name_where(data, message):
    with pytest.raises(ConfigError, match=f"^f.jsonl:3: {message}"):
        PromptRecord.from_dict(data, where="f.jsonl:3")


def test_iter_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id":"a","prompt":"x"}\n\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"p.jsonl:3: expected a JSON object per line, got list"):
        list(iter_jsonl(path))
    path.write_text(
        '{"id":"a","prompt":"x"}\n{"id":"b","prompt":"y"}\n{"id":"a","prompt":"z"}\n', encoding="utf-8"
    )
    with pytest.raises(ConfigError, match=r"p.jsonl:3: duplicate prompt id 'a' \(first on line 1\)"):
        read_prompt_records(path)


def lines(*ids):
    return "".join(json.dumps({"id": i}, separators=(",", ":")) + "\n" for i in ids)


def test_open_resumable_drops_only_a_torn_tail(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(lines("a", "b") + '{"id":"c","cap', encoding="utf-8")
    handle, done = open_resumable(path)
    with handle:
        assert done == {"a", "b"}
        append_line(handle, {"id": "c"})
    assert path.read_text(encoding="utf-8") == lines("a", "b", "c")


def test_open_resumable_drops_an_unreadable_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(lines("a") + "{garbage}\n", encoding="utf-8")
    handle, done = open_resumable(path)
    handle.close()
    assert done == {"a"} and path.read_text(encoding="utf-8") == lines("a")


def test_open_resumable_refuses_damage_before_the_end(tmp_path):
    path = tmp_path / "out.jsonl"
    original = lines("a") + "{garbage}\n" + lines("b")
    path.write_text(original, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"out.jsonl:2: unreadable record in the middle"):
        open_resumable(path)
    path.write_text(lines("a", "a"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"out.jsonl:2: duplicate prompt id 'a'"):
        open_resumable(path)


def test_open_resumable_creates_missing_folders(tmp_path):
    handle, done = open_resumable(tmp_path / "new" / "deep" / "out.jsonl")
    handle.close()
    assert done == set() and (tmp_path / "new" / "deep" / "out.jsonl").exists()


def test_spec_instructions_state_the_rules_and_a_valid_example():
    text = caption_instructions()
    assert validate_caption(_EXAMPLE, level="lint") == []
    assert _EXAMPLE in text
    for phrase in (
        "aesthetics, lighting, photo, medium, color_palette",
        "aesthetics, lighting, medium, art_style",
        "type, bbox, text, desc, color_palette",
        "at most 16",
        "at most 5",
        "0 to 1000",
    ):
        assert phrase in text
    record = PromptRecord(id="x", category="", prompt='sign "Καλημέρα"', texts=("Καλημέρα",))
    user = user_message(record, width=1344, height=768)
    assert "7:4" in user and '"Καλημέρα"' in user
    assert "- $.a: bad-bbox: x" in repair_message(["$.a: bad-bbox: x"])
    assert "and 5 more" in repair_message([f"p{i}" for i in range(25)])
