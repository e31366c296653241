"""SmoothQuant for Ideogram 4: migrate activation outliers into the weights, per input channel.

For a Linear y = x W^T with input channel j: s_j = max|X_j|^α / max|W_j|^(1-α), then y = (x / s) (W · s)^T exactly.
1/s is folded into the operation that produces x where that is exact:

    q/k/v (one s for all three)  <- attention_norm1 weight   (RMSNorm * w, then * scale_msa: elementwise, exact)
    attention.to_out.0           <- rows of to_v             (softmax(QK^T) V is linear in each V channel)
    w1/w3 (one s for both)       <- ffn_norm1 weight
    w2                           <- rows of w3               (silu(w1 x) * (w3 x): linear in each w3 channel)
    llm_cond_proj                <- llm_cond_norm weight
Other Linears (input_proj, final_layer.linear, the one-token conditioning layers) have no such neighbour: their
smoothing is either applied as an explicit per-channel scale fused into activation quantization (in memory), or
the layer is kept in bf16 (on disk), or left unsmoothed; `SmoothQuantConfig.unfoldable` picks.

α is chosen per group by a grid search on the calibration sample tokens. The objective, per Linear of the group
(averaged over them), is the relative W8A8 output error plus the relative error of the output summed over the
tokens: the coherent part of the error (mostly the weight's rounding), which attention, pooling and the residual
stream do not average away. α = 0.5 and "no smoothing" (s = 1) are always candidates, so the search is never worse
on that objective than either; ties (within float rounding) go by a fixed order, so the choice does not depend on
the thread count. A global α skips the search.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ditq.errors import CheckpointError
from ditq.formats.int8_ops import int8_matmul, quantize_per_token, quantize_weight_per_channel
from ditq.quant.calibration import ModuleStats

S_MIN, S_MAX = 1e-5, 1e5
CHUNK_ELEMENTS = 1 << 24  # rows are processed in blocks of ~16M elements (64 MB of float32)
SEARCH_ROWS = 2048


@dataclass(frozen=True)
class SmoothGroup:
    """Linears that share one input (hence one smoothing vector) and where 1/s can be folded.

    `name` is the official (fused) name where one exists (`layers.3.attention.qkv`, `layers.3.attention.o`);
    `fold` is ("norm", norm module) or ("rows", producing Linear) or None.
    """

    name: str
    linears: tuple[str, ...]
    fold: tuple[str, str] | None = None


_BLOCK = re.compile(r"^(layers\.\d+)\.(attention\.to_[qkv]|attention\.to_out\.0|feed_forward\.w[123])$")


def smooth_groups(linear_names: Iterable[str]) -> list[SmoothGroup]:
    """The smoothing groups of an Ideogram 4 transformer, given its Linear names (diffusers split names)."""
    names = list(linear_names)
    present = set(names)
    groups: dict[str, SmoothGroup] = {}
    for name in names:
        m = _BLOCK.match(name)
        if m:
            blk, part = m.groups()
            if part.startswith("attention.to_") and part != "attention.to_out.0":
                members = tuple(
                    f"{blk}.attention.to_{p}" for p in "qkv" if f"{blk}.attention.to_{p}" in present
                )
                groups.setdefault(
                    blk + ".qkv",
                    SmoothGroup(f"{blk}.attention.qkv", members, ("norm", f"{blk}.attention_norm1")),
                )
            elif part == "attention.to_out.0":
                v = f"{blk}.attention.to_v"
                groups[name] = SmoothGroup(
                    f"{blk}.attention.o", (name,), ("rows", v) if v in present else None
                )
            elif part in ("feed_forward.w1", "feed_forward.w3"):
                members = tuple(
                    f"{blk}.feed_forward.{w}" for w in ("w1", "w3") if f"{blk}.feed_forward.{w}" in present
                )
                groups.setdefault(
                    blk + ".w13",
                    SmoothGroup(f"{blk}.feed_forward.w1+w3", members, ("norm", f"{blk}.ffn_norm1")),
                )
            else:
                w3 = f"{blk}.feed_forward.w3"
                groups[name] = SmoothGroup(name, (name,), ("rows", w3) if w3 in present else None)
        elif name == "llm_cond_proj":
            groups[name] = SmoothGroup(name, (name,), ("norm", "llm_cond_norm"))
        else:
            groups[name] = SmoothGroup(name, (name,))
    return list(groups.values())


def smoothing_vector(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] = act^α / w^(1-α); channels never active or with an all-zero weight column get s = 1."""
    a = act_absmax.double()
    w = w_absmax.double()
    s = a.clamp(min=1e-30).pow(alpha) / w.clamp(min=1e-30).pow(1.0 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(S_MIN, S_MAX).float()


class RowSource(Protocol):
    """A weight [N, K] read by rows as float32 (e.g. an FP8 tensor dequantized a block at a time)."""

    shape: tuple[int, int]

    def rows(self, index: slice | torch.Tensor) -> torch.Tensor: ...


Weight = torch.Tensor | RowSource


def _rows(weight: Weight, index: slice | torch.Tensor) -> torch.Tensor:
    return weight[index].float() if isinstance(weight, torch.Tensor) else weight.rows(index)


def _blocks(n_rows: int, k: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    return [slice(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]


def w8a8_relative_error(weight: Weight, x: torch.Tensor, s: torch.Tensor | None = None) -> float:
    """The alpha search's objective for one weight W [N, K] on fp32 tokens x [T, K], over all rows (see
    `_group_errors`): with E = Q(x/s) Q(W·s)^T - x W^T and Y = x W^T,

        ||E||² / ||Y||²  +  ||Σ_t E_t||² / ||Σ_t Y_t||²

    the per-token error plus the error of the token sum (the coherent part of the error, which averaging over
    tokens does not shrink)."""
    return _group_errors([weight], x, {"s": s}, search_rows=None)["s"]


@dataclass
class AlphaChoice:
    """The smoothing chosen for one group: `alpha` None means no smoothing (s = 1). `errors` holds the objective
    of every candidate ("none" and f"{alpha:g}"), `error` the chosen one's and `plain_error` that of "none"."""

    alpha: float | None
    s: torch.Tensor | None
    error: float
    plain_error: float
    errors: dict[str, float] = field(default_factory=dict)


def column_absmax(weights: Sequence[Weight]) -> torch.Tensor:
    """max_n |W_nk| [K] over all rows of all weights, a block of rows at a time."""
    out = None
    for w in weights:
        for rows in _blocks(w.shape[0], w.shape[1]):
            a = _rows(w, rows).abs().amax(dim=0)
            out = a if out is None else torch.maximum(out, a)
    return out


ANCHOR_ALPHA = 0.5  # SmoothQuant's default migration strength: always a candidate of the search
TIE_RTOL = (
    1e-9  # objectives this close are a tie (reduction-order rounding is ~1e-15); ties go by `_preference`
)


def search_alpha(
    weights: Sequence[Weight],
    stats: ModuleStats,
    grid: Sequence[float],
    alpha: float | None = None,
    allow_none: bool = True,
    where: str = "",
    search_rows: int | None = SEARCH_ROWS,
) -> AlphaChoice:
    """Pick α for a group of weights [N_i, K] sharing one input, from its calibration statistics.

    s uses the column maxima of the whole weights; each candidate's objective (`w8a8_relative_error`, averaged
    over the group's weights) is measured on the sample tokens and on up to `search_rows` evenly spaced output
    rows of each weight (None: all rows). A search (`alpha` None) always has ANCHOR_ALPHA and "no smoothing"
    among its candidates besides `grid`, so it is never worse on the objective than either. The choice is a pure
    function of the weights, the statistics and the arguments: objectives within TIE_RTOL are a tie, broken by a
    fixed order (no smoothing, then the anchor, then the alpha nearest it, then the smaller), so neither the thread
    count nor the order of float reductions can flip it.
    """
    k = weights[0].shape[1]
    if stats.in_features != k:
        raise CheckpointError(
            f"layer {where}: the weights have {k} input channels but the calibration statistics have "
            f"{stats.in_features} (statistics from another model?)"
        )
    x = stats.samples.float()
    act = stats.channel_absmax()
    if x.shape[0] == 0 or not bool((act > 0).any()):
        return AlphaChoice(None, None, 0.0, 0.0, {"none": 0.0})

    w_abs = column_absmax(weights)
    values = [float(alpha)] if alpha is not None else sorted({float(a) for a in grid} | {ANCHOR_ALPHA})
    candidates: dict[str, torch.Tensor | None] = {"none": None}
    for a in values:
        candidates[f"{a:g}"] = smoothing_vector(act, w_abs, a)
    errors = _group_errors(weights, x, candidates, search_rows)
    if alpha is not None:
        key = f"{float(alpha):g}"
        return AlphaChoice(float(alpha), candidates[key], errors[key], errors["none"], errors)
    pool = [c for c in candidates if allow_none or c != "none"]
    best = min(errors[c] for c in pool)
    tied = [c for c in pool if errors[c] <= best + TIE_RTOL * abs(best)]
    pick = min(tied, key=_preference)
    if pick == "none":
        return AlphaChoice(None, None, errors["none"], errors["none"], errors)
    return AlphaChoice(float(pick), candidates[pick], errors[pick], errors["none"], errors)


def _preference(candidate: str) -> tuple[int, float, float]:
    """Sort key among tied candidates: no smoothing first, then alphas by distance to ANCHOR_ALPHA, smaller first."""
    if candidate == "none":
        return (0, 0.0, 0.0)
    a = float(candidate)
    return (1, abs(a - ANCHOR_ALPHA), a)


def _group_errors(
    weights: Sequence[Weight],
    x: torch.Tensor,
    candidates: dict[str, torch.Tensor | None],
    search_rows: int | None,
) -> dict[str, float]:
    """Mean over weights of the objective (`w8a8_relative_error`) of every candidate smoothing vector.

    Per weight and candidate, with E = Y_q - Y on the T sample tokens: ||E||² / ||Y||² + ||Σ_t E_t||² / ||Σ_t Y_t||².
    The first term is the per-token error; the second is the coherent part of it, which is mostly the weight's
    rounding (one fixed ΔW for every token) and survives everything that averages over tokens (attention's
    weighted sums, pooling, the residual stream over layers and steps), while per-token activation rounding
    averages out. Without it the search trades activation error for weight error too eagerly (α 0.9-1.0 on
    post-GELU inputs). Sums are taken in float64 with numpy's single-threaded pairwise reduction, so they do not
    depend on the thread count.
    """
    xq = {c: quantize_per_token(x, None if s is None else 1.0 / s) for c, s in candidates.items()}
    xd = x.double()
    total = dict.fromkeys(candidates, 0.0)
    for weight in weights:
        n, k = weight.shape
        index = None
        if search_rows is not None and n > search_rows:
            index = torch.linspace(0, n - 1, search_rows).round().long().unique()
        sq = {c: [] for c in candidates}
        col = {c: [] for c in candidates}
        ref_sq, ref_col = [], []
        for block in _blocks(n if index is None else index.numel(), k):
            w = _rows(weight, block if index is None else index[block])
            ref = (xd @ w.double().t()).numpy()
            ref_sq.append(np.square(ref).sum())
            ref_col.append(ref.sum(axis=0))
            for c, s in candidates.items():
                wq, ws = quantize_weight_per_channel(w, s)
                q, qs = xq[c]
                y = int8_matmul(q, wq.t()).double() * qs.double()[:, None] * ws.double()[None, :]
                e = y.numpy() - ref
                sq[c].append(np.square(e).sum())
                col[c].append(e.sum(axis=0))
        den = math.fsum(ref_sq)
        den_sum = float(np.square(np.concatenate(ref_col)).sum())
        for c in candidates:
            if den > 0:
                total[c] += math.fsum(sq[c]) / den
            if den_sum > 0:
                total[c] += float(np.square(np.concatenate(col[c])).sum()) / den_sum
    return {c: v / len(weights) for c, v in total.items()}


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def fold_into_norm(norm_weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Norm weight / s, computed in float64 and stored in the norm weight's dtype."""
    return (norm_weight.double() / s.double().to(norm_weight.device)).to(norm_weight.dtype)


def scale_rows(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Weight [N, K] (float32 or wider) with row n divided by s_n (the producing Linear of a smoothed input)."""
    dt = _work_dtype(weight)
    return weight.to(dt) / s.to(dt)[:, None]


def scale_columns(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Weight [N, K] (float32 or wider) with column k multiplied by s_k."""
    dt = _work_dtype(weight)
    return weight.to(dt) * s.to(dt)[None, :]
