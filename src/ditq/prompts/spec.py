"""The caption spec as instructions for a language model: the system prompt of the `openai` expander.

The text is built from the same constants the validator checks (`ditq.prompts.schema`), so the two cannot drift.
"""

from __future__ import annotations

import math

from ditq.prompts import schema
from ditq.prompts.records import PromptRecord

_EXAMPLE = (
    '{"high_level_description":"A ceramic teapot on a kitchen windowsill, a still-life photograph.",'
    '"style_description":{"aesthetics":"quiet, uncluttered, true-to-life colour","lighting":"soft morning light from '
    'the window on the left","photo":"eye-level, 50mm lens","medium":"photograph","color_palette":["#2F6690",'
    '"#F2E8CF","#8C5E58"]},"compositional_deconstruction":{"background":"A white-painted wooden windowsill with a '
    'view of a pale garden through old glass panes.","elements":[{"type":"obj","bbox":[380,250,880,700],"desc":'
    '"A round cobalt-blue ceramic teapot with a bamboo handle and a small chip on the spout, resting on the '
    'windowsill.","color_palette":["#2F6690"]},{"type":"text","bbox":[610,360,690,590],"text":"Earl Grey",'
    '"desc":"Small cream serif lettering hand-painted on the side of the teapot."}]}}'
)


def caption_instructions() -> str:
    """The system prompt: what to write, the exact key orders and limits, and one worked example."""
    photo = ", ".join(k for k in schema.STYLE_ORDER_PHOTO)
    art = ", ".join(k for k in schema.STYLE_ORDER_ART)
    obj = ", ".join(schema.ELEMENT_ORDER["obj"])
    text = ", ".join(schema.ELEMENT_ORDER["text"])
    return f"""You write image captions for the Ideogram 4 text-to-image model. Given a short prompt, reply with ONE JSON object, minified on a single line, and nothing else: no markdown fences, no comments.

The object has these keys, in this order:
1. "high_level_description" (string): one sentence naming the main subject first, then the medium.
2. "style_description" (object), keys in exactly this order:
   - for a photograph: {photo}
   - for anything else (painting, illustration, 3D render, graphic design, ...): {art}
   Never use both "photo" and "art_style". "color_palette" is optional and always last: at most {schema.STYLE_PALETTE_MAX} colours, each an uppercase "#RRGGBB" string.
3. "compositional_deconstruction" (object, required) with "background" (string: the setting, or the backdrop of a designed piece) and then "elements" (a non-empty array).

Each element is one of:
- an object: keys in order {obj}
- a piece of text: keys in order {text}
"bbox" and "color_palette" are optional. "bbox" is [y_min, x_min, y_max, x_max], integers from {schema.BBOX_MIN} to {schema.BBOX_MAX} measured from the top-left corner, with y_min < y_max and x_min < x_max. An element palette has at most {schema.ELEMENT_PALETTE_MAX} uppercase "#RRGGBB" colours.

Guidance:
- The main subject is the first element. Every separate thing the prompt names gets its own element.
- Every string the prompt asks to show (usually in quotes) becomes its own "text" element, copied character for character, accents and non-Latin scripts included; "desc" then describes the lettering and where it sits.
- Each "desc" describes one element concretely: identity first, then colour, material, shape and position.
- Choose one concrete value for each property; do not list alternatives.
- A poster, logo, cover or card fills the whole frame: its background is the design's own backdrop, not a room.
- Do not add text, objects or effects the prompt does not ask for.
- Keep non-ASCII characters as they are; do not escape them.

Example reply for the prompt: a photo of a blue teapot labelled "Earl Grey" on a windowsill
{_EXAMPLE}"""


def user_message(record: PromptRecord, width: int = 1024, height: int = 1024) -> str:
    """The user turn for one record: aspect ratio, the prompt, and the exact strings it must render."""
    divisor = math.gcd(width, height) or 1
    lines = [
        f"Aspect ratio (width:height): {width // divisor}:{height // divisor}",
        f"Prompt: {record.prompt}",
    ]
    if record.texts:
        quoted = "; ".join(f'"{t}"' for t in record.texts)
        lines.append(f"Render exactly these strings, each as its own text element: {quoted}")
    return "\n".join(lines)


def repair_message(problems: list[str]) -> str:
    """The follow-up turn after an invalid reply: the validator's findings, and a request for a full rewrite."""
    listed = "\n".join(f"- {p}" for p in problems[:20])
    more = f"\n- ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return (
        "Your reply is not a valid caption. The checker found:\n"
        f"{listed}{more}\n"
        "Reply again with the complete corrected JSON object only, on one line."
    )
