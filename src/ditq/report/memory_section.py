"""The "Memory" section: per variant, the peak device memory of a generation and where that number comes from,
the whole pipeline's bytes on disk, and whether it fits a 24 GiB card under the planner's choice of policy."""

from __future__ import annotations

from ditq.report.document import Cell, Paragraph, Section, Table
from ditq.report.formatting import size_text
from ditq.report.inputs import RunData
from ditq.report.memory import CARD, CARD_NAME, VariantMemory

TITLE = "Memory"


def bytes_or_unknown(n: int | None, detail: str) -> Cell:
    if n is None:
        return Cell("unknown", title=detail, css="unavailable")
    return Cell(size_text(n), title=f"{n:,} bytes; {detail}", css="num bytes")


def memory_section(run: RunData, memories: dict[str, VariantMemory]) -> Section:
    section = Section(TITLE, "memory")
    section.add(Paragraph(_explanation(run, memories)))
    header: list[str | Cell] = [
        "Variant",
        Cell(
            "Peak device memory / image", title="peak of denoising and decoding one image (GB = 10^9 bytes)"
        ),
        Cell("Source", title="measured with torch.cuda.max_memory_allocated, or planned by ditq plan"),
        Cell(
            "On disk, whole pipeline",
            title="weight files of every component (both transformers, text encoder, VAE, ...)",
        ),  # fmt: skip
        Cell(
            f"Fits a {CARD_NAME} card", title=f"ditq plan --vram {CARD}: its fastest policy that fits"
        ),  # fmt: skip
        Cell(f"Policy at {CARD_NAME}", title="the offload policy --offload auto would choose"),
        Cell("Moved per step", title="bytes copied host → device per denoising step under that policy"),
        Cell(
            f"Planned peak at {CARD_NAME}",
            title="whole generation, text encoding included, under that policy",
        ),
    ]
    rows, unknown = [], []
    for name, mem in memories.items():
        fit = mem.fit
        fits = "unknown" if fit.fits is None else ("yes" if fit.fits else "no")
        rows.append(
            [
                name,
                bytes_or_unknown(mem.peak.bytes, mem.peak.detail),
                Cell(mem.peak.label, title=mem.peak.detail),
                bytes_or_unknown(mem.disk_bytes, mem.disk_detail),
                Cell(fits, title=fit.detail, css="unavailable" if fit.fits is None else None),
                fit.policy or "unknown",
                "unknown" if fit.transfer_bytes_per_step is None else size_text(fit.transfer_bytes_per_step),
                bytes_or_unknown(fit.peak_bytes, fit.detail),
            ]
        )
        if mem.peak.bytes is None:
            unknown.append(f"{name}, peak: {mem.peak.detail}")
        if fit.fits is None and not (mem.peak.bytes is None and fit.detail in mem.peak.detail):
            unknown.append(f"{name}, fit: {fit.detail}")
    section.add(Table(header, rows))
    if unknown:
        section.add(Paragraph("Unknown: " + "; ".join(unknown) + ".", "note"))
    return section


def _explanation(run: RunData, memories: dict[str, VariantMemory]) -> str:
    from ditq.quant.plan import RESERVE, GiB

    sources = {m.peak.source for m in memories.values()}
    text = (
        "Peak device memory / image is what generating one image from its encoded prompt needs on the device "
        "(denoising with both transformers, then decoding), under the offload policy the run used. "
    )
    if "measured" in sources:
        text += "Measured: the largest `torch.cuda.max_memory_allocated` of the variant's images, reset before each. "
    if "planned" in sources:
        text += (
            "Planned: `ditq plan` of the variant's folder at the run's resolution and text length, where no "
            "image has a CUDA peak (a run on the host records only the process's resident set, which is host "
            "memory and is not used). "
        )
    text += (
        f"The {CARD_NAME} columns are the planner's for a {CARD_NAME} card (3090, 4090): the fastest offload "
        "policy whose peak over the whole generation, text encoding included, fits the card less "
        f"{RESERVE / GiB:g} GiB for the CUDA context and a display. On disk is the whole pipeline, every component, as downloaded."
    )
    if run.tiny:
        text += (
            " The built-in tiny model is kilobytes: its plans say yes everywhere and check code paths only."
        )
    return text
