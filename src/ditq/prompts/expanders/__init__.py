"""Expanders turn a prompt record into a validated Ideogram 4 caption; `EXPANDERS` picks one by name.

Each registered object is a class called with keyword options (`EXPANDERS.get("openai")(base_url=...)`) that
builds an `Expander`. Every expander returns only captions that pass `ditq.prompts.validate_caption` at both
levels (official and lint), as canonical JSON text, or raises `ExpanderError`.

- `template`: offline and deterministic, from the record's fields (`ditq.prompts.expanders.template`).
- `openai`: any OpenAI-compatible chat endpoint with structured output (`ditq.prompts.expanders.openai_chat`).
- `ideogram4`: the model's own prompt enhancer, decoding constrained by the caption schema
  (`ditq.prompts.expanders.ideogram4`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, runtime_checkable

from ditq.errors import DitqError
from ditq.prompts.records import PromptRecord
from ditq.registry import Registry


class ExpanderError(DitqError):
    """An expander could not produce a valid caption for a record (after its retries)."""


@runtime_checkable
class Expander(Protocol):
    """Turns prompt records into canonical caption JSON text."""

    name: str

    def expand(self, record: PromptRecord) -> str:
        """The canonical caption of one record; raises `ExpanderError`."""
        ...


def expand_all(expander: Expander, records: Iterable[PromptRecord]) -> Iterator[tuple[PromptRecord, str]]:
    """Expand records one by one (lazily, so a caller can write each result before the next starts)."""
    for record in records:
        yield record, expander.expand(record)


EXPANDERS: Registry[Callable[..., Expander]] = Registry("caption expander")

# Each expander registers itself where it is defined; these modules keep torch, transformers and outlines
# imports inside the functions that need them, so importing them here is cheap.
from ditq.prompts.expanders import ideogram4, openai_chat, template  # noqa: E402, F401

__all__ = ["EXPANDERS", "Expander", "ExpanderError", "expand_all"]
