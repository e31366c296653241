"""Expand a prompt file into a caption file, resumably: ids already in the output are skipped.

A record without `texts` gets the strings its prompt asks for (`ditq.prompts.texts.requested_texts`: quoted, or
after a cue such as "says OPEN"), so OCR has something to score whichever expander wrote the caption.

Each finished record is appended as one complete, fsynced line (`records.append_line`), so an interrupted run
loses at most the record in flight; `records.open_resumable` drops a torn last line before resuming.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ditq.prompts.expanders import Expander, ExpanderError
from ditq.prompts.records import PromptRecord, append_line, open_resumable
from ditq.prompts.texts import requested_texts
from ditq.prompts.validate import check_caption

log = logging.getLogger(__name__)


@dataclass
class ExpandSummary:
    """What one run did: ids written now, ids found already done, and (with `keep_going`) ids that failed."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def pending(records: Sequence[PromptRecord], output: str | Path) -> tuple[list[PromptRecord], set[str]]:
    """Records whose id is not in `output` yet, and the ids that are (a torn last line is dropped first)."""
    handle, done = open_resumable(output)
    handle.close()
    return [r for r in records if r.id not in done], done


def expand_to_file(
    records: Sequence[PromptRecord],
    expander: Expander,
    output: str | Path,
    *,
    keep_going: bool = False,
    on_record: Callable[[PromptRecord], None] | None = None,
) -> ExpandSummary:
    """Expand every record not yet in `output` and append it with its caption.

    An `ExpanderError` stops the run (earlier lines stay written, a rerun resumes) unless `keep_going`, which
    records the failure and moves on. `on_record` is called after each record is written or fails (progress).
    """
    handle, done = open_resumable(output)
    summary = ExpandSummary(skipped=[r.id for r in records if r.id in done])
    if summary.skipped:
        log.info(
            "%s: %d of %d prompts already expanded, resuming", output, len(summary.skipped), len(records)
        )
    with handle:
        for record in records:
            if record.id in done:
                continue
            try:
                caption = expander.expand(record)
                check_caption(caption, where=f"{expander.name} expander, prompt {record.id!r}", level="lint")
            except ExpanderError as exc:
                if not keep_going:
                    raise ExpanderError(
                        f"{exc} ({len(summary.written)} caption(s) written by this run are kept in {output}; "
                        "a rerun resumes after them)"
                    ) from None
                summary.failed[record.id] = str(exc)
                log.error("%s", exc)
            else:
                data = record.to_dict()
                if not record.texts:  # what OCR will score: the text the prompt asks for
                    data["texts"] = requested_texts(record.prompt)
                data.pop("caption", None)
                data["expander"] = expander.name
                data["caption"] = caption
                append_line(handle, data)
                done.add(record.id)
                summary.written.append(record.id)
            if on_record is not None:
                on_record(record)
    return summary
