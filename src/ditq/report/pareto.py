"""Quality against memory: the non-dominated (Pareto) set of variants and its plot.

A variant is dominated when another uses no more memory and is at least as good, and is strictly better in one
of the two. The frontier is every variant that is not dominated. Equal points do not dominate each other, so
exact ties are all on the frontier. Points with a non-finite coordinate are never on it.

Quality is a mean over prompts, so the frontier is uncertain: `frontier_shares` resamples the prompts (the same
draw for every variant, as the design is paired) and reports, per variant, the share of resamples in which it is
non-dominated. Memory is a fixed property of a variant and is not resampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def pareto_frontier(
    memory: np.ndarray | list[float], quality: np.ndarray | list[float], *, higher_is_better: bool = True
) -> np.ndarray:
    """Mask of non-dominated points: bool [n]; memory is minimized, quality maximized (or minimized)."""
    mem = np.asarray(memory, dtype=np.float64)
    q = np.asarray(quality, dtype=np.float64)
    if mem.shape != q.shape or mem.ndim != 1:
        raise ValueError(f"memory and quality must be 1-D of equal length, got {mem.shape} and {q.shape}")
    good = q if higher_is_better else -q
    finite = np.isfinite(mem) & np.isfinite(good)
    m_i, m_j = mem[:, None], mem[None, :]
    g_i, g_j = good[:, None], good[None, :]
    # dominated[i, j]: point j dominates point i
    dominated = (m_j <= m_i) & (g_j >= g_i) & ((m_j < m_i) | (g_j > g_i)) & finite[None, :]
    return finite & ~dominated.any(axis=1)


def _non_dominated(memory: np.ndarray, good: np.ndarray) -> np.ndarray:
    """memory float [k], good float [rows, k] (higher is better) -> bool [rows, k], the frontier of each row."""
    m_i, m_j = memory[None, :, None], memory[None, None, :]
    g_i, g_j = good[:, :, None], good[:, None, :]
    dominated = (m_j <= m_i) & (g_j >= g_i) & ((m_j < m_i) | (g_j > g_i))
    return ~dominated.any(axis=2)


def frontier_shares(
    memory: np.ndarray | list[float],
    unit_values: np.ndarray,
    *,
    higher_is_better: bool = True,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> np.ndarray:
    """Share of bootstrap resamples in which each variant is on the quality-memory frontier: float [k].

    memory: float [k], one fixed size per variant. unit_values: float [k, n], each variant's per-unit (per-prompt)
    quality on the same n units. A resample draws n units with replacement, one index row shared by all k
    variants (`numpy.random.default_rng(seed).integers(0, n, (rows, n))`, in chunks), takes each variant's mean
    over the drawn units and finds the non-dominated set as `pareto_frontier` does.
    """
    mem = np.asarray(memory, dtype=np.float64)
    values = np.asarray(unit_values, dtype=np.float64)
    if values.ndim != 2 or mem.shape != (values.shape[0],):
        raise ValueError(
            f"unit_values must be [k, n] with k = len(memory), got {values.shape} and {mem.shape}"
        )
    k, n = values.shape
    if n == 0 or not np.all(np.isfinite(values)) or not np.all(np.isfinite(mem)):
        raise ValueError("frontier_shares needs at least one unit and finite memory and quality values")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    sign = 1.0 if higher_is_better else -1.0
    counts = np.zeros(k, dtype=np.int64)
    rows_per_chunk = max(1, 2_000_000 // max(n * k, k * k))
    for start in range(0, n_resamples, rows_per_chunk):
        rows = min(rows_per_chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(rows, n))
        means = values[:, idx].mean(axis=2).T  # [rows, k]
        counts += _non_dominated(mem, sign * means).sum(axis=0)
    return counts / n_resamples


# Label positions tried in order, as (dx, dy) offsets in points from the marker.
_OFFSETS = tuple((sx * 8, dy) for dy in (4, -4, 15, -15, 27, -27) for sx in (1, -1))


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _place_labels(
    ax, x: np.ndarray, y: np.ndarray, yerr: np.ndarray, labels: list[str], fontsize: float
) -> None:
    """Annotate each point at the first candidate offset whose text box overlaps least with the markers,
    error bars, other labels and the axes edge (greedy, in display pixels)."""
    ax.autoscale_view()
    scale = ax.figure.dpi / 72.0
    to_px = ax.transData.transform
    xy = to_px(np.column_stack([x, y]))
    lo = to_px(np.column_stack([x, y - yerr[0]]))[:, 1]
    hi = to_px(np.column_stack([x, y + yerr[1]]))[:, 1]
    frame = ax.get_window_extent()
    obstacles = [(px - 6 * scale, py - 6 * scale, px + 6 * scale, py + 6 * scale) for px, py in xy]
    obstacles += [(px - 4 * scale, lo[i], px + 4 * scale, hi[i]) for i, (px, _py) in enumerate(xy)]
    for i, ((px, py), label) in enumerate(zip(xy, labels, strict=True)):
        w, h = 0.62 * fontsize * scale * len(label), 1.25 * fontsize * scale
        best, best_cost = _OFFSETS[0], np.inf
        for dx, dy in _OFFSETS:
            x0 = px + dx * scale - (w if dx < 0 else 0.0)
            y0 = py + dy * scale - (h if dy < 0 else 0.0)
            box = (x0, y0, x0 + w, y0 + h)
            inside = _overlap(box, (frame.x0, frame.y0, frame.x1, frame.y1))
            cost = sum(_overlap(box, o) for o in obstacles) + 4 * (w * h - inside)
            if cost < best_cost - 1e-9:
                best, best_cost = (dx, dy), cost
        dx, dy = best
        x0 = px + dx * scale - (w if dx < 0 else 0.0)
        y0 = py + dy * scale - (h if dy < 0 else 0.0)
        obstacles.append((x0, y0, x0 + w, y0 + h))
        leader = {"arrowstyle": "-", "color": "#9aa3af", "lw": 0.8} if abs(dy) > 10 else None
        ax.annotate(
            label, (x[i], y[i]), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
            color="#1d2430", ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top",
            arrowprops=leader,
        )  # fmt: skip


def _draw_off_scale(ax, x: np.ndarray, labels: list[str], higher_is_better: bool) -> None:
    """Reference points whose ideal value is off the scale: a star on the plot's best edge, with a dashed line
    down (or up) through the data at the same memory."""
    from matplotlib.transforms import blended_transform_factory

    edge = 1.0 if higher_is_better else 0.0
    blend = blended_transform_factory(ax.transData, ax.transAxes)
    for xi, label in zip(x, labels, strict=True):
        ax.axvline(xi, color="#c2410c", linestyle="--", linewidth=1.0, alpha=0.6)
        ax.plot([xi], [edge], marker="*", markersize=12, color="#c2410c", transform=blend, clip_on=False,
                label="reference")  # fmt: skip
        ax.annotate(
            label, (xi, edge), xycoords=blend, textcoords="offset points", xytext=(8, -12 if edge else 6),
            fontsize=9, color="#c2410c", ha="left",
        )  # fmt: skip
    ax.legend(loc="best", fontsize=9)


@dataclass(frozen=True, kw_only=True)
class ParetoPoint:
    """One variant on the plot: memory in bytes, quality with its CI (low/high may be NaN).

    reference: the reference variant, drawn as a star. off_scale: its quality is the ideal of a fidelity metric
    that would stretch the axis (PSNR of identical images); it counts for the frontier at `quality` but is
    drawn on the top (or bottom) edge of the plot.
    """

    label: str
    memory_bytes: float
    quality: float
    low: float
    high: float
    reference: bool = False
    off_scale: bool = False


def plot_pareto(
    points: list[ParetoPoint],
    path: Path,
    *,
    quality_label: str,
    memory_label: str,
    higher_is_better: bool,
) -> np.ndarray:
    """Write the scatter with CI error bars and the frontier to `path` (PNG); returns the frontier mask.
    `memory_label` names the x axis ("Peak device memory per image"); its unit is added."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mem_bytes = np.array([p.memory_bytes for p in points], dtype=np.float64)
    unit, scale = next(
        ((u, f) for u, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if mem_bytes.max() >= f), ("B", 1.0)
    )
    mem_gb = mem_bytes / scale
    q = np.array([p.quality for p in points], dtype=np.float64)
    on_front = pareto_frontier(mem_gb, q, higher_is_better=higher_is_better)
    low = np.array([p.low for p in points], dtype=np.float64)
    high = np.array([p.high for p in points], dtype=np.float64)
    yerr = np.vstack([np.nan_to_num(q - low, nan=0.0), np.nan_to_num(high - q, nan=0.0)])

    reference = np.array([p.reference for p in points], dtype=bool)
    off = np.array([p.off_scale for p in points], dtype=bool)

    fig = Figure(figsize=(8.0, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for mask, color, marker, name in (
        (~on_front & ~reference, "#8a94a6", "o", "dominated"),
        (on_front & ~reference, "#1f5fbf", "D", "Pareto frontier (non-dominated)"),
        (reference & ~off, "#c2410c", "*", "reference"),
    ):
        if mask.any():
            ax.errorbar(
                mem_gb[mask], q[mask], yerr=yerr[:, mask], fmt=marker, color=color, ecolor=color,
                elinewidth=1.2, capsize=4, markersize=7, label=name,
            )  # fmt: skip
    front = np.flatnonzero(on_front & ~off)
    front = front[np.argsort(mem_gb[front], kind="stable")]
    if front.size > 1:
        ax.step(mem_gb[front], q[front], where="post", color="#1f5fbf", alpha=0.5, linewidth=1.5)
    arrow = "higher is better" if higher_is_better else "lower is better"
    ax.set_xlabel(f"{memory_label} ({unit})  — lower is better")
    ax.set_ylabel(f"{quality_label} ({arrow})")
    ax.set_title(f"Quality vs memory: {quality_label}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    ax.margins(x=0.15, y=0.15)
    fig.tight_layout()
    if off.any():
        _draw_off_scale(
            ax, mem_gb[off], [p.label for p, o in zip(points, off, strict=True) if o], higher_is_better
        )
    labels = [p.label + (" *" if on_front[i] else "") for i, p in enumerate(points) if not off[i]]
    keep = ~off
    _place_labels(ax, mem_gb[keep], q[keep], yerr[:, keep], labels, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return on_front
