"""Memory of each benchmarked variant: the peak device memory of generating one image, whether the variant fits a
24 GiB card, and the bytes of its whole pipeline on disk.

The peak device memory of a generation comes from one of two sources, and the report says which:

- measured: the largest `torch.cuda.max_memory_allocated` of the variant's images (manifest records of kind
  `cuda_allocated`; `ditq run` resets the counter before each image, so each covers the denoising and decoding of
  one image from the run's cached conditioning, with the offload policy it ran under);
- planned: `ditq.quant.plan.plan_model` for the variant's pipeline folder at the run's resolution and text length,
  under the same policy and over the same two stages (denoise, decode). A run encodes every prompt before it loads
  a variant and never loads the text encoder with it, so a run's `none` is the planner's `encoder` residency
  (`PLANNED_AS`).

Records of kind `process_rss` (runs on the host) are the resident set of the whole process, host memory: they are
never used. With neither CUDA records nor the folder (a run folder copied to another machine), the peak is unknown
and the reason says why; nothing here raises on a run folder the rest of the report can read.

Fits a 24 GiB card: the planner's `auto` choice at 24 GiB (the fastest policy whose peak over the whole
generation, text encoding included, fits the card less `ditq.quant.plan.RESERVE`), with its bytes moved per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditq.report.inputs import RunData, VariantInfo

log = logging.getLogger(__name__)

CARD = "24GiB"
CARD_NAME = "24 GiB"
CUDA_KIND = "cuda_allocated"
# The planner policy whose residency matches what a run's images ran under (runs encode in a phase of their own).
PLANNED_AS = {"none": "encoder"}
GENERATION_STAGES = ("denoise", "decode")
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass(frozen=True, kw_only=True)
class PeakMemory:
    """Peak device memory of one image's generation. source: "measured", "planned" or "unknown"; label: what the
    report prints beside the number ("measured on NVIDIA H100 80GB HBM3", "planned"); detail: how it was
    obtained, or why there is no number."""

    bytes: int | None
    source: str
    label: str
    detail: str


@dataclass(frozen=True, kw_only=True)
class CardFit:
    """The planner's choice for a 24 GiB card: fits None when unknown (detail says why)."""

    fits: bool | None
    policy: str | None
    peak_bytes: int | None
    transfer_bytes_per_step: int | None
    detail: str


@dataclass(frozen=True, kw_only=True)
class VariantMemory:
    peak: PeakMemory
    fit: CardFit
    disk_bytes: int | None  # every component's weight files; None when nothing is recorded or found
    disk_detail: str


def variant_folder(run: RunData, info: VariantInfo) -> tuple[Path | None, str]:
    """The variant's pipeline folder (run.json's `folder`, else its `model` when that is a local folder, tried as
    given and relative to the run folder), or None and why not. Hub ids are never fetched."""
    tried = []
    for value in (info.folder, info.model):
        if not value:
            continue
        path = Path(value).expanduser()
        for candidate in (path,) if path.is_absolute() else (path, run.root / path):
            if (candidate / "model_index.json").is_file():
                return candidate, ""
            tried.append(str(candidate))
    if not tried:
        return None, "run.json records no folder or model for this variant"
    return None, f"no pipeline folder at {' or '.join(dict.fromkeys(tried))} (a run folder copied elsewhere?)"


def _records(run: RunData, name: str) -> list[dict[str, Any]]:
    return [r for r in run.manifest if r.get("variant") == name]


def _policies(run: RunData, name: str, records: list[dict[str, Any]]) -> tuple[list[str], str]:
    """The offload policies the variant's images ran under, and a note when that had to be assumed."""
    recorded = list(dict.fromkeys(str(r["offload"]) for r in records if r.get("offload")))
    if recorded:
        return recorded, ""
    if run.variants[name].offload:
        return [run.variants[name].offload], ""
    return ["none"], "the run records no offload policy: planned as none"


def _measured(run: RunData, records: list[dict[str, Any]], policies: list[str]) -> PeakMemory | None:
    cuda = [
        r for r in records if r.get("peak_mem_kind") == CUDA_KIND and isinstance(r.get("peak_mem_bytes"), int)
    ]
    if not cuda:
        return None
    peak = max(int(r["peak_mem_bytes"]) for r in cuda)
    gpu = run.host.get("gpu")
    devices = sorted({str(r["device"]) for r in cuda if r.get("device")})
    where = str(gpu) if gpu else "CUDA"
    detail = (
        f"largest torch.cuda.max_memory_allocated of {len(cuda)} image(s)"
        + (f" on {', '.join(devices)}" if devices else "")
        + f", offload {', '.join(policies)}: denoising and decoding from the cached conditioning"
    )
    return PeakMemory(bytes=peak, source="measured", label=f"measured on {where}", detail=detail)


def _unknown(reason: str) -> PeakMemory:
    return PeakMemory(bytes=None, source="unknown", label="unknown", detail=reason)


def _text_tokens(run: RunData, folder: Path) -> tuple[int, str]:
    """The run's text length as the variant's model takes it (the tiny model caps it at 512)."""
    from ditq.models.loading import model_defaults

    asked = int(run.settings.get("max_sequence_length") or 2048)
    tokens = min(asked, model_defaults(folder).max_sequence_length)
    padding = run.settings.get("text_padding", "fixed")
    return tokens, f"{tokens} text tokens" + (" (the most; prompts are padded to their own length)"
                                              if padding == "prompt" else "")  # fmt: skip


def plan_row(run: RunData, name: str) -> tuple[dict | None, str]:
    """The planner's row for the variant's folder at the run's resolution and text length and a 24 GiB card,
    with what it was planned at; or None and why not."""
    from ditq.errors import DitqError
    from ditq.quant.plan import parse_vram, plan_model

    folder, why = variant_folder(run, run.variants[name])
    if folder is None:
        return None, why
    if run.image_size is None:
        return None, "the run records no image size to plan at"
    height, width = run.image_size
    try:
        tokens, text = _text_tokens(run, folder)
        plan = plan_model(str(folder), None, height, width, parse_vram(CARD), text_tokens=tokens)
        (row,) = plan["variants"].values()
    except DitqError as exc:  # a folder the planner refuses (imported from another tool, unreadable marker)
        return None, f"no plan of {folder}: {str(exc).rstrip('.')}"
    except Exception as exc:  # a report is a view of the run: the planner failing must not stop it
        log.warning("%s: no memory plan for %s: %s: %s", name, folder, type(exc).__name__, exc)
        return None, f"the planner failed on {folder}: {type(exc).__name__}: {str(exc).rstrip('.')}"
    return row, f"{folder} at {height}×{width}, {text}"


def _planned(row: dict, where: str, policies: list[str]) -> PeakMemory:
    unplanned = [p for p in policies if PLANNED_AS.get(p, p) not in row["policies"]]
    if unplanned:
        known = ", ".join(row["policies"])
        return _unknown(f"offload {', '.join(unplanned)} is not a policy the planner knows ({known})")
    peaks, parts = [], []
    for policy in policies:
        planned_as = PLANNED_AS.get(policy, policy)
        stages = row["policies"][planned_as]["stages"]
        peaks.append(max(int(stages[s]["total"]) for s in GENERATION_STAGES))
        parts.append(
            policy if planned_as == policy else f"{policy} (the planner's {planned_as}: a run encodes first)"
        )
    detail = f"ditq plan of {where}, offload {', '.join(parts)}: the larger of the denoise and decode stages"
    return PeakMemory(bytes=max(peaks), source="planned", label="planned", detail=detail)


def _fit(row: dict | None, why: str) -> CardFit:
    if row is None:
        return CardFit(fits=None, policy=None, peak_bytes=None, transfer_bytes_per_step=None, detail=why)
    return CardFit(
        fits=bool(row["fits"]),
        policy=str(row["policy"]),
        peak_bytes=int(row["peak_bytes"]),
        transfer_bytes_per_step=int(row["transfer_bytes_per_step"]),
        detail=f"ditq plan --vram {CARD} of {why}: peak over encode, denoise and decode under its fastest fitting "
        "policy",
    )


def _weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def pipeline_disk(info: VariantInfo, folder: Path | None) -> tuple[int | None, str]:
    """Bytes on disk of every component: run.json's `bytes_on_disk`, plus the weight files of component folders it
    does not list (a prompt-enhancer head) when the folder is here."""
    sizes = dict(info.bytes_on_disk)
    added = []
    if folder is not None:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in sizes):
            n = _weight_bytes(sub)
            if n:
                sizes[sub.name] = n
                added.append(sub.name)
    if not sizes:
        return None, "run.json lists no sizes on disk for this variant" + (
            "" if folder else ", and no folder"
        )
    detail = "; ".join(f"{c}: {b:,} bytes" for c, b in sizes.items())
    if added:
        detail += f" ({', '.join(added)} measured in {folder}; the rest as run.json records it)"
    return sum(sizes.values()), detail


def variant_memory(run: RunData, name: str) -> VariantMemory:
    """Peak of a generation, 24 GiB fit and whole-pipeline disk bytes of one variant (see the module docstring)."""
    records = _records(run, name)
    policies, note = _policies(run, name, records)
    row, where = plan_row(run, name)
    peak = _measured(run, records, policies)
    if peak is None:
        if row is not None:
            peak = _planned(row, where, policies)
        else:
            rss = sum(1 for r in records if r.get("peak_mem_kind") == "process_rss")
            no_cuda = (
                f"its {rss} image record(s) hold process_rss, the host process's memory, not device memory"
                if rss
                else "no image record holds a CUDA peak"
            )
            peak = _unknown(f"{no_cuda}, and nothing to plan from: {where}")
    if note and peak.source == "planned":
        peak = PeakMemory(
            bytes=peak.bytes, source=peak.source, label=peak.label, detail=f"{peak.detail}; {note}"
        )
    folder, _ = variant_folder(run, run.variants[name])
    disk, disk_detail = pipeline_disk(run.variants[name], folder)
    return VariantMemory(peak=peak, fit=_fit(row, where), disk_bytes=disk, disk_detail=disk_detail)


def variant_memories(run: RunData) -> dict[str, VariantMemory]:
    return {name: variant_memory(run, name) for name in run.variants}
