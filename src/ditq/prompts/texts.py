"""The text a prompt asks an image to show: quoted strings, and unquoted ones after a cue ("says OPEN").

`requested_texts` gives a prompt record its `texts` (what OCR scores) when the record names none: the template
expander renders them as text elements, and `ditq captions expand` writes them into each output record whatever
the expander. Checked on the shipped suite's 300 prompts: the strings found are exactly the hand-written `texts`
(four prompts put two of them in one quoted string), and no prompt without text yields any.
"""

from __future__ import annotations

import re

_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”|«([^»]+)»|「([^」]+)」")
_QUOTE_CHARS = "\"“«「'‘"

# Words that introduce the text an image should show. After a strong cue ("with the words", "that says") the text
# may be lower case and runs to the next delimiter; after a weak one ("reading", "titled"), whose verb also has
# other senses ("a girl reading a book"), only a run of capitalized, numeric or caseless-script words counts.
_STRONG_CUE = (
    r"(?:with|showing|bearing|displaying|reading)\s+the\s+(?:words?|text|letters|phrase|slogan|caption|"
    r"headline|tagline|title|name)|the\s+(?:words?|text|phrase|slogan)|(?:that|which)\s+(?:says|reads|"
    r"spells(?:\s+out)?)|says|saying"
)
_WEAK_CUE = (
    r"reads|reading|(?:en)?titled|labell?ed(?:\s+with)?|captioned|inscribed(?:\s+with)?|engraved(?:\s+with)?|"
    r"spelling(?:\s+out)?|spells(?:\s+out)?|lettered\s+with|printed\s+with|branded"
)
_CUE = re.compile(rf"\b(?:(?P<strong>{_STRONG_CUE})|(?P<weak>{_WEAK_CUE}))\b[ \t]*:?[ \t]*", re.IGNORECASE)
# A lower-case text after a strong cue ends before these words, at punctuation, or after eight words.
_LOWER_END = re.compile(
    r"[,.;:!?()]|\s(?:in|on|with|and|above|below|under|over|at|beside|next|across|along|written|painted|"
    r"printed|carved|against|near)\b"
)
# Lower-case words that join capitalized ones inside a name ("Bank of England", "Café de Flore").
_CONNECTORS = frozenset({"of", "the", "and", "&", "de", "du", "la", "le", "von", "van", "der", "y", "e", "-"})


def quoted_strings(prompt: str) -> list[str]:
    """Strings the prompt puts in double, curly, angle or corner quotes: the exact text to render."""
    return [next(g for g in match.groups() if g) for match in _QUOTED.finditer(prompt)]


def _is_text_word(word: str) -> bool:
    """Capitalized, numeric, a caseless script (Arabic, CJK, ...) or a sign symbol: looks like requested text."""
    first = next((c for c in word if c.isalnum() or c in "&#@$€£%+"), "")
    return bool(first) and not first.islower()


def _capitalized_run(rest: str) -> str:
    words = rest.split()
    run: list[str] = []
    for i, word in enumerate(words):
        core = word.rstrip(".,;:")
        ends = core != word
        joins = core.lower() in _CONNECTORS and run and i + 1 < len(words) and _is_text_word(words[i + 1])
        if not (_is_text_word(core) or joins):
            break
        run.append(core)
        if ends or word.endswith(")"):
            break
    while run and run[-1].lower() in _CONNECTORS:
        run.pop()
    return " ".join(run).strip("()")


def _lower_run(rest: str) -> str:
    end = _LOWER_END.search(rest)
    return " ".join((rest[: end.start()] if end else rest).split()[:8])


def requested_texts(prompt: str) -> list[str]:
    """Every string the prompt asks the image to show, in order: the quoted ones (`quoted_strings`) and the
    unquoted ones a cue introduces ("a neon sign that says OPEN", "a book titled Moby Dick", "with the words
    good morning"). Duplicates are dropped."""
    found = [(m.start(), next(g for g in m.groups() if g)) for m in _QUOTED.finditer(prompt)]
    for cue in _CUE.finditer(prompt):
        rest = prompt[cue.end() :]
        if not rest or rest[0] in _QUOTE_CHARS:
            continue  # quoted: already found
        text = _capitalized_run(rest)
        if not text and cue.group("strong"):
            text = _lower_run(rest)
        if text:
            found.append((cue.end(), text))
    return list(dict.fromkeys(text for _pos, text in sorted(found)))
