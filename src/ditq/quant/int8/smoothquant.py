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

α is chosen per group by a grid search that minimizes the group's W8A8 output error on the calibration sample
tokens (mean over the group's Linears of ||Y_q - Y||² / ||Y||²); "no smoothing" (s = 1) is a candidate too, so
the search never does worse than plain W8A8 on those tokens. A global α skips the search.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
    """||Q(x/s) Q(W·s)^T - x W^T||² / ||x W^T||² for fp32 x [T, K], W [N, K], over all rows."""
    return _group_errors([weight], x, {"s": s}, search_rows=None)["s"]


@dataclass
class AlphaChoice:
    """The smoothing chosen for one group: `alpha` None means no smoothing (s = 1)."""

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

    s uses the column maxima of the whole weights; the error of each candidate is measured on the sample tokens
    and on up to `search_rows` evenly spaced output rows of each weight (None: all rows).
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
    candidates: dict[str, torch.Tensor | None] = {"none": None}
    for a in [alpha] if alpha is not None else list(grid):
        candidates[f"{a:g}"] = smoothing_vector(act, w_abs, a)
    errors = _group_errors(weights, x, candidates, search_rows)
    alphas = [c for c in candidates if c != "none"]
    best = min(alphas, key=lambda c: errors[c])
    if alpha is None and allow_none and errors["none"] <= errors[best]:
        return AlphaChoice(None, None, errors["none"], errors["none"], errors)
    return AlphaChoice(float(best), candidates[best], errors[best], errors["none"], errors)


def _group_errors(
    weights: Sequence[Weight],
    x: torch.Tensor,
    candidates: dict[str, torch.Tensor | None],
    search_rows: int | None,
) -> dict[str, float]:
    """Mean over weights of the relative W8A8 output error, for every candidate smoothing vector."""
    xq = {c: quantize_per_token(x, None if s is None else 1.0 / s) for c, s in candidates.items()}
    xd = x.double()
    total = dict.fromkeys(candidates, 0.0)
    for weight in weights:
        n, k = weight.shape
        index = None
        if search_rows is not None and n > search_rows:
            index = torch.linspace(0, n - 1, search_rows).round().long().unique()
        num = dict.fromkeys(candidates, 0.0)
        den = 0.0
        for block in _blocks(n if index is None else index.numel(), k):
            w = _rows(weight, block if index is None else index[block])
            ref = xd @ w.double().t()
            den += float((ref**2).sum())
            for c, s in candidates.items():
                wq, ws = quantize_weight_per_channel(w, s)
                q, qs = xq[c]
                y = int8_matmul(q, wq.t()).double() * qs.double()[:, None] * ws.double()[None, :]
                num[c] += float(((y - ref) ** 2).sum())
        for c in candidates:
            total[c] += num[c] / den if den > 0 else 0.0
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
