"""`ditq captions`: validate caption files, expand prompts into captions, list and export the prompt suite.

ditq captions validate FILE [--strict]               every problem, with line number, JSON path and rule source
ditq captions rules                                  the rules, their level and where each comes from
ditq captions expand PROMPTS -o OUT --expander NAME   resumable; ids already in OUT are skipped
ditq captions suite --list | --export FILE [--subset NAME] [--mode json|raw]
ditq captions schema [-o FILE]                       the caption JSON Schema (draft 2020-12)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "captions",
        help="structured JSON captions: validate, expand, the prompt suite",
        description="Ideogram 4 structured JSON captions: check them, write them from prompts, export the suite.",
    )
    verbs = p.add_subparsers(dest="captions_verb", metavar="SUBVERB")

    v = verbs.add_parser(
        "validate",
        help="check every caption in a JSONL file",
        description="Check a JSONL file line by line: a line is a caption, or a record whose `caption` field holds "
        "one (object or JSON text). Errors are what the official Ideogram 4 caption verifier refuses (the official "
        "pipeline aborts on any of them); ditq's stricter lint findings are printed too, marked (lint), and "
        "--strict makes them errors. Prints FILE:LINE: [ID] PATH: RULE: MESSAGE [SOURCE]. "
        "Exit status 0 when every caption is valid, 1 when any is not.",
    )
    v.add_argument("file", type=Path)
    v.add_argument("--field", default="caption", help="record field holding the caption (default: caption)")
    v.add_argument("--strict", action="store_true", help="lint findings are errors too (exit status 1)")
    v.add_argument("--no-warnings", action="store_true", help="do not print lint findings (without --strict)")
    v.set_defaults(func=run_validate)

    r = verbs.add_parser("rules", help="list the caption rules with their level and source")
    r.set_defaults(func=run_rules)

    e = verbs.add_parser(
        "expand",
        help="write a caption for each prompt (resumable)",
        description="Expand each record of a prompt JSONL file (`id`, `prompt`, optional fields) into a validated "
        "caption and append it to OUTPUT. Ids already in OUTPUT are skipped, so rerunning after an interruption "
        "does only the missing ones; a torn last line from a crash is dropped first.",
    )
    e.add_argument("prompts", help="prompt JSONL file, or suite:NAME for a shipped suite (suite:quick)")
    e.add_argument("-o", "--output", type=Path, required=True)
    e.add_argument("--expander", default="template", help="template (default), openai or ideogram4")
    e.add_argument(
        "--keep-going", action="store_true", help="record failures and continue instead of stopping"
    )
    e.add_argument("--limit", type=int, help="expand at most this many pending prompts")
    g = e.add_argument_group("openai expander")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="endpoint up to /chat/completions")
    g.add_argument("--model", help="model name at the endpoint (openai) or pipeline folder (ideogram4)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request")
    g.add_argument("--retries", type=int, default=3, help="extra attempts after a transport failure")
    g.add_argument("--repairs", type=int, default=2, help="repair turns for an invalid caption")
    g.add_argument("--no-structured-output", action="store_true", help="do not send response_format")
    h = e.add_argument_group("ideogram4 expander")
    h.add_argument("--device", default="cpu")
    h.add_argument("--max-new-tokens", type=int, default=1024)
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16 (default)")
    h.add_argument("--max-string-length", type=int, help="bound every generated string (keeps output finite)")
    h.add_argument("--max-elements", type=int, help="bound the number of elements")
    e.set_defaults(func=run_expand)

    s = verbs.add_parser(
        "suite",
        help="list or export the shipped benchmark prompts",
        description="The shipped prompt suite (full: 300, quick: 30, smoke: 6).",
    )
    action = s.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true", help="table of ids and categories, and counts")
    action.add_argument("--export", type=Path, metavar="FILE", help="write the suite as JSONL")
    action.add_argument("--rebuild", action="store_true", help="rewrite the shipped file from its sources")
    action.add_argument("--check-build", action="store_true", help="exit 1 if the shipped file is stale")
    s.add_argument("--subset", default="full", help="full, quick or smoke")
    s.add_argument("--mode", default="json", help="json (feed the caption) or raw (feed the raw prompt)")
    s.set_defaults(func=run_suite)

    c = verbs.add_parser("schema", help="print the caption JSON Schema (draft 2020-12)")
    c.add_argument("-o", "--output", type=Path)
    c.set_defaults(func=run_schema)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_validate(args) -> int:
    from ditq.prompts.caption_file import validate_caption_file
    from ditq.prompts.rules import OFFICIAL

    errors = lint = 0
    invalid: set[int] = set()
    for found in validate_caption_file(args.file, field=args.field):
        is_error = found.problem.level == OFFICIAL or args.strict
        if is_error:
            errors += 1
            invalid.add(found.line)
        else:
            lint += 1
            if args.no_warnings:
                continue
        label = f" [{found.record_id}]" if found.record_id else ""
        print(f"{args.file}:{found.line}:{label} {found.problem} [{found.problem.source}]")
    lines = sum(1 for line in args.file.open(encoding="utf-8", errors="replace") if line.strip())
    summary = f"{args.file}: {lines} line(s), {len(invalid)} invalid, {errors} error(s)"
    if not args.strict:
        summary += f", {lint} lint finding(s) (--strict makes them errors)"
    print(summary, file=sys.stderr)
    return 1 if errors else 0


def run_rules(args) -> int:
    from ditq.prompts.rules import RULES

    width = max(len(rule_id) for rule_id in RULES)
    for rule in RULES.values():
        print(f"{rule.id:<{width}}  {rule.source:<24}  {rule.description}")
    return 0


def _expander_options(args) -> dict:
    if args.expander == "openai":
        return {
            "base_url": args.base_url,
            "model": args.model or "default",
            "api_key_env": args.api_key_env,
            "timeout": args.timeout,
            "retries": args.retries,
            "repairs": args.repairs,
            "structured_output": not args.no_structured_output,
        }
    if args.expander == "ideogram4":
        return {
            "model": args.model,
            "device": args.device,
            "dtype": args.dtype,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "max_string_length": args.max_string_length,
            "max_elements": args.max_elements,
        }
    return {}


def run_expand(args) -> int:
    from tqdm import tqdm

    from ditq.prompts import EXPANDERS, load_suite, read_prompt_records
    from ditq.prompts.expand import expand_to_file, pending

    if args.prompts.startswith("suite:"):
        records = load_suite(args.prompts.removeprefix("suite:"))
    else:
        records = read_prompt_records(args.prompts)
    factory = EXPANDERS.get(args.expander)
    todo, done = pending(records, args.output)
    if args.limit is not None:
        todo = todo[: args.limit]
    if not todo:
        print(f"{args.output}: all {len(records)} prompt(s) already expanded", file=sys.stderr)
        return 0
    expander = factory(**_expander_options(args))
    with tqdm(total=len(todo), desc=f"captions ({args.expander})", unit="prompt", file=sys.stderr) as bar:
        summary = expand_to_file(
            todo, expander, args.output, keep_going=args.keep_going, on_record=lambda r: bar.update()
        )
    print(
        f"{args.output}: {len(summary.written)} written, {len(done)} already there, {len(summary.failed)} failed",
        file=sys.stderr,
    )
    for record_id, reason in summary.failed.items():
        print(f"failed {record_id}: {reason}", file=sys.stderr)
    return 1 if summary.failed else 0


def run_suite(args) -> int:
    from ditq.prompts import build_suite
    from ditq.prompts.records import dumps_line
    from ditq.prompts.suite import category_counts, load_suite, suite_path, suite_records

    if args.rebuild:
        count = build_suite.write_suite(suite_path())
        print(f"wrote {count} records to {suite_path()}")
        return 0
    if args.check_build:
        fresh = build_suite.is_up_to_date(suite_path())
        print(f"{suite_path()}: {'up to date' if fresh else 'differs from a fresh build (run --rebuild)'}")
        return 0 if fresh else 1
    records = load_suite(args.subset)
    if args.list:
        width = max(len(r.id) for r in records)
        for r in records:
            texts = " | ".join(r.texts)
            print(f"{r.id:<{width}}  {r.category:<13}  {texts}")
        print()
        for category, count in category_counts(records).items():
            with_text = sum(1 for r in records if r.category == category and r.texts)
            print(f"{category:<13} {count:>4}  ({with_text} with text)")
        print(f"{'total':<13} {len(records):>4}  suite {args.subset!r}")
        return 0
    items = {item.id: item for item in suite_records(args.subset, mode=args.mode)}
    from ditq.io.files import write_text_atomic

    lines = []
    for r in records:
        item = items[r.id]
        line = {"id": r.id, "category": r.category, "mode": args.mode, "text": item.text, "texts": list(r.texts)}
        line.update({"prompt": r.prompt, "caption": r.caption})
        lines.append(dumps_line(line))
    args.export.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.export, "".join(lines))
    print(f"wrote {len(records)} prompt(s) of suite {args.subset!r} ({args.mode} mode) to {args.export}")
    return 0


def run_schema(args) -> int:
    from ditq.prompts import caption_json_schema

    text = json.dumps(caption_json_schema(), indent=2, ensure_ascii=False) + "\n"
    if args.output:
        from ditq.io.files import write_text_atomic

        write_text_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return 0
