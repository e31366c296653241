"""Structured JSON captions for Ideogram 4: the schema and its validator, caption expanders and the prompt suite.

validate_caption(obj_or_text, level="official")         every broken rule, with JSON path, rule id and source
                              -> list[CaptionProblem]   ("official": as the official verifier; "lint": stricter)
check_caption(obj_or_text)    -> dict                   the raising variant (CaptionError, a ConfigError)
RULES                                                   rule id -> Rule(description, source)
canonical_json(obj)           -> str                    minified, key order kept, non-ASCII kept
caption_json_schema()         -> dict                   draft 2020-12 JSON Schema for structured output
load_suite(name="full")       -> list[PromptRecord]     the benchmark prompts (full / quick / smoke)
suite_records(name, mode)     -> list[SuiteItem]        what to feed per id in "json" or "raw" mode
EXPANDERS                                               registry: template, openai, ideogram4
"""

from __future__ import annotations

from ditq.prompts.expanders import EXPANDERS, Expander, ExpanderError
from ditq.prompts.records import PromptRecord, read_prompt_records
from ditq.prompts.rules import RULES, Rule
from ditq.prompts.schema import canonical_json, caption_json_schema
from ditq.prompts.suite import (
    CATEGORIES,
    SUITES,
    TEXT_CATEGORIES,
    SuiteItem,
    load_suite,
    suite_records,
)
from ditq.prompts.validate import (
    CaptionError,
    CaptionProblem,
    check_caption,
    is_valid_caption,
    validate_caption,
)

__all__ = [
    "CATEGORIES",
    "EXPANDERS",
    "RULES",
    "SUITES",
    "TEXT_CATEGORIES",
    "CaptionError",
    "CaptionProblem",
    "Expander",
    "ExpanderError",
    "PromptRecord",
    "Rule",
    "SuiteItem",
    "canonical_json",
    "caption_json_schema",
    "check_caption",
    "is_valid_caption",
    "load_suite",
    "read_prompt_records",
    "suite_records",
    "validate_caption",
]
