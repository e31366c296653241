"""Smoothing groups of any model: which Linears share one input (hence one smoothing vector s) and where 1/s can
be folded exactly. Ideogram 4 transformers keep their named groups (`smoothquant.smooth_groups`); any other model's
groups are found by tracing one forward call (`discover_groups(model, run)`, where `run(model)` calls the model):

- Linears fed the very same tensor form one group (BERT's query/key/value; Llama's q/k/v and gate/up);
- a group whose input is the output of a LayerNorm / RMSNorm gets the fold ("norm", that norm): 1/s goes into the
  norm's weight (and bias), s into the group's columns;
- any other group tries the Linears that ran just before it with out_features == its in_features ("rows": 1/s into
  that Linear's rows and bias, as attention's output projection folds into the value projection).
Every candidate fold is checked exactly before it is kept: a random s in [1/2, 2] is folded into the model, which
runs again on the same call; a fold whose output moves beyond float rounding is refused. So a post-norm block
(BERT: the LayerNorm's output is also the residual that the next LayerNorm adds) keeps its shared-input groups
but folds nothing into its norms; its smoothing is then handled as `SmoothQuantConfig.unfoldable` says.

Groups can also be given explicitly (`SmoothQuantConfig(groups=...)`) and travel in calibration statistics
(`calibrate_model` finds them on its first call); `model_groups` picks among these and checks them against the model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ditq.errors import ConfigError
from ditq.quant.int8.groupspec import (
    check_groups,
    group_name,
    groups_from_aliases,
    groups_to_json,
    parse_group,
    parse_groups,
)
from ditq.quant.int8.smoothquant import SmoothGroup, smooth_groups
from ditq.quant.modules import is_linear_like

log = logging.getLogger(__name__)

MAX_PRODUCERS = 3  # preceding Linears tried as a "rows" fold target, nearest first
# largest relative L2 change of the model output a fold may cause and still count as exact
FOLD_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
Run = Callable[[nn.Module], Any]
__all__ = [
    "GroupTrace",
    "apply_fold_",
    "check_folds",
    "check_groups",
    "discover_groups",
    "fold_change",
    "fold_norm_",
    "group_name",
    "groups_from_aliases",
    "groups_to_json",
    "is_ideogram",
    "is_norm",
    "model_groups",
    "parse_group",
    "parse_groups",
    "resolve_unfoldable",
    "trace_groups",
]


def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm (torch's or a model's own `*Norm` class) with a per-channel weight [K]."""
    if isinstance(module, nn.LayerNorm | nn.RMSNorm):
        return getattr(module, "weight", None) is not None
    w = getattr(module, "weight", None)
    return type(module).__name__.endswith("Norm") and isinstance(w, torch.Tensor) and w.dim() == 1


def is_ideogram(model: nn.Module, linear_names: Iterable[str] | None = None) -> bool:
    """True for an Ideogram 4 transformer: its class, or its text projection `llm_cond_proj` beside block Linears
    the Ideogram 4 rule folds (other DiTs share the block names, not the whole set)."""
    if type(model).__name__.startswith("Ideogram4"):
        return True
    names = list(linear_names) if linear_names is not None else _linear_names(model)
    return "llm_cond_proj" in names and any(g.fold and g.fold[0] == "rows" for g in smooth_groups(names))


@dataclass
class GroupTrace:
    """What `trace_groups` found: the groups in execution order, the norm whose output each group reads (also when
    folding into it was refused), and why candidate folds were refused."""

    groups: list[SmoothGroup]
    sources: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def discover_groups(model: nn.Module, run: Run, *, verify: bool = True) -> list[SmoothGroup]:
    """The smoothing groups of `model` (every Linear in exactly one), from one traced `run(model)`."""
    return trace_groups(model, run, verify=verify).groups


def trace_groups(model: nn.Module, run: Run, *, verify: bool = True, seed: int = 0) -> GroupTrace:
    """Trace `run(model)` (hooks only, weights untouched) and build the groups; `verify` checks each fold exactly."""
    lins = {n: m for n, m in model.named_modules() if is_linear_like(m)}
    norms = {n: m for n, m in model.named_modules() if is_norm(m)}
    keep: list[torch.Tensor] = []  # every traced tensor stays alive, so no address is reused during the trace
    produced: dict[tuple, str] = {}
    inputs: dict[str, list[tuple]] = {}
    handles = []

    def norm_hook(name: str):
        def hook(module, args, out):
            if torch.is_tensor(out):
                keep.append(out)
                produced.setdefault(_key(out), name)

        return hook

    def linear_hook(name: str):
        def hook(module, args):
            if args and torch.is_tensor(args[0]):
                keep.append(args[0])
                inputs.setdefault(name, []).append(_key(args[0]))

        return hook

    for n, m in norms.items():
        handles.append(m.register_forward_hook(norm_hook(n)))
    for n, m in lins.items():
        handles.append(m.register_forward_pre_hook(linear_hook(n)))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    keep.clear()

    members: dict[tuple, list[str]] = {}
    for n in inputs:  # insertion order is execution order
        members.setdefault(tuple(inputs[n]), []).append(n)
    order = list(inputs)
    trace = GroupTrace([])
    ref = _reference(model, run) if verify else None
    rng = torch.Generator().manual_seed(seed)
    used: set[str] = set()
    for key, names in members.items():
        name = group_name(names)
        sources = {produced.get(k) for k in key}
        source = next(iter(sources)) if len(sources) == 1 else None
        candidates: list[tuple[str, str]] = []
        if source is not None:  # a norm's output is no Linear's: only the norm can take 1/s
            trace.sources[name] = source
            candidates.append(("norm", source))
        else:
            k = lins[names[0]].in_features
            first = order.index(names[0])
            before = [p for p in reversed(order[:first]) if p not in names and lins[p].out_features == k]
            candidates += [("rows", p) for p in before[:MAX_PRODUCERS]]
        fold = None
        why: list[str] = []
        for cand in candidates:
            if cand[1] in used:
                continue
            if ref is None:
                fold = cand if cand[0] == "norm" else None
                break
            err = fold_change(model, run, names, cand, ref, rng)
            if err <= FOLD_TOLERANCE.get(_dtype(model), 1e-4):
                fold = cand
                break
            why.append(f"{cand[0]}:{cand[1]} moves the output by {err:.2g} (relative)")
        if fold is not None:
            used.add(fold[1])
        elif why:
            trace.refused[name] = "; ".join(why)
        trace.groups.append(SmoothGroup(name, tuple(names), fold))
    for n in lins:  # Linears the call never ran
        if n not in inputs:
            trace.groups.append(SmoothGroup(n, (n,)))
    log.info(
        "%d smoothing groups: %d fold into a norm, %d into a Linear's rows, %d folds refused",
        len(trace.groups),
        sum(1 for g in trace.groups if g.fold and g.fold[0] == "norm"),
        sum(1 for g in trace.groups if g.fold and g.fold[0] == "rows"),
        len(trace.refused),
    )
    return trace


def fold_norm_(norm: nn.Module, s: torch.Tensor) -> None:
    """Divide a norm's weight (and bias) by s [K] in place, computed in float64: its output becomes y / s."""
    with torch.no_grad():
        for p in (norm.weight, getattr(norm, "bias", None)):
            if isinstance(p, torch.Tensor):
                p.copy_((p.double() / s.double().to(p.device)).to(p.dtype))


def apply_fold_(model: nn.Module, linears: Sequence[str], fold: tuple[str, str], s: torch.Tensor) -> None:
    """Fold 1/s into the fold target and s into the columns of `linears` (float nn.Linear modules), in place."""
    kind, target = fold
    mod = model.get_submodule(target)
    with torch.no_grad():
        if kind == "norm":
            fold_norm_(mod, s)
        else:
            mod.weight.copy_((mod.weight.double() / s.double()[:, None]).to(mod.weight.dtype))
            if mod.bias is not None:
                mod.bias.copy_((mod.bias.double() / s.double()).to(mod.bias.dtype))
        for n in linears:
            w = model.get_submodule(n).weight
            w.copy_((w.double() * s.double()[None, :]).to(w.dtype))


def check_folds(model: nn.Module, run: Run, groups: Iterable[SmoothGroup], where: str) -> None:
    """Refuse (ConfigError naming the group) a fold that changes what `run(model)` computes."""
    ref = _reference(model, run)
    rng = torch.Generator().manual_seed(0)
    for g in groups:
        if g.fold is None:
            continue
        err = fold_change(model, run, g.linears, g.fold, ref, rng)
        if err > FOLD_TOLERANCE.get(_dtype(model), 1e-4):
            raise ConfigError(
                f"{where}: group {g.name!r} cannot fold into {':'.join(g.fold)}: a smoothing vector folded there "
                f"moves the model's output by {err:.2g} (relative); give it no fold"
            )


def fold_change(
    model: nn.Module,
    run: Run,
    linears: Sequence[str],
    fold: tuple[str, str],
    reference: list[torch.Tensor],
    rng: torch.Generator,
) -> float:
    """Relative L2 change of the model's outputs when a random s in [1/2, 2] is folded as `fold` says; the weights
    are restored bit for bit afterwards. inf where a module is not a float nn.Linear or norm."""
    mods = [model.get_submodule(n) for n in (*linears, fold[1])]
    if any(not isinstance(getattr(m, "weight", None), torch.Tensor) for m in mods) or not all(
        isinstance(model.get_submodule(n), nn.Linear) for n in linears
    ):
        return math.inf
    k = model.get_submodule(linears[0]).in_features
    s = torch.exp2(torch.rand(k, generator=rng, dtype=torch.float64) * 2 - 1).float()
    saved = [
        (p, p.detach().clone()) for m in mods for p in (m.weight, getattr(m, "bias", None)) if p is not None
    ]
    try:
        apply_fold_(model, linears, fold, s)
        out = _reference(model, run)
    finally:
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)
    if (
        not reference
        or len(out) != len(reference)
        or any(o.shape != r.shape for o, r in zip(out, reference, strict=True))
    ):
        return math.inf
    num = sum(float(((o - r) ** 2).sum()) for o, r in zip(out, reference, strict=True))
    den = sum(float((r**2).sum()) for r in reference)
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def _reference(model: nn.Module, run: Run) -> list[torch.Tensor]:
    """Every floating-point tensor the model's top-level calls return during `run(model)`, as float64."""
    outs: list[torch.Tensor] = []
    h = model.register_forward_hook(lambda m, a, out: outs.extend(float_tensors(out)))
    try:
        with torch.no_grad():
            run(model)
    finally:
        h.remove()
    return [o.detach().double() for o in outs]


def float_tensors(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors in a model output (tensor, tuple, list, dict or Hugging Face ModelOutput)."""
    if torch.is_tensor(value):
        return [value] if value.is_floating_point() else []
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in float_tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in float_tensors(v)]
    return []


def resolve_unfoldable(unfoldable: str, ideogram: bool) -> str:
    """`SmoothQuantConfig.unfoldable` as applied: "auto" is "bf16" on an Ideogram 4 transformer (what its files can
    hold, so the model in memory equals the converted file) and "explicit" on any other model (the smoothing
    applied as a scale fused into activation quantization, as torchao's SmoothQuant keeps it)."""
    if unfoldable != "auto":
        return unfoldable
    return "bf16" if ideogram else "explicit"


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.numel(), tuple(t.shape), t._version)


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_linear_like(m)]


def model_groups(
    model: nn.Module,
    linears: Mapping[str, nn.Module],
    *,
    explicit: Sequence[SmoothGroup] | None = None,
    stats=None,
    transformer: str = "",
    run: Run | None = None,
) -> list[SmoothGroup]:
    """The groups SmoothQuant uses, first found of: `explicit` groups; Ideogram 4's named groups (what its files
    follow); the groups in `stats` for `transformer` (from `calibrate_model`); groups traced with `run`; the shared
    inputs calibration recorded (no folds)."""
    if explicit:
        groups = check_groups(explicit, model, linears, "SmoothQuantConfig.groups")
        if run is not None:
            check_folds(model, run, groups, "SmoothQuantConfig.groups")
        return groups
    if is_ideogram(model, linears):
        return smooth_groups(linears)
    stored = None if stats is None else getattr(stats, "groups", {}).get(transformer)
    if stored:
        where = f"the calibration statistics' groups for {transformer!r}"
        return check_groups([parse_group(g, where) for g in stored], model, linears, where)
    if run is not None:
        return check_groups(discover_groups(model, run), model, linears, "traced groups")
    log.warning(
        "no smoothing groups for %s: nothing folds (calibrate with calibrate_model, which finds them, or pass "
        "SmoothQuantConfig(groups=...))",
        type(model).__name__,
    )
    aliases = {} if stats is None else stats.aliases.get(transformer, {})
    return groups_from_aliases(linears, aliases)
