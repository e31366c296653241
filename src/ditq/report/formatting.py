"""How numbers, intervals, sizes and missing values appear in report cells."""

from __future__ import annotations

import math

from ditq.report.analysis import Missing
from ditq.report.document import Cell
from ditq.report.inputs import MetricInfo, VariantInfo
from ditq.stats import BootstrapCI

TRANSFORMER = "transformer"


def fmt_num(x: float, digits: int = 4) -> str:
    """`digits` significant digits; thousands and above as whole numbers with separators."""
    if not math.isfinite(x):
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def fmt_interval(low: float, high: float, digits: int = 3) -> str:
    """[low, high] with `digits` significant digits, more (up to 6) when the bounds would print the same."""
    while digits < 6 and fmt_num(low, digits) == fmt_num(high, digits) and low != high:
        digits += 1
    return f"[{fmt_num(low, digits)}, {fmt_num(high, digits)}]"


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def ci_text(ci: BootstrapCI) -> str:
    if ci.n < 2:
        return f"{fmt_num(ci.estimate)} (n=1, no CI)"
    return f"{fmt_num(ci.estimate)} [{fmt_num(ci.low)}, {fmt_num(ci.high)}]"


def ci_cell(value: BootstrapCI | Missing) -> Cell:
    """The mean on one line and its interval on a second (HTML) or after it (Markdown)."""
    if isinstance(value, Missing):
        return missing_cell(value)
    level = f"{100 * value.confidence_level:g}%"
    title = (
        f"mean over {value.n} prompts, {level} {value.method} bootstrap CI ({value.n_resamples} resamples)"
    )
    if value.n < 2:
        return Cell(fmt_num(value.estimate), sub="(n=1, no CI)", title=title, css="num")
    return Cell(fmt_num(value.estimate), sub=fmt_interval(value.low, value.high), title=title, css="num")


def missing_cell(missing: Missing, *, span: bool = False) -> Cell:
    """ "unavailable", with the reason as the HTML tooltip: the report lists each metric's reason once, under
    Unavailable metrics, instead of in every cell."""
    if missing.kind != "unavailable":
        return Cell(missing.text, span=span)
    return Cell("unavailable", title=missing.reason, css="unavailable", span=span)


def size_text(n: float) -> str:
    """Bytes in decimal units (GB = 10^9), scaled to the number (tiny test models are kilobytes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def arrow(info: MetricInfo) -> str:
    return "↑" if info.higher_is_better else "↓"


def metric_header(info: MetricInfo) -> Cell:
    parts = [f"{info.family} metric", "higher is better" if info.higher_is_better else "lower is better"]
    if info.reference:
        parts.append(f"measured against {info.reference}")
    if info.model:
        parts.append(f"model: {info.model}")
    return Cell(f"{info.name} {arrow(info)}", title="; ".join(parts))


def transformer_bytes(sizes: dict[str, int]) -> int | None:
    """Bytes of the (conditional) transformer: the 'transformer' component, or the only component listed."""
    if TRANSFORMER in sizes:
        return sizes[TRANSFORMER]
    if len(sizes) == 1:
        return next(iter(sizes.values()))
    return None


def bytes_cell(sizes: dict[str, int]) -> Cell:
    n = transformer_bytes(sizes)
    detail = "; ".join(f"{component}: {b:,} bytes" for component, b in sizes.items())
    if n is None:
        return Cell("unknown", title=detail or "run.json lists no sizes for this variant", css="unavailable")
    return Cell(size_text(n), title=detail, css="num bytes")


def memory_of(variant: VariantInfo, memory: str) -> int | None:
    return transformer_bytes(variant.resident_bytes if memory == "resident" else variant.bytes_on_disk)
