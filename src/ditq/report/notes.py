"""The report's opening sections: data notes (what limits the numbers) and the unavailable metrics, each named
once with the one line that says what would make it available."""

from __future__ import annotations

from ditq.report.document import Cell, Paragraph, Section, Table
from ditq.report.inputs import RunData

NOTES = "Data notes"
UNAVAILABLE = "Unavailable metrics"
MIN_PROMPTS = 20  # below this many prompts the report warns that bootstrap intervals run narrow

TINY_NOTE = (
    "The reference is ditq's built-in tiny model (random weights of the real classes): its images are noise, so "
    "the quality numbers, block rates, OCR scores and speeds of this report only show that every code path "
    "runs. Run `ditq bench --model ideogram-ai/ideogram-4-fp8` for numbers that describe the formats."
)


def notes_section(run: RunData) -> Section | None:
    notes = [TINY_NOTE] if run.tiny else []
    if not (run.root / "scores.csv").is_file():
        notes.append("The run has no scores.csv yet: run `ditq eval RUN` to score it; only sizes are shown.")
    elif run.scores.n_rows == 0:
        notes.append("scores.csv has no rows: run `ditq eval RUN` to score the images; only sizes are shown.")
    if run.reference_variant not in run.variants:
        notes.append(
            f"The run has no reference variant ({run.reference_variant!r}): fidelity vs reference unavailable."
        )
    if run.missing_images:
        shown = ", ".join(run.missing_images[:3]) + (", ..." if len(run.missing_images) > 3 else "")
        notes.append(f"metrics.json lists {len(run.missing_images)} image(s) missing on disk: {shown}.")
    scored = {p for obs in run.scores.cells.values() for p, _seed in obs}
    if 0 < len(scored) < MIN_PROMPTS:
        notes.append(
            f"Only {len(scored)} prompts are scored: bootstrap intervals from fewer than {MIN_PROMPTS} prompts "
            "are narrower than their nominal level; read the sign-flip p-values first."
        )
    for (variant, metric), count in sorted(run.scores.dropped_nonfinite.items()):
        notes.append(f"{variant} / {metric}: {count} non-finite or empty score(s) dropped.")
    if not notes:
        return None
    return Section(NOTES, "notes", [Paragraph(n, "note") for n in notes])


def unavailable_section(run: RunData) -> Section | None:
    """One row per metric that metrics.json marks unavailable: its reason, which names the file, command or
    environment variable that makes it available. Cells elsewhere say only "unavailable"."""
    missing = [m for m in run.metrics.values() if not m.available]
    if not missing:
        return None
    rows: list[list[str | Cell]] = [
        [m.name, m.family, m.reason or "no reason recorded in metrics.json"] for m in missing
    ]
    section = Section(UNAVAILABLE, "unavailable")
    section.add(
        Paragraph(
            "These metrics did not run, so no cell of the report shows a number for them. Each line says what "
            "makes the metric available; then `ditq eval RUN` scores only what is missing and `ditq report RUN` "
            "rebuilds this page (`ditq eval --help` lists every variable)."
        )
    )
    section.add(Table(["Metric", "Family", "What would make it available"], rows))
    return section
