"""`ditq captions`: validate with line numbers, resumable expand, suite list/export, bad input."""

from __future__ import annotations

import json

import pytest

from ditq.cli import main
from ditq.prompts import load_suite, validate_caption
from ditq.prompts.records import read_prompt_records

GOOD = {
    "compositional_deconstruction": {"background": "sky", "elements": [{"type": "obj", "desc": "a kite"}]}
}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_cli_validate_reports_every_problem_with_line_numbers(tmp_path, capsys):
    bad_caption = {"compositional_deconstruction": {"elements": [], "background": "x"}}
    accented = {
        "compositional_deconstruction": {"background": "café", "elements": [{"type": "obj", "desc": "d"}]}
    }
    path = write_lines(
        tmp_path / "captions.jsonl",
        [
            json.dumps({"id": "a", "caption": json.dumps(GOOD)}),
            json.dumps({"id": "b", "caption": bad_caption}),
            "{not json",
            "",
            json.dumps({"id": "a", "caption": GOOD}),
            json.dumps({"id": "c"}),
            json.dumps(GOOD),
            json.dumps(accented),  # the line is the caption, saved with ensure_ascii=True
            json.dumps({"id": "d", "caption": json.dumps(accented)}),  # caption text with \\u escapes
            json.dumps(
                {"id": "e", "caption": accented}, ensure_ascii=True
            ),  # an object: ditq writes it itself
        ],
    )
    assert main(["captions", "validate", str(path)]) == 1
    out = capsys.readouterr()
    lines = out.out.splitlines()
    cd = "$.compositional_deconstruction"
    assert (
        f"{path}:2: [b] {cd}: wrong-order: keys are (elements, background), expected (background, elements) "
        "[official verifier]" in lines
    )
    assert (
        f"{path}:2: [b] {cd}.elements: empty-elements: needs at least one element (lint) [ditq lint]" in lines
    )
    assert any(line.startswith(f"{path}:3: $: invalid-json:") for line in lines)
    assert f"{path}:5: [a] $.id: duplicate-id: id 'a' already used on line 1 [ditq records]" in lines
    assert f'{path}:6: [c] $: missing-caption: record has no "caption" field [ditq records]' in lines
    assert any(line.startswith(f"{path}:8: $: escaped-non-ascii: 1 \\u escape(s)") for line in lines)
    assert any(line.startswith(f"{path}:9: [d] $: escaped-non-ascii:") for line in lines)
    assert not any(line.startswith((f"{path}:1:", f"{path}:7:", f"{path}:10:")) for line in lines)
    assert len(lines) == 7
    assert "9 line(s), 6 invalid, 6 error(s), 1 lint finding(s) (--strict makes them errors)" in out.err
    assert main(["captions", "validate", str(path), "--strict"]) == 1
    assert "9 line(s), 6 invalid, 7 error(s)" in capsys.readouterr().err


def test_cli_validate_strict_turns_lint_into_errors(tmp_path, capsys):
    lint_only = {"compositional_deconstruction": {"background": " ", "elements": []}}
    path = write_lines(tmp_path / "lint.jsonl", [json.dumps(lint_only)])
    assert main(["captions", "validate", str(path)]) == 0
    assert "1 line(s), 0 invalid, 0 error(s), 2 lint finding(s)" in capsys.readouterr().err
    assert main(["captions", "validate", str(path), "--no-warnings"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["captions", "validate", str(path), "--strict"]) == 1
    out = capsys.readouterr()
    assert "empty-string" in out.out and "empty-elements" in out.out
    assert "1 line(s), 1 invalid, 2 error(s)" in out.err


def test_cli_rules_lists_every_rule_with_its_source(capsys):
    from ditq.prompts import RULES

    assert main(["captions", "rules"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(RULES)
    by_id = {line.split()[0]: line for line in lines}
    assert "official verifier" in by_id["escaped-non-ascii"]
    assert "official prompting guide" in by_id["top-level-order"]
    assert "ditq lint" in by_id["zero-area-bbox"]


def test_cli_validate_clean_file_and_missing_file(tmp_path, capsys):
    path = write_lines(tmp_path / "ok.jsonl", [json.dumps(GOOD)] * 3)
    assert main(["captions", "validate", str(path), "--strict"]) == 0
    assert main(["captions", "validate", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: cannot read" in capsys.readouterr().err


def prompt_file(tmp_path, n=5):
    lines = [json.dumps({"id": f"p-{i:02d}", "prompt": f'a poster that says "HELLO {i}"'}) for i in range(n)]
    return write_lines(tmp_path / "prompts.jsonl", lines)


def test_cli_expand_resumes_after_interruption_without_duplicates(tmp_path, capsys):
    prompts = prompt_file(tmp_path)
    out = tmp_path / "out" / "captions.jsonl"
    assert main(["captions", "expand", str(prompts), "-o", str(out), "--limit", "2"]) == 0
    assert [r.id for r in read_prompt_records(out)] == ["p-00", "p-01"]
    # A crash in the middle of the next append leaves a torn line without its newline.
    full = out.read_bytes()
    with out.open("ab") as handle:
        handle.write(b'{"id":"p-02","prompt":"a poster that says \\"HEL')
    capsys.readouterr()
    assert main(["captions", "expand", str(prompts), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "3 written, 2 already there, 0 failed" in err
    records = read_prompt_records(out)
    assert [r.id for r in records] == ["p-00", "p-01", "p-02", "p-03", "p-04"]
    assert out.read_bytes().startswith(full)  # earlier lines untouched
    assert all(
        validate_caption(r.caption, level="lint") == [] and r.fields["expander"] == "template"
        for r in records
    )
    assert all(f"HELLO {i}" in records[i].caption for i in range(5))
    # Nothing left: a third run writes nothing.
    assert main(["captions", "expand", str(prompts), "-o", str(out)]) == 0
    assert "all 5 prompt(s) already expanded" in capsys.readouterr().err


def test_cli_expand_records_the_requested_text(tmp_path, capsys):
    """A record without `texts` gets the strings its prompt asks for, quoted or not; given texts are kept."""
    lines = [
        json.dumps({"id": "sign", "prompt": "a neon sign that says OPEN above a door"}),
        json.dumps({"id": "book", "prompt": 'a book titled Moby Dick beside a mug reading "COFFEE"'}),
        json.dumps({"id": "cat", "prompt": "a cat reading a newspaper"}),
        json.dumps({"id": "own", "prompt": "a sign that says OPEN", "texts": ["OPEN NOW"]}),
    ]
    prompts = write_lines(tmp_path / "prompts.jsonl", lines)
    out = tmp_path / "captions.jsonl"
    assert main(["captions", "expand", str(prompts), "-o", str(out)]) == 0
    records = {r.id: r for r in read_prompt_records(out)}
    assert records["sign"].texts == ("OPEN",)
    assert records["book"].texts == ("Moby Dick", "COFFEE")
    assert records["cat"].texts == ()
    assert records["own"].texts == ("OPEN NOW",)
    for r in records.values():  # the caption renders exactly those strings
        elements = json.loads(r.caption)["compositional_deconstruction"]["elements"]
        assert tuple(e["text"] for e in elements if e["type"] == "text") == r.texts


def test_cli_expand_rejects_bad_prompt_files(tmp_path, capsys):
    malformed = write_lines(
        tmp_path / "bad.jsonl", [json.dumps({"id": "a", "prompt": "x"}), '{"id": "b", "prompt": ']
    )
    assert main(["captions", "expand", str(malformed), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert f"{malformed}:2: malformed JSON" in capsys.readouterr().err
    dup = write_lines(
        tmp_path / "dup.jsonl",
        [json.dumps({"id": "a", "prompt": "x"}), json.dumps({"id": "a", "prompt": "y"})],
    )
    assert main(["captions", "expand", str(dup), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert f"{dup}:2: duplicate prompt id 'a' (first on line 1)" in capsys.readouterr().err
    no_id = write_lines(tmp_path / "noid.jsonl", [json.dumps({"prompt": "x"})])
    assert main(["captions", "expand", str(no_id), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "'id' must be a non-empty string" in capsys.readouterr().err
    assert (
        main(["captions", "expand", str(no_id), "-o", str(tmp_path / "o.jsonl"), "--expander", "magic"]) == 2
    )


def test_cli_expand_refuses_a_corrupt_output_middle(tmp_path, capsys):
    prompts = prompt_file(tmp_path, n=3)
    out = write_lines(
        tmp_path / "captions.jsonl", [json.dumps({"id": "p-00"}), "garbage", json.dumps({"id": "p-01"})]
    )
    assert main(["captions", "expand", str(prompts), "-o", str(out)]) == 2
    assert f"{out}:2: unreadable record in the middle of the file" in capsys.readouterr().err
    assert out.read_text().count("\n") == 3  # left as it was


def test_cli_suite_list_and_export(tmp_path, capsys):
    assert main(["captions", "suite", "--list", "--subset", "quick"]) == 0
    out = capsys.readouterr().out
    assert "typography       3" in out and "total           30  suite 'quick'" in out
    export = tmp_path / "smoke.jsonl"
    assert main(["captions", "suite", "--export", str(export), "--subset", "smoke", "--mode", "raw"]) == 0
    lines = [json.loads(line) for line in export.read_text(encoding="utf-8").splitlines()]
    smoke = load_suite("smoke")
    assert [line["id"] for line in lines] == [r.id for r in smoke]
    assert all(line["mode"] == "raw" and line["text"] == line["prompt"] for line in lines)
    assert main(["captions", "suite", "--export", str(export), "--subset", "smoke"]) == 0
    lines = [json.loads(line) for line in export.read_text(encoding="utf-8").splitlines()]
    assert all(
        line["text"] == line["caption"] and validate_caption(line["text"], level="lint") == []
        for line in lines
    )
    assert main(["captions", "suite", "--list", "--subset", "tiny"]) == 2


def test_cli_suite_export_feeds_expand(tmp_path, capsys):
    export = tmp_path / "smoke.jsonl"
    assert main(["captions", "suite", "--export", str(export), "--subset", "smoke"]) == 0
    out = tmp_path / "captions.jsonl"
    assert main(["captions", "expand", str(export), "-o", str(out)]) == 0
    assert len(read_prompt_records(out)) == 6


@pytest.mark.parametrize("argv", [["captions", "schema"], ["captions", "suite", "--check-build"]])
def test_cli_small_verbs(argv, capsys):
    assert main(argv) == 0
    if argv[-1] == "schema":
        assert json.loads(capsys.readouterr().out)["$schema"].endswith("2020-12/schema")
