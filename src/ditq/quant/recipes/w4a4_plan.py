"""What the W4A4 recipes decide for one transformer, in memory (`quantize_`) and in the streaming writer alike:
which Linears stay bf16, the smoothing of each group, and the tensors of each quantized (fused) Linear.

Layers are handled by *units*, the official fused modules (`layers.i.attention.qkv` is one unit of to_q/to_k/to_v):
a unit is one tensor on disk, so it is kept or quantized as a whole, and SVDQuant takes one SVD of the fused weight.

α is chosen per smoothing group (`ditq.quant.int8.smoothquant.smooth_groups`: the Linears that share one input)
from the calibration statistics' sample tokens: for each candidate s = max|X|^α / max|W|^(1-α) (and "no smoothing")
the group's units are quantized by the recipe itself and the mean relative output error ||Y_q - Y||² / ||Y||² on up
to `SEARCH_ROWS` evenly spaced rows of each is measured; the smallest wins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ditq.formats.keys import fused_module_name
from ditq.quant.calibration import CalibrationStats
from ditq.quant.int8.config import protected_set
from ditq.quant.int8.smoothquant import (
    SEARCH_ROWS,
    SmoothGroup,
    column_absmax,
    smooth_groups,
    smoothing_vector,
)
from ditq.quant.recipes.w4a4 import ConvRotW4A4Recipe, SVDQuantRecipe, W4A4Recipe

_QKV_ORDER = {"to_q": 0, "to_k": 1, "to_v": 2}


def units_of(names: Iterable[str]) -> dict[str, list[str]]:
    """{official fused module: its split members in row order (q, k, v)}."""
    units: dict[str, list[str]] = {}
    for n in names:
        units.setdefault(fused_module_name(n), []).append(n)
    return {u: sorted(m, key=lambda n: _QKV_ORDER.get(n.rpartition(".")[2], 0)) for u, m in units.items()}


def kept_layers(
    recipe: W4A4Recipe, linears: Mapping[str, tuple[int, int]], extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """{split Linear name: why it stays bf16}: protected, too narrow for the int4 kernels, or in `extra` ({name:
    reason}, e.g. refused by a filter_fn); widened to whole units."""
    kept = dict.fromkeys(protected_set(linears, recipe.protect), "protected")
    for n, why in (extra or {}).items():
        kept.setdefault(n, why)
    for n, (_, k) in linears.items():
        why = recipe.fits(k)
        if why is not None:
            kept.setdefault(n, why)
    for members in units_of(linears).values():
        why = next((kept[m] for m in members if m in kept), None)
        if why is not None:
            for m in members:
                kept.setdefault(m, why)
    return kept


@dataclass
class SmoothChoice:
    """The smoothing of one group: `s` None means none; `fold` says where 1/s goes (ConvRot only)."""

    group: SmoothGroup
    alpha: float | None = None
    s: torch.Tensor | None = None
    errors: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    def summary(self) -> dict:
        fold = self.group.fold if self.s is not None else None
        return {
            "alpha": self.alpha,
            "fold": None if fold is None else f"{fold[0]}:{fold[1]}",
            "error": self.errors.get("none" if self.alpha is None else f"{self.alpha:g}"),
            "plain_error": self.errors.get("none"),
            "reason": self.reason,
        }


def unit_tensors(
    recipe: W4A4Recipe, weight: torch.Tensor, s: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The format tensors of one quantized unit from its float32 weight [N, K] (rows already divided where a
    smoothing is folded into them) and its group's smoothing vector s [K] or None."""
    if isinstance(recipe, SVDQuantRecipe):
        from ditq.formats.svdquant import quantize_svdq

        return quantize_svdq(weight, s, recipe.rank)
    from ditq.formats.convrot_w4a4 import quantize_convrot_w4a4

    w = weight if s is None else weight * s[None, :].to(weight.device)
    return quantize_convrot_w4a4(w, recipe.group_for(weight.shape[1]))


def output_error(recipe: W4A4Recipe, weight: torch.Tensor, x: torch.Tensor, s: torch.Tensor | None) -> float:
    """||Y_q - Y||² / ||Y||² of one unit on sample tokens x [T, K], on up to SEARCH_ROWS evenly spaced rows."""
    from ditq.formats import convrot_w4a4, svdquant

    n = weight.shape[0]
    rows = torch.linspace(0, n - 1, SEARCH_ROWS).round().long().unique() if n > SEARCH_ROWS else None
    ref = x.double() @ (weight if rows is None else weight[rows]).double().t()
    if isinstance(recipe, SVDQuantRecipe):
        t = unit_tensors(recipe, weight, s)
        if rows is not None:
            t = {k: _take_rows(k, v, rows) for k, v in t.items()}
        y = svdquant.SVDQuantFormat().build(t, torch.float32)(x)
    else:
        w = weight if rows is None else weight[rows]
        xs = x if s is None else x / s[None, :]
        y = convrot_w4a4.ConvRotW4A4Format().build(unit_tensors(recipe, w, s), torch.float32)(xs)
    den = float((ref**2).sum())
    return float(((y.double() - ref) ** 2).sum()) / den if den > 0 else 0.0


def _take_rows(suffix: str, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    if suffix in ("weight", "weight_proj_up"):
        return t[rows]
    if suffix == "weight_scale":
        return t[:, rows]
    return t


def choose_smoothing(
    recipe: W4A4Recipe,
    linears: Mapping[str, tuple[int, int]],
    kept: Mapping[str, str],
    unit_weight: Callable[[str], torch.Tensor],
    stats: CalibrationStats | None,
    transformer: str,
) -> list[SmoothChoice]:
    """One `SmoothChoice` per smoothing group (`unit_weight(unit)` -> its float32 fused weight [N, K])."""
    choices = []
    for g in smooth_groups(linears):
        live = [n for n in g.linears if n not in kept]
        if not live:
            choices.append(SmoothChoice(g, reason=kept[g.linears[0]]))
        elif not recipe.smoothquant or stats is None:
            choices.append(SmoothChoice(g))
        elif isinstance(recipe, ConvRotW4A4Recipe) and g.fold is None:
            why = "no neighbouring weight to fold 1/s into (the convrot_w4a4 layout has no input scale)"
            choices.append(SmoothChoice(g, reason=why))
        else:
            choices.append(
                _search(recipe, g, list(units_of(live)), unit_weight, stats.get(transformer, live[0]))
            )
    return choices


def _search(recipe, group, units, unit_weight, module_stats) -> SmoothChoice:
    x = module_stats.samples.float()
    act = module_stats.channel_absmax()
    if x.shape[0] == 0 or not bool((act > 0).any()):
        return SmoothChoice(group, errors={"none": 0.0}, reason="no calibration samples")
    weights = [unit_weight(u) for u in units]
    w_abs = column_absmax(weights)
    candidates: dict[str, torch.Tensor | None] = {"none": None}
    for a in [recipe.alpha] if recipe.alpha is not None else recipe.alpha_grid:
        candidates[f"{a:g}"] = smoothing_vector(act, w_abs, a)
    errors = {
        c: sum(output_error(recipe, w, x, s) for w in weights) / len(weights) for c, s in candidates.items()
    }
    best = min((c for c in candidates if c != "none"), key=lambda c: errors[c])
    if recipe.alpha is None and errors["none"] <= errors[best]:
        return SmoothChoice(group, None, None, errors, "smoothing does not lower the W4A4 error here")
    return SmoothChoice(group, float(best), candidates[best], errors)


@dataclass
class Folds:
    """Where the chosen smoothings go: `columns[unit]` multiplies a unit's input columns (SVDQuant: stored as its
    input scale instead), `rows[unit]` divides a producing unit's rows, `norms[module]` divides a norm's weight."""

    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)


def plan_folds(
    recipe: W4A4Recipe, choices: list[SmoothChoice], linears: Mapping[str, tuple[int, int]]
) -> Folds:
    units = units_of(linears)
    folds = Folds()
    for c in choices:
        if c.s is None:
            continue
        for u in units_of(c.group.linears):
            folds.columns[u] = c.s
        if isinstance(recipe, SVDQuantRecipe):
            continue
        kind, target = c.group.fold
        if kind == "norm":
            folds.norms[target] = c.s
            continue
        unit = fused_module_name(target)
        members = units[unit]
        div = folds.rows.get(unit)
        if div is None:
            div = folds.rows[unit] = torch.ones(sum(linears[m][0] for m in members))
        start = sum(linears[m][0] for m in members[: members.index(target)])
        div[start : start + linears[target][0]] = c.s
    return folds


def pick_transformer(stats: CalibrationStats, transformer: str | None) -> str:
    """The statistics' entry for this model: `transformer`, or the only one they have."""
    from ditq.errors import ConfigError

    if transformer is not None and transformer in stats.modules:
        return transformer
    if len(stats.transformers) == 1:
        return stats.transformers[0]
    raise ConfigError(
        f"statistics cover {', '.join(stats.transformers)}; pass transformer= to say which this model is"
    )


def quantize_model_w4a4(model, recipe: W4A4Recipe, filter_fn=None, stats=None, transformer=None):
    """`quantize_(model, recipe)`: the same decisions and tensors as the streaming writer, applied in place."""
    from torch import nn

    from ditq.errors import ConfigError
    from ditq.formats.base import LINEAR_FORMATS
    from ditq.quant.api import QuantizationRecord
    from ditq.quant.int8.smoothquant import fold_into_norm
    from ditq.quant.modules import (
        float_bias,
        float_linear,
        float_weight,
        linear_modules,
        model_dtype,
        set_module,
    )

    if recipe.smoothquant and stats is None:
        raise ConfigError(
            f"{type(recipe).__name__}(smoothquant=True) needs calibration statistics: pass stats="
        )
    mods, skipped = linear_modules(model, filter_fn)
    linears = {n: (m.out_features, m.in_features) for n, m in mods.items()}
    kept = kept_layers(recipe, linears, dict.fromkeys(skipped, "filter_fn"))
    units = units_of(linears)

    def unit_weight(unit: str) -> torch.Tensor:
        return torch.cat([float_weight(mods[m]) for m in units[unit]])

    tr = pick_transformer(stats, transformer) if recipe.smoothquant else ""
    choices = choose_smoothing(recipe, linears, kept, unit_weight, stats if recipe.smoothquant else None, tr)
    folds = plan_folds(recipe, choices, linears)
    for name, s in folds.norms.items():
        norm = model.get_submodule(name)
        with torch.no_grad():
            norm.weight.copy_(fold_into_norm(norm.weight, s))
    fmt, dtype = LINEAR_FORMATS.get(recipe.format), model_dtype(model)
    convrot = isinstance(recipe, ConvRotW4A4Recipe)
    quantized = {}
    for unit, members in units.items():
        col = folds.columns.get(unit)
        touched = unit in folds.rows or (convrot and col is not None)
        keep = members[0] in kept
        if keep and not touched and all(m in skipped or isinstance(mods[m], nn.Linear) for m in members):
            continue
        w = unit_weight(unit)
        biases = [float_bias(mods[m]) for m in members]
        b = torch.cat(biases) if all(x is not None for x in biases) else None
        if unit in folds.rows:
            div = folds.rows[unit].to(w.device)
            w = w / div[:, None]
            b = None if b is None else b / div
        device, parts = w.device, len(members)
        if keep:
            if convrot and col is not None:
                w = w * col[None, :].to(device)
            step = w.shape[0] // parts
            for i, m in enumerate(members):
                bm = None if b is None else b[i * step : (i + 1) * step]
                set_module(model, m, float_linear(w[i * step : (i + 1) * step], bm, dtype, device))
            continue
        t = unit_tensors(recipe, w, col)
        if b is not None:
            t["bias"] = b
        for i, m in enumerate(members):
            part = {k: fmt.slice_rows(k, v, i, parts) if parts > 1 else v for k, v in t.items()}
            set_module(model, m, fmt.build(part, dtype).to(device))
            quantized[m] = fmt.name
    details = {
        "groups": {c.group.name: c.summary() for c in choices},
        "transformer": tr or None,
    }
    return QuantizationRecord(
        config=recipe.to_dict(), quantized=quantized, kept_float=dict(kept), details=details
    )
