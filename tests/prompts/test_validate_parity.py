"""Parity with the official verifier's rules, and no exception for any JSON value.

`official_accepts` below is a second, independent reading of the official caption verifier's rules (as listed in
ditq.prompts.rules), written as plain predicates. `validate_caption` at the official level must accept exactly
what it accepts: on seeded mutations of all 300 suite captions, and on captions hypothesis builds near the format.
"""

from __future__ import annotations

import copy
import json
import random
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditq.prompts import RULES, load_suite, validate_caption
from ditq.prompts.rules import LEVELS

TOP = ("high_level_description", "style_description", "compositional_deconstruction")
STYLE_PHOTO = ("aesthetics", "lighting", "photo", "medium", "color_palette")
STYLE_ART = ("aesthetics", "lighting", "medium", "art_style", "color_palette")
ELEMENT = {
    "obj": ("type", "bbox", "desc", "color_palette"),
    "text": ("type", "bbox", "text", "desc", "color_palette"),
}
OPTIONAL = ("bbox", "color_palette")


def _colours_ok(palette, limit: int) -> bool:
    if not isinstance(palette, list) or len(palette) > limit:
        return False
    return all(
        isinstance(c, str) and len(c) == 7 and c[0] == "#" and all(ch in "0123456789ABCDEF" for ch in c[1:])
        for c in palette
    )


def _keys_exactly(obj: dict, order: tuple[str, ...], optional: tuple[str, ...]) -> bool:
    """The keys of `obj` are the keys of `order` (optional ones may be left out), in that order, and no others."""
    wanted = tuple(k for k in order if k not in optional or k in obj)
    return tuple(obj) == wanted


def _style_ok(style) -> bool:
    if not isinstance(style, dict):
        return False
    if ("photo" in style) == ("art_style" in style):
        return False
    order = STYLE_PHOTO if "photo" in style else STYLE_ART
    if not _keys_exactly(style, order, ("color_palette",)):
        return False
    return "color_palette" not in style or _colours_ok(style["color_palette"], 16)


def _bbox_ok(box) -> bool:
    if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, int) for v in box):
        return False
    return all(0 <= v <= 1000 for v in box) and box[0] <= box[2] and box[1] <= box[3]


def _element_ok(element) -> bool:
    if not isinstance(element, dict) or "type" not in element:
        return False
    kind = element["type"]
    if not any(kind == name and isinstance(kind, str) for name in ELEMENT):
        return False
    if not _keys_exactly(element, ELEMENT[kind], OPTIONAL):
        return False
    if "bbox" in element and not _bbox_ok(element["bbox"]):
        return False
    return "color_palette" not in element or _colours_ok(element["color_palette"], 5)


def official_accepts(caption) -> bool:
    """The official verifier's rules as one predicate over a parsed caption."""
    if not isinstance(caption, dict) or any(k not in TOP for k in caption):
        return False
    if "high_level_description" in caption and not isinstance(caption["high_level_description"], str):
        return False
    if "style_description" in caption and not _style_ok(caption["style_description"]):
        return False
    comp = caption.get("compositional_deconstruction")
    if not isinstance(comp, dict) or tuple(comp) != ("background", "elements"):
        return False
    if not isinstance(comp["background"], str) or not isinstance(comp["elements"], list):
        return False
    return all(_element_ok(e) for e in comp["elements"])


def official_accepts_text(text: str) -> bool:
    escapes = [int(h, 16) for h in re.findall(r"\\u([0-9a-fA-F]{4})", text)]
    if any(code >= 0x80 for code in escapes) and all(ord(ch) < 0x80 for ch in text):
        return False
    try:
        return official_accepts(json.loads(text))
    except ValueError:
        return False


# ---------------------------------------------------------------- seeded mutations of the suite

JUNK = [None, True, 0, -3, 7.5, "", "x", "#ABCDEF", "#abcdef", [], {}, ["obj"], {"type": "obj"}, [1, 2, 3, 4]]
KEYS = (
    list(TOP)
    + list(STYLE_PHOTO)
    + ["art_style", "background", "elements", "type", "bbox", "text", "desc", "x"]
)


def _nodes(value, path=()):
    """Every (path, container) in a caption, depth first."""
    if isinstance(value, dict | list):
        yield path, value
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in items:
            yield from _nodes(child, (*path, key))


def _mutate(caption: dict, rng: random.Random) -> dict:
    caption = copy.deepcopy(caption)
    for _ in range(rng.randint(1, 3)):
        path, node = rng.choice(list(_nodes(caption)))
        kind = rng.randrange(9)
        if isinstance(node, dict) and node and kind < 5:
            keys = list(node)
            if kind == 0:  # drop a key
                del node[rng.choice(keys)]
            elif kind == 1:  # swap two keys
                i, j = rng.randrange(len(keys)), rng.randrange(len(keys))
                keys[i], keys[j] = keys[j], keys[i]
                items = {k: node[k] for k in keys}
                node.clear()
                node.update(items)
            elif kind == 2:  # a value of another kind
                node[rng.choice(keys)] = copy.deepcopy(rng.choice(JUNK))
            elif kind == 3:  # a key known elsewhere, or unknown
                node.setdefault(rng.choice(KEYS), copy.deepcopy(rng.choice(JUNK + ["#FFFFFF", "obj"])))
            else:  # element-type and box edits where there is one
                if "type" in node:
                    node["type"] = copy.deepcopy(
                        rng.choice(["obj", "text", "image", ["obj"], {"t": 1}, None])
                    )
                if "bbox" in node or rng.random() < 0.5:
                    a, b = rng.randint(-5, 1005), rng.randint(-5, 1005)
                    node["bbox"] = rng.choice(
                        [[a, b, a, b], [a, b, rng.randint(0, 1000), b], [False, 0, True, 1]]
                    )
        elif isinstance(node, list):
            if node and kind < 3:
                node[rng.randrange(len(node))] = copy.deepcopy(rng.choice(JUNK + ["#ffffff", "#FFFFFF"]))
            elif kind < 5:
                node.clear()
            else:
                node.extend(copy.deepcopy(node[:1]) * rng.randint(1, 16))
        elif kind == 8 and path == ():
            keys = list(caption)
            rng.shuffle(keys)
            caption = {k: caption[k] for k in keys}
    return caption


def test_official_level_agrees_with_the_rules_on_suite_mutations():
    rng = random.Random(20261201)
    captions = [json.loads(r.caption) for r in load_suite("full")]
    assert len(captions) == 300
    checked = refused = 0
    disagreements = []
    for caption in captions:
        assert validate_caption(caption) == [] and official_accepts(caption)
        for _ in range(20):
            mutant = _mutate(caption, rng)
            text = json.dumps(mutant, ensure_ascii=rng.random() < 0.2)
            ours = not validate_caption(mutant)
            ours_text = not validate_caption(text)
            if ours != official_accepts(mutant) or ours_text != official_accepts_text(text):
                disagreements.append(text)
            lint = validate_caption(mutant, level="lint")
            assert {(p.path, p.rule, p.message) for p in validate_caption(mutant)} <= {
                (p.path, p.rule, p.message) for p in lint
            }
            checked += 1
            refused += not ours
    assert not disagreements, disagreements[:3]
    assert checked == 6000 and 1500 < refused < 5500  # the mutations exercise both outcomes


# ---------------------------------------------------------------- hypothesis: near-captions and any JSON

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=1003),
    st.integers(),
    st.floats(),
    st.text(max_size=6),
    st.sampled_from(["obj", "text", "#ABCDEF", "#abcdef", "#12345", "", "café", "\\u00e9"]),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=4))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=24,
)


def _maybe(good):
    """Mostly a well-formed value, sometimes any JSON value."""
    return st.one_of(good, good, good, json_values)


def _object(data, fields: dict, required: tuple[str, ...]):
    chosen = [k for k in fields if k in required or data.draw(st.booleans())]
    if data.draw(st.integers(0, 5)) == 0:
        chosen = data.draw(st.permutations(chosen))
    obj = {k: data.draw(fields[k]) for k in chosen}
    if data.draw(st.integers(0, 7)) == 0:
        obj[data.draw(keys)] = data.draw(json_values)
    return obj


def _caption(data):
    colour = st.sampled_from(["#FFFFFF", "#0A0B0C", "#ffffff", "#FFF", "white"])
    palette = lambda n: _maybe(st.lists(colour, max_size=n + 1))  # noqa: E731
    box = _maybe(st.lists(st.integers(-2, 1002), min_size=4, max_size=4))
    text = _maybe(st.text(max_size=5))
    kind = data.draw(st.sampled_from(["obj", "text", "image"]))
    element_fields = {
        "type": _maybe(st.just(kind)),
        "bbox": box,
        "text": text,
        "desc": text,
        "color_palette": palette(5),
    }
    element_keys = ELEMENT.get(kind, ELEMENT["text"])
    elements = [
        _object(data, {k: element_fields[k] for k in element_keys}, ("type", "desc", "text"))
        for _ in range(data.draw(st.integers(0, 3)))
    ]
    style_order = data.draw(st.sampled_from([STYLE_PHOTO, STYLE_ART, (*STYLE_PHOTO, "art_style")]))
    style = _object(
        data, {k: palette(16) if k == "color_palette" else text for k in style_order}, style_order[:4]
    )
    comp = _object(
        data, {"background": text, "elements": _maybe(st.just(elements))}, ("background", "elements")
    )
    top = {"high_level_description": text, "style_description": _maybe(st.just(style))}
    top["compositional_deconstruction"] = _maybe(st.just(comp))
    return _object(data, top, ("compositional_deconstruction",))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_official_level_agrees_with_the_rules_near_the_format(data):
    caption = _caption(data)
    assert (not validate_caption(caption)) == official_accepts(caption)
    text = json.dumps(caption, ensure_ascii=data.draw(st.booleans()))
    assert (not validate_caption(text)) == official_accepts_text(text)


def _assert_well_formed(problems) -> None:
    for p in problems:
        assert p.rule in RULES and p.level in LEVELS
        assert isinstance(p.path, str) and p.path.startswith("$")
        str(p).encode("utf-8")  # printable


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_no_json_value_raises(value):
    for level in LEVELS:
        _assert_well_formed(validate_caption(value, level=level))
        _assert_well_formed(validate_caption(json.dumps(value), level=level))
        _assert_well_formed(validate_caption({"compositional_deconstruction": value}, level=level))
        comp = {"background": "b", "elements": [value, {"type": "obj", "desc": "d", "bbox": value}]}
        _assert_well_formed(validate_caption({"compositional_deconstruction": comp}, level=level))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.binary(max_size=40))
def test_no_text_raises(text):
    for level in LEVELS:
        problems = validate_caption(text, level=level)
        _assert_well_formed(problems)
