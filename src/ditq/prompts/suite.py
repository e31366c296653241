"""The benchmark prompt suite shipped with ditq, its named subsets and the json / raw feeding modes.

    load_suite("full")                      300 records, 30 in each of 10 categories
    load_suite("quick")                     30: 3 per category
    load_suite("smoke")                     6: one each from 6 categories, for tiny CPU runs
    suite_records("quick", mode="raw")      (id, category, text to feed, ground-truth strings) tuples

Subsets are deterministic and independent of file order: within a category, ids are ranked by the SHA-256 of the
id and the first k are taken, so adding prompts to a category changes a subset only where a new id ranks higher.
`mode="json"` feeds the committed caption, `mode="raw"` the raw prompt string (the caption ablation).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ditq.errors import ConfigError
from ditq.prompts.records import PromptRecord, read_prompt_records

SUITE_FILE = "suite.jsonl"
CATEGORIES = (
    "typography",
    "poster",
    "logo",
    "signage",
    "photo",
    "illustration",
    "3d_product",
    "abstract",
    "layout",
    "multiscript",
)
# Categories whose prompts ask for exact text: every record has at least one ground-truth string.
TEXT_CATEGORIES = ("typography", "poster", "logo", "signage", "multiscript")
QUICK_PER_CATEGORY = 3
SMOKE_CATEGORIES = ("typography", "poster", "signage", "photo", "illustration", "multiscript")
SUITES = ("full", "quick", "smoke")
MODES = ("json", "raw")


@dataclass(frozen=True)
class SuiteItem:
    """What a generation run needs per prompt: the text to feed the model in the chosen mode and the strings
    that OCR scoring expects to find in the image."""

    id: str
    category: str
    text: str
    texts: tuple[str, ...]


def suite_path() -> Path:
    """Where the installed suite file lives."""
    return Path(str(resources.files("ditq.prompts") / "data" / SUITE_FILE))


@lru_cache(maxsize=1)
def _full() -> tuple[PromptRecord, ...]:
    return tuple(read_prompt_records(suite_path()))


def _rank(record_id: str) -> str:
    return hashlib.sha256(record_id.encode("utf-8")).hexdigest()


def _take(
    records: tuple[PromptRecord, ...], categories: tuple[str, ...], per_category: int
) -> list[PromptRecord]:
    chosen: set[str] = set()
    for category in categories:
        ids = sorted((r.id for r in records if r.category == category), key=_rank)
        chosen.update(ids[:per_category])
    return [r for r in records if r.id in chosen]  # keep file order


def load_suite(name: str = "full") -> list[PromptRecord]:
    """The records of suite `name` (one of `SUITES`), in file order; each `caption` is canonical JSON text."""
    records = _full()
    if name == "full":
        return list(records)
    if name == "quick":
        return _take(records, CATEGORIES, QUICK_PER_CATEGORY)
    if name == "smoke":
        return _take(records, SMOKE_CATEGORIES, 1)
    raise ConfigError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")


def suite_records(name: str = "full", mode: str = "json") -> list[SuiteItem]:
    """Suite `name` ready to feed: the caption (`mode="json"`) or the raw prompt (`mode="raw"`) per id."""
    if mode not in MODES:
        raise ConfigError(f"unknown caption mode {mode!r}; known: {', '.join(MODES)}")
    return [
        SuiteItem(r.id, r.category, r.caption if mode == "json" else r.prompt, r.texts)
        for r in load_suite(name)
    ]


def category_counts(records: list[PromptRecord]) -> dict[str, int]:
    """Records per category, in `CATEGORIES` order (categories outside it last)."""
    counts = Counter(r.category for r in records)
    ordered = {c: counts[c] for c in CATEGORIES if counts[c]}
    ordered.update({c: n for c, n in sorted(counts.items()) if c not in ordered})
    return ordered
