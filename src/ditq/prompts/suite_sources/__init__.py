"""Hand-written sources of the benchmark suite: one module per category, each a list `RECORDS` of 30 entries.

An entry holds the raw prompt and the fields the `template` expander reads (see
`ditq.prompts.expanders.template`). `ditq.prompts.build_suite` numbers them, fills category defaults, expands
each with the template expander and writes `ditq/prompts/data/suite.jsonl`.
"""

from __future__ import annotations

from typing import Any

# Uppercase #RRGGBB palettes shared by the entries (the caption rules reject lowercase hex).
PALETTES: dict[str, list[str]] = {
    "coral_navy": ["#FF6F59", "#1B2A49", "#F4F1EA"],
    "ink_cream": ["#1A1A1A", "#F3E9D2", "#B5651D"],
    "teal_mustard": ["#0F5E63", "#E3B23C", "#F2E8CF", "#1D1D1D"],
    "forest": ["#2D4A22", "#7A9E4E", "#D8CBA8", "#5B3A1E"],
    "sunset": ["#FF7B54", "#FFB26B", "#FFD56F", "#5C3D6E"],
    "pastel": ["#F7C8D0", "#BDE0FE", "#CDEAC0", "#FFF1B5"],
    "mono": ["#111111", "#F5F5F5", "#8A8A8A"],
    "neon": ["#FF2E88", "#00E5FF", "#1A0933", "#F9F871"],
    "earth": ["#A0522D", "#D2B48C", "#556B2F", "#F5F0E6"],
    "ocean": ["#03396C", "#005B96", "#6497B1", "#B3CDE0"],
    "autumn": ["#9E2A2B", "#E09F3E", "#FFF3B0", "#335C67"],
    "vintage": ["#D8A48F", "#8C5E58", "#F2E3C6", "#3E4A3D"],
    "bauhaus": ["#E63946", "#1D3557", "#F1FAEE", "#FFB703"],
    "candy": ["#FF5D8F", "#FFD6E0", "#7BDFF2", "#FDFDFD"],
    "gold_black": ["#0B0B0B", "#C9A227", "#F7F3E3"],
    "mint": ["#3EB489", "#E8F6EF", "#1F3B4D"],
    "lavender": ["#B497D6", "#E9D8FD", "#3D2C5E"],
    "desert": ["#C2956B", "#EDC9AF", "#7F4F24", "#F6E7D8"],
    "night": ["#0B132B", "#1C2541", "#5BC0BE", "#F2C14E"],
    "citrus": ["#FFB400", "#FF6F00", "#2E933C", "#FFF8E7"],
    "red_white": ["#C8102E", "#FAFAFA", "#1C1C1C"],
    "slate": ["#2F3E46", "#52796F", "#CAD2C5", "#84A98C"],
}


def entry(
    prompt: str,
    subject: str,
    setting: str,
    *,
    texts: tuple[str, ...] | list[str] = (),
    typography: str | list[str] | None = None,
    medium: str | None = None,
    style: str | None = None,
    aesthetics: str | None = None,
    lighting: str | None = None,
    details: str | None = None,
    objects: list[Any] | None = None,
    palette: str | None = None,
    layout: str | None = None,
    script: str | None = None,
) -> dict[str, Any]:
    """One suite entry; `palette` names a `PALETTES` entry; unset fields take the category defaults."""
    fields: dict[str, Any] = {"prompt": prompt, "texts": list(texts), "subject": subject, "setting": setting}
    optional = {
        "typography": typography,
        "medium": medium,
        "style": style,
        "aesthetics": aesthetics,
        "lighting": lighting,
        "details": details,
        "objects": objects,
        "palette": PALETTES[palette] if palette else None,
        "layout": layout,
        "script": script,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    return fields
