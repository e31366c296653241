"""The `template` expander: an offline, deterministic caption from a prompt record's fields.

For when no language model is available (CI, air-gapped machines) and for the committed benchmark suite. It reads
these optional record fields (a bare `{"id", "prompt"}` record works too: then the prompt is the subject, quoted
strings in it, and unquoted text after a cue such as "says" or "titled" (`requested_texts`), become text
elements and the medium is guessed from keywords):

    subject      the main subject, a noun phrase ("a red fox asleep on a mossy log")
    details      more about the subject, appended to its description (layout "stack": an ornament by the words)
    medium       "photograph", "watercolor painting", "3D render", "poster", ... (photo vs art style follows it)
    style        camera and lens for a photograph, the art style otherwise
    aesthetics, lighting          style_description fields
    setting      the background
    objects      supporting elements: strings, or {"desc", "position"} with a position word (see `POSITIONS`)
    texts        exact strings to render; `typography` (one string, or one per text) describes their lettering
    layout       scene | poster | logo | sign | stack | grid | centered (how boxes are placed)
    palette      uppercase #RRGGBB colours for the whole image (the subject gets the first three)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ditq.errors import ConfigError
from ditq.prompts.expanders import EXPANDERS
from ditq.prompts.records import PromptRecord
from ditq.prompts.schema import ELEMENT_PALETTE_MAX, STYLE_PALETTE_MAX, canonical_json
from ditq.prompts.texts import quoted_strings, requested_texts
from ditq.prompts.validate import check_caption

__all__ = ["TemplateExpander", "guess_medium", "quoted_strings", "requested_texts"]

Box = list[int]  # [y_min, x_min, y_max, x_max] on the 0-1000 grid

POSITIONS: dict[str, Box] = {
    "top-left": [60, 40, 440, 460],
    "top": [60, 300, 440, 700],
    "top-right": [60, 540, 440, 960],
    "left": [300, 40, 780, 330],
    "center": [280, 330, 760, 670],
    "right": [300, 670, 780, 960],
    "bottom-left": [560, 40, 940, 460],
    "bottom": [560, 300, 940, 700],
    "bottom-right": [560, 540, 940, 960],
    "foreground": [620, 200, 980, 800],
    "background": [40, 100, 420, 900],
}

# Where the subject goes, where supporting objects go (in turn), and the region texts are stacked into.
_LAYOUTS: dict[str, dict[str, Any]] = {
    "scene": {
        "subject": [160, 220, 900, 780],
        "objects": ["bottom-left", "bottom-right", "top-left", "top-right", "left", "right"],
        "text_band": [40, 120, 200, 880],
    },
    "poster": {
        "subject": [240, 140, 700, 860],
        "objects": ["bottom-left", "bottom-right", "top-left", "top-right"],
        "text_band": [50, 80, 230, 920],
        "text_tail": [740, 120, 950, 880],
    },
    "logo": {
        "subject": [180, 330, 600, 670],
        "objects": ["left", "right"],
        "text_band": [630, 140, 800, 860],
        "text_tail": [810, 240, 900, 760],
    },
    "sign": {
        "subject": [120, 100, 720, 900],
        "objects": ["bottom-left", "bottom-right", "foreground"],
        "text_band": [200, 170, 640, 830],
    },
    "stack": {
        "subject": [780, 380, 940, 620],
        "objects": ["bottom-left", "bottom-right"],
        "text_band": [120, 80, 760, 920],
    },
    "grid": {
        "subject": None,
        "objects": ["left", "center", "right", "top-left", "top-right", "bottom-left", "bottom-right"],
        "text_band": [40, 120, 180, 880],
    },
    "centered": {  # text on a centered subject is its label
        "subject": [200, 220, 820, 780],
        "objects": ["bottom-left", "bottom-right", "top-left", "top-right"],
        "text_band": [420, 300, 600, 700],
    },
}

_MEDIUM_KEYWORDS = (
    (("poster", "flyer", "album cover", "book cover", "banner"), "poster", "poster"),
    (("logo", "wordmark", "emblem", "badge"), "logo design", "logo"),
    (("watercolor", "watercolour", "oil painting", "gouache", "painting"), "painting", "scene"),
    (("illustration", "cartoon", "anime", "comic", "vector"), "illustration", "scene"),
    (("3d", "render", "clay"), "3D render", "centered"),
    (("typography", "lettering", "calligraphy"), "typographic design", "stack"),
    (("photo", "photograph", "shot", "portrait", "snapshot"), "photograph", "scene"),
)


def guess_medium(prompt: str, has_text: bool) -> tuple[str, str]:
    """(medium, layout) from keywords in a bare prompt; a photograph if nothing matches and there is no text."""
    low = prompt.lower()
    for words, medium, layout in _MEDIUM_KEYWORDS:
        if any(re.search(rf"\b{re.escape(w)}", low) for w in words):
            return medium, layout
    return ("graphic design", "poster") if has_text else ("photograph", "scene")


def _sentence(text: str) -> str:
    text = " ".join(text.split()).rstrip(" .")
    return text[:1].upper() + text[1:] + "." if text else ""


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _region_words(box: Box) -> str:
    y = (box[0] + box[2]) / 2
    x = (box[1] + box[3]) / 2
    vertical = "upper" if y < 380 else "lower" if y > 620 else "middle"
    horizontal = "left" if x < 380 else "right" if x > 620 else "center"
    if vertical == "middle" and horizontal == "center":
        return "in the center of the frame"
    if vertical == "middle":
        return f"on the {horizontal} side of the frame"
    return (
        f"in the {vertical} {horizontal} of the frame"
        if horizontal != "center"
        else f"in the {vertical} part of the frame"
    )


def _bands(region: Box, count: int) -> list[Box]:
    """Split `region` into `count` stacked horizontal bands with a small gap (each band at least 2 units tall)."""
    y0, x0, y1, x1 = region
    height = (y1 - y0) / count
    gap = min(12.0, height / 6)
    return [
        [int(y0 + i * height), x0, max(int(y0 + (i + 1) * height - gap), int(y0 + i * height) + 2), x1]
        for i in range(count)
    ]


def _text_boxes(layout: dict[str, Any], count: int) -> list[Box]:
    """The first text takes the main band; with a `text_tail` region the rest go there (headline + footer)."""
    if count == 0:
        return []
    tail = layout.get("text_tail")
    if tail is None or count == 1:
        return _bands(layout["text_band"], count)
    return [layout["text_band"]] + _bands(tail, count - 1)


def _label_box(box: Box) -> Box:
    """The middle third (vertically) of an object's box, inset: where a label on that object sits."""
    y0, x0, y1, x1 = box
    third = (y1 - y0) // 3
    inset = (x1 - x0) // 8
    return [y0 + third, x0 + inset, y1 - third, x1 - inset]


def _as_list(value: Any, name: str, record_id: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence):
        return list(value)
    raise ConfigError(f"prompt {record_id!r}: field {name!r} must be a string or a list")


@EXPANDERS.register("template")
class TemplateExpander:
    """Deterministic captions from record fields (see the module docstring); same record, same bytes."""

    name = "template"

    def __init__(self, *, default_photo: str = "eye-level view, 50mm lens, natural perspective") -> None:
        self.default_photo = default_photo

    def caption(self, record: PromptRecord) -> dict[str, Any]:
        """The caption as an ordered dict (not yet validated)."""
        get = record.get
        texts = list(record.texts) or requested_texts(record.prompt)
        medium, guessed_layout = guess_medium(record.prompt, bool(texts))
        medium = get("medium") or medium
        layout_name = get("layout") or guessed_layout
        if layout_name not in _LAYOUTS:
            raise ConfigError(
                f"prompt {record.id!r}: unknown layout {layout_name!r}; known: {', '.join(_LAYOUTS)}"
            )
        layout = _LAYOUTS[layout_name]
        is_photo = "photo" in medium.lower()
        subject = get("subject") or record.prompt
        style = get("style") or ""
        palette = [c.upper() for c in _as_list(get("palette"), "palette", record.id)][:STYLE_PALETTE_MAX]

        described_as = f"{_article(medium)} {medium}"
        if style and not is_photo:
            described_as += f" in {style}" + ("" if style.lower().endswith("style") else " style")
        caption: dict[str, Any] = {"high_level_description": _sentence(f"{subject}, {described_as}")}
        sd: dict[str, Any] = {
            "aesthetics": get("aesthetics") or "clean, balanced composition with a clear focal point",
            "lighting": get("lighting") or "soft, even light",
        }
        if is_photo:
            sd["photo"] = style or self.default_photo
            sd["medium"] = medium
        else:
            sd["medium"] = medium
            sd["art_style"] = style or f"contemporary {medium}"
        if palette:
            sd["color_palette"] = palette
        caption["style_description"] = sd

        default_background = (
            "A real, specific setting around the subject with natural surroundings and depth."
            if is_photo
            else "A flat, evenly filled backdrop covering the whole frame, no scene and no depth."
        )
        elements: list[dict[str, Any]] = []
        subject_box = layout["subject"]
        subject_element: dict[str, Any] = {"type": "obj"}
        if subject_box is not None:
            subject_element["bbox"] = list(subject_box)
        details = get("details") or ""
        subject_element["desc"] = _sentence(f"{subject}{', ' + details if details else ''}")
        if palette:
            subject_element["color_palette"] = palette[: min(3, ELEMENT_PALETTE_MAX)]

        objects = _as_list(get("objects"), "objects", record.id)
        free_slots = iter(layout["objects"])
        object_elements = []
        for item in objects:
            desc, position = (
                (item.get("desc", ""), item.get("position")) if isinstance(item, dict) else (item, None)
            )
            if not isinstance(desc, str) or not desc.strip():
                raise ConfigError(f"prompt {record.id!r}: every object needs a non-empty description")
            if position is not None and position not in POSITIONS:
                raise ConfigError(
                    f"prompt {record.id!r}: unknown position {position!r}; known: {', '.join(POSITIONS)}"
                )
            slot = POSITIONS[position] if position else POSITIONS[next(free_slots, "foreground")]
            object_elements.append(
                {"type": "obj", "bbox": list(slot), "desc": _sentence(f"{desc}, {_region_words(slot)}")}
            )

        typography = _as_list(get("typography"), "typography", record.id)
        if layout_name == "grid" and object_elements and len(texts) == len(object_elements):
            text_boxes = [_label_box(obj["bbox"]) for obj in object_elements]  # one label per placed object
        else:
            text_boxes = _text_boxes(layout, len(texts))
        text_elements = []
        for i, (text, box) in enumerate(zip(texts, text_boxes, strict=True)):
            style_words = (
                typography[i]
                if i < len(typography)
                else (typography[-1] if typography else "clean, legible lettering")
            )
            text_elements.append(
                {
                    "type": "text",
                    "bbox": box,
                    "text": text,
                    "desc": _sentence(f"{style_words}, {_region_words(box)}"),
                }
            )

        if layout_name == "stack":  # the words are the subject; `details` names an ornament beside them
            ornament = (
                [{"type": "obj", "bbox": list(subject_box), "desc": _sentence(details)}] if details else []
            )
            elements = text_elements + ornament + object_elements
        elif layout_name == "grid" and object_elements:  # the placed objects are the subjects
            elements = object_elements + text_elements
        else:
            elements = [subject_element] + object_elements + text_elements
        caption["compositional_deconstruction"] = {
            "background": get("setting") or default_background,
            "elements": elements,
        }
        return caption

    def expand(self, record: PromptRecord) -> str:
        """Canonical caption JSON; raises `CaptionError` if the fields make an invalid caption (bad colours...)."""
        return canonical_json(
            check_caption(self.caption(record), where=f"prompt {record.id!r}", level="lint")
        )
