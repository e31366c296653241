"""Build the benchmark suite file `ditq/prompts/data/suite.jsonl` from the hand-written sources.

    ditq captions suite --rebuild        # rewrite the data file
    ditq captions suite --check-build    # exit 1 if the committed file differs from a fresh build

Each category module in `ditq.prompts.suite_sources` holds 30 entries. An entry gets a stable id
(`<prefix>-<NNN>`, its 1-based position in the module), the category defaults below for fields it leaves unset, and
its caption from the `template` expander (so the file is reproducible byte for byte and needs no model).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditq.prompts.expanders.template import TemplateExpander
from ditq.prompts.records import PromptRecord, dumps_line

DATA_FILE = Path(__file__).parent / "data" / "suite.jsonl"


@dataclass(frozen=True, kw_only=True)
class Category:
    """A suite category: its name, id prefix, source module and the defaults for fields entries leave unset."""

    name: str
    prefix: str
    module: str
    has_text: bool
    defaults: dict[str, Any] = field(default_factory=dict)
    aesthetics: tuple[str, ...] = ()
    lighting: tuple[str, ...] = ()


CATEGORIES = (
    Category(
        name="typography",
        prefix="typo",
        module="typography",
        has_text=True,
        defaults={"layout": "stack", "medium": "typographic design", "script": "latin"},
        aesthetics=(
            "legible, well-balanced letterforms",
            "carefully spaced, crisp edges",
            "clear hierarchy, one focal phrase",
        ),
        lighting=("flat, even light with no shadows", "soft, even light across the surface"),
    ),
    Category(
        name="poster",
        prefix="poster",
        module="posters",
        has_text=True,
        defaults={"layout": "poster", "medium": "poster", "script": "latin"},
        aesthetics=(
            "flat graphic design, strong hierarchy",
            "clear focal graphic, readable at a distance",
            "balanced layout with deliberate negative space",
        ),
        lighting=("flat, even light with no cast shadows",),
    ),
    Category(
        name="logo",
        prefix="logo",
        module="logos",
        has_text=True,
        defaults={"layout": "logo", "medium": "logo design", "style": "flat vector logo", "script": "latin"},
        aesthetics=("simple, memorable, scalable mark", "clean vector shapes, balanced proportions"),
        lighting=("flat, even light, no shading",),
    ),
    Category(
        name="signage",
        prefix="sign",
        module="signage",
        has_text=True,
        defaults={
            "layout": "sign",
            "medium": "photograph",
            "style": "eye-level, 35mm lens, sign sharp and legible",
            "script": "latin",
        },
        aesthetics=(
            "documentary, true-to-life colour",
            "candid street photography",
            "crisp, natural, well exposed",
        ),
    ),
    Category(
        name="photo",
        prefix="photo",
        module="photographs",
        has_text=False,
        defaults={"layout": "scene", "medium": "photograph"},
        aesthetics=(
            "natural, true-to-life colour",
            "editorial, quiet and candid",
            "crisp detail, realistic textures",
        ),
    ),
    Category(
        name="illustration",
        prefix="illus",
        module="illustration",
        has_text=False,
        defaults={"layout": "scene", "medium": "illustration"},
        aesthetics=(
            "handmade texture, harmonious colour",
            "clear shapes and readable silhouettes",
            "storytelling detail, balanced composition",
        ),
        lighting=("soft, even light", "light from the upper left with gentle shading"),
    ),
    Category(
        name="3d_product",
        prefix="prod",
        module="product",
        has_text=False,
        defaults={"layout": "centered", "medium": "3D render"},
        aesthetics=(
            "clean commercial look, precise materials",
            "uncluttered presentation, true-to-material finish",
        ),
    ),
    Category(
        name="abstract",
        prefix="abs",
        module="abstract",
        has_text=False,
        defaults={"layout": "centered", "medium": "abstract digital art"},
        aesthetics=(
            "deliberate composition, strong colour relationships",
            "balanced rhythm of shapes",
            "considered negative space",
        ),
        lighting=("flat, even light", "soft diffuse light"),
    ),
    Category(
        name="layout",
        prefix="layout",
        module="layout",
        has_text=False,
        defaults={"layout": "grid", "medium": "photograph"},
        aesthetics=("orderly arrangement, every object clearly separated", "clean and readable composition"),
        lighting=("soft, even daylight",),
    ),
    Category(
        name="multiscript",
        prefix="script",
        module="multiscript",
        has_text=True,
        defaults={
            "layout": "sign",
            "medium": "photograph",
            "style": "eye-level, 35mm lens, sign sharp and legible",
        },
        aesthetics=("true-to-life colour, sign clearly legible", "clean graphic layout, crisp lettering"),
    ),
)
PER_CATEGORY = 30


def category_records(category: Category) -> list[PromptRecord]:
    """The category's entries as records (ids numbered from 001), captions not yet filled in."""
    module = importlib.import_module(f"ditq.prompts.suite_sources.{category.module}")
    if len(module.RECORDS) != PER_CATEGORY:
        raise ValueError(f"{module.__name__} has {len(module.RECORDS)} entries, expected {PER_CATEGORY}")
    records = []
    for index, source in enumerate(module.RECORDS):
        data = dict(source)
        for key, value in category.defaults.items():
            data.setdefault(key, value)
        if category.aesthetics:
            data.setdefault("aesthetics", category.aesthetics[index % len(category.aesthetics)])
        if category.lighting:
            data.setdefault("lighting", category.lighting[index % len(category.lighting)])
        if not data.get("texts"):
            data.pop("script", None)
        elif "script" not in data:
            data["script"] = "latin"
        data["id"] = f"{category.prefix}-{index + 1:03d}"
        data["category"] = category.name
        records.append(PromptRecord.from_dict(data, where=f"{module.__name__} entry {index + 1}"))
    return records


def build_records() -> list[PromptRecord]:
    """Every suite record with its template caption, in category order."""
    expander = TemplateExpander()
    out = []
    for category in CATEGORIES:
        for record in category_records(category):
            caption = expander.expand(record)
            out.append(
                PromptRecord(
                    id=record.id,
                    category=record.category,
                    prompt=record.prompt,
                    caption=caption,
                    texts=record.texts,
                    fields=record.fields,
                )
            )
    return out


def render() -> str:
    """The suite file's exact text."""
    return "".join(dumps_line(record.to_dict()) for record in build_records())


def is_up_to_date(path: Path = DATA_FILE) -> bool:
    """True when `path` holds exactly what a fresh build writes."""
    return path.exists() and path.read_text(encoding="utf-8") == render()


def write_suite(path: Path = DATA_FILE) -> int:
    """Rebuild the suite file; returns the number of records written."""
    text = render()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return text.count("\n")
