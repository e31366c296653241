"""The "Image grids" section: a few prompts, every variant side by side in each caption mode, difference maps
against the reference, and the text the model was given (the raw prompt, the strings to render, the JSON caption).

Prompts are chosen one per category first (in suite order), then the rest; a prompt is shown with the first
seed that has an image.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ditq.report.analysis import Analysis
from ditq.report.document import Details, Figure, Paragraph, Section
from ditq.report.grids import GridBand, compose_grid
from ditq.report.inputs import RunData

TITLE = "Image grids"
MODE_LABELS = {"json": "JSON caption", "raw": "raw prompt"}


def image_index(run: RunData) -> dict[tuple[str, str, str, int], Path]:
    """(variant, caption mode, prompt id, seed) -> image path, from manifest.jsonl (a later line wins)."""
    index = {}
    for r in run.manifest:
        try:
            key = (str(r["variant"]), str(r["caption_mode"]), str(r["prompt_id"]), int(r["seed"]))
        except (KeyError, TypeError, ValueError):
            continue
        if r.get("path"):
            index[key] = run.root / str(r["path"])
    return index


def image_path(run: RunData, index: dict, variant: str, mode: str, prompt_id: str, seed: int) -> Path | None:
    path = index.get((variant, mode, prompt_id, seed))
    if path is None:
        path = run.root / "images" / variant / mode / f"{prompt_id}_s{seed}.png"
    return path if path.is_file() else None


def _modes(run: RunData, index: dict) -> list[str]:
    """The run's caption modes that have images, json first."""
    present = {key[1] for key in index} or set(run.caption_modes)
    modes = [m for m in run.caption_modes if m in present] or sorted(present)
    return sorted(modes, key=lambda m: (m != "json", m))


def _chosen(run: RunData, index: dict, modes: list[str], n_prompts: int) -> list[tuple[str, int]]:
    seeds = run.seeds or sorted({k[3] for k in index})
    candidates = []
    for pid in run.prompt_ids:
        seed = next(
            (
                s
                for s in seeds
                if any(image_path(run, index, v, m, pid, s) for v in run.variants for m in modes)
            ),
            None,
        )
        if seed is not None:
            candidates.append((pid, seed))
    category = {pid: _category(run, pid) for pid, _ in candidates}
    chosen, seen = [], set()
    for pid, seed in candidates:
        if category[pid] not in seen:
            chosen.append((pid, seed))
            seen.add(category[pid])
    chosen += [c for c in candidates if c not in chosen]
    return chosen[:n_prompts]


def _category(run: RunData, pid: str) -> str:
    return str(run.prompts.get(pid, {}).get("category") or run.scores.category.get(pid) or "uncategorized")


def _caption_text(record: dict) -> str | None:
    """The JSON caption, indented for reading (a JSON object or its text in prompts.jsonl)."""
    caption = record.get("caption")
    if isinstance(caption, str) and caption.strip():
        try:
            caption = json.loads(caption)
        except json.JSONDecodeError:
            return caption
    if isinstance(caption, dict) and caption:
        return json.dumps(caption, indent=2, ensure_ascii=False)
    return None


def _shorten(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def grid_section(analysis: Analysis, out_dir: Path, n_prompts: int) -> tuple[Section, list[Path]]:
    run = analysis.run
    section = Section(TITLE, "grids")
    index = image_index(run)
    modes = _modes(run, index)
    chosen = _chosen(run, index, modes, n_prompts)
    grid_dir = out_dir / "grids"
    for old in grid_dir.glob("*.png") if grid_dir.is_dir() else []:
        old.unlink()
    if not chosen:
        section.add(
            Paragraph(
                "No generated images were found (manifest.jsonl / images/), so there are no grids.", "note"
            )
        )
        return section, []
    variants = list(run.variants)
    ref = run.reference_variant if run.reference_variant in run.variants else None
    columns = ([ref] if ref else []) + [v for v in variants if v != ref]
    section.add(
        Paragraph(
            "Every variant on the same prompt and seed (the same initial noise), one band per caption mode ("
            + ", ".join(f"`{m}`" for m in modes)
            + "). Pixels are enlarged by whole factors with nearest-neighbour sampling, so each generated pixel "
            "is a sharp square."
            + (
                f" Under each image, its difference from the {ref} image of the same band: the mean over RGB of "
                "|image − reference| per pixel (0–255) in the magma colour map, black = identical, on one scale "
                "per grid (printed at the left), with its mean and maximum."
                if ref
                else " The run has no reference variant, so there are no difference maps."
            )
        )
    )
    paths = []
    for pid, seed in chosen:
        bands = [
            GridBand(MODE_LABELS.get(m, m), [image_path(run, index, v, m, pid, seed) for v in columns])
            for m in modes
        ]
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{pid}_s{seed}") + ".png"
        result = compose_grid(columns, bands, grid_dir / name, reference=0 if ref else None)
        paths.append(result.path)
        record = run.prompts.get(pid, {})
        caption = f"{pid} · {_category(run, pid)} · seed {seed}"
        prompt = str(record.get("prompt") or "")
        if prompt:
            caption += f" — raw prompt: “{_shorten(prompt)}”"
        texts = [str(t) for t in record.get("texts") or [] if isinstance(t, str)]
        caption += (
            f"; text to render: {', '.join(f'“{t}”' for t in texts)}" if texts else "; no text to render"
        )
        section.add(Figure(f"grids/{name}", f"{pid} seed {seed}: variants side by side", caption))
        caption_json = _caption_text(record)
        if caption_json and "json" in modes:
            section.add(Details(f"JSON caption of {pid}", caption_json, "json"))
    return section, paths
