"""The report's closing sections: run settings (with the metric weights' sha256) and methods."""

from __future__ import annotations

import json

from ditq._version import __version__
from ditq.report.analysis import Analysis
from ditq.report.document import Cell, Paragraph, Section, Table
from ditq.report.formatting import size_text
from ditq.report.inputs import RunData

SETTINGS = "Run settings"
METHODS = "Methods"


def settings_section(run: RunData, analysis: Analysis) -> Section:
    section = Section(SETTINGS, "settings")
    s = dict(run.settings)
    rows: list[list[str | Cell]] = [
        ["Suite", run.suite or "unknown"],
        ["Prompts", str(len(run.prompt_ids))],
        ["Seeds", ", ".join(map(str, run.seeds)) or "unknown"],
        ["Caption modes", ", ".join(run.caption_modes) or "unknown"],
    ]
    if "height" in s or "width" in s:
        rows.append(["Resolution (w × h)", f"{s.pop('width', '?')} × {s.pop('height', '?')}"])
    for key, label in (("steps", "Steps"), ("guidance_schedule", "Guidance schedule")):
        if key in s:
            rows.append([label, json.dumps(s.pop(key))])
    rows += [[key, json.dumps(value)] for key, value in s.items()]
    rows.append(["Reference variant", run.reference_variant or "none"])
    if run.tiny:
        rows.append(["Model", "ditq's built-in tiny model (random weights): numbers check code paths only"])
    rows += hardware_rows(run)
    rows += [[key, json.dumps(value)] for key, value in run.extra.items() if key not in ("device", "dtype")]
    rows.append(["ditq version (run / report)", f"{run.ditq_version or 'unknown'} / {__version__}"])
    rows.append(["Analysis caption mode", analysis.main_mode])
    section.add(Table(["Setting", "Value"], rows))
    variants = [[name, v.format or "", v.model or ""] for name, v in run.variants.items()]
    section.add(Table(["Variant", "Format", "Model"], variants, caption="Variants"))
    section.add(weights_table(run))
    return section


def load_average(host: dict) -> list[float]:
    """run.json host's load_avg (1, 5, 15 min) as numbers; [] when absent or malformed."""
    load = host.get("load_avg")
    return [float(x) for x in load if isinstance(x, int | float)] if isinstance(load, list) else []


def hardware_rows(run: RunData) -> list[list[str | Cell]]:
    """Device, CPU / GPU, threads, processes, torch and load, from run.json "host" (older runs: the devices of
    manifest.jsonl and run.json's "device" / "dtype")."""
    host = run.host
    devices = sorted({str(r["device"]) for r in run.manifest if r.get("device")})
    if not devices and run.extra.get("device"):
        devices = [str(run.extra["device"])]
    device = ", ".join(devices) or "not recorded"
    if run.extra.get("dtype"):
        device += f" ({run.extra['dtype']})"
    rows: list[list[str | Cell]] = [["Device (dtype)", device]]
    if host.get("gpu"):
        rows.append(["GPU", str(host["gpu"])])
    if host.get("cpu"):
        flags = str(host.get("cpu_flags") or "")
        rows.append(
            ["CPU", Cell(str(host["cpu"]), sub=f"flags: {flags.replace(',', ', ')}" if flags else None)]
        )
    for key, label in (("threads", "Threads (torch, per process)"), ("world_size", "Processes (torchrun)")):
        if isinstance(host.get(key), int):
            rows.append([label, str(host[key])])
    if host.get("torch"):
        rows.append(["torch", str(host["torch"])])
    load = load_average(host)
    if load:
        rows.append(["Load average at start (1 / 5 / 15 min)", " / ".join(f"{x:g}" for x in load)])
    if not host:
        rows.append(["Host", "not recorded (run.json has no host: written before ditq recorded it)"])
    return rows


def weights_table(run: RunData) -> Table | Paragraph:
    """Every weight file a metric loaded, with its sha256 (pinned with `ditq eval --expect-hash`)."""
    rows: list[list[str | Cell]] = []
    for info in run.metrics.values():
        for w in info.weights:
            digest = str(w.get("sha256"))
            size = w.get("bytes")
            size_cell = (
                Cell(size_text(size), title=f"{size:,} bytes", css="num") if isinstance(size, int) else ""
            )
            rows.append(
                [
                    info.name,
                    str(w.get("file") or ""),
                    Cell(f"`{digest}`", title=str(w.get("path") or "")),
                    size_cell,
                ]
            )
    if not rows:
        loaded = [m.name for m in run.metrics.values() if m.available and m.family != "check"]
        return Paragraph(
            "Metric weights: no metric of this run loaded weight files ("
            + (", ".join(loaded) or "none scored")
            + "); CLIP score, PickScore, HPSv2 and LPIPS record the sha256 of theirs when they run.",
            "note",
        )
    return Table(
        ["Metric", "Weight file", "sha256", "Size"],
        rows,
        caption="Metric weights (pin with `ditq eval --expect-hash METRIC=SHA256`)",
    )


def methods_section(analysis: Analysis) -> Section:
    st = analysis.settings
    level = f"{100 * st.confidence_level:g}%"
    method = "bias-corrected and accelerated (BCa)" if st.method == "bca" else "percentile"
    text = (
        "Paired design: every variant renders the same prompts with the same seeds (the same initial noise), "
        "so variants are compared image against image. The unit of analysis is the prompt: scores are "
        "averaged over seeds within each prompt first (after matching prompt and seed between the two sides "
        "of a comparison), and the bootstrap resamples prompts with replacement. Means and paired differences "
        f"get {level} {method} bootstrap intervals from {st.n_resamples:,} resamples drawn with numpy's "
        f"PCG64 generator seeded with {st.seed}; rebuilding the report with the same seed gives the same "
        "numbers. Where BCa is undefined (all prompt values equal) the percentile interval is used. p-values "
        "come from a two-sided paired sign-flip permutation test of the mean difference (exact when 2^n does "
        "not exceed the resample count, otherwise Monte Carlo with the same seed), Holm–Bonferroni adjusted "
        "within each family of comparisons. Verdicts (“Differs”) come from Holm step-down intervals over each "
        "section's family: the intervals of the comparisons not yet established are widened to level 1 − α/(number "
        "left) and the step repeats while one excludes 0, which keeps the family-wise error rate at α; unadjusted "
        "intervals are shown too. Bootstrap intervals from few prompts (fewer than about 20) are narrower than "
        "their nominal level; there the sign-flip p-value is the safer guide. PSNR is combined over seeds through "
        "the mean squared error, so images identical to the reference (PSNR = ∞) are kept; a prompt whose images "
        f"are all identical gets {analysis.psnr_ceiling:.1f} dB, the PSNR of a single 8-bit step in one channel "
        "of one pixel at the run's resolution. Images the blocked check flags as the safety-filter placeholder "
        "are left out of every quality number (and, for fidelity metrics, images whose reference was blocked); "
        "block rates are compared on all images. The Pareto frontier's uncertainty is the share of bootstrap "
        "resamples of the prompts (one draw shared by all variants) in which a variant is non-dominated. Other "
        "empty or non-finite scores are dropped and counted under Data notes."
    )
    return Section(METHODS, "methods", [Paragraph(text)])
