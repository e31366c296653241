"""Smoothing groups written down: parsed from a config or a calibration file, checked against a model.

A group is a `SmoothGroup` (`ditq.quant.int8.smoothquant`): the Linears that share one input, hence one smoothing
vector s [K], and where 1/s is folded: ("norm", <norm module>) divides the norm's weight (and bias) by s,
("rows", <Linear>) the rows of the Linear producing the input, None folds nothing. Written forms:
`{"linears": [...], "fold": "norm:<module>" | "rows:<Linear>" | None, "name": optional}` or a list of Linear names.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ditq.errors import ConfigError
from ditq.quant.int8.smoothquant import SmoothGroup

FOLD_KINDS = ("norm", "rows")


def group_name(names: Sequence[str]) -> str:
    """`a.b.query+key+value` for Linears `a.b.query`, `a.b.key`, `a.b.value`; a single Linear keeps its name."""
    if len(names) == 1:
        return names[0]
    prefix = os.path.commonprefix([n.split(".") for n in names])
    head = ".".join(prefix)
    tails = [".".join(n.split(".")[len(prefix) :]) for n in names]
    return (head + "." if head else "") + "+".join(tails)


def parse_group(item: SmoothGroup | Mapping | Sequence[str], where: str = "groups") -> SmoothGroup:
    """A SmoothGroup from a SmoothGroup, a mapping {"linears": [...], "fold": "norm:<module>" | "rows:<Linear>" |
    None, "name": optional}, or a plain list of Linear names (one shared scale, nothing folded)."""
    if isinstance(item, SmoothGroup):
        linears, fold, name = item.linears, item.fold, item.name
    elif isinstance(item, Mapping):
        unknown = set(item) - {"name", "linears", "fold"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; a group has name, linears and fold")
        linears, fold, name = item.get("linears"), item.get("fold"), item.get("name")
    elif isinstance(item, Sequence) and not isinstance(item, str):
        linears, fold, name = item, None, None
    else:
        raise ConfigError(
            f"{where}: expected a SmoothGroup, a mapping or a list of Linear names, got {item!r}"
        )
    if isinstance(linears, str) or not linears or not all(isinstance(n, str) for n in linears):
        raise ConfigError(f"{where}: linears must be a non-empty list of Linear names, got {linears!r}")
    linears = tuple(linears)
    if isinstance(fold, str):
        kind, sep, target = fold.partition(":")
        fold = (kind, target) if sep else (fold,)
    if fold is not None:
        fold = tuple(fold)
        if len(fold) != 2 or fold[0] not in FOLD_KINDS or not isinstance(fold[1], str) or not fold[1]:
            raise ConfigError(
                f"{where}: fold must be 'norm:<norm module>', 'rows:<producing Linear>' or None, got {fold!r}"
            )
    return SmoothGroup(name if isinstance(name, str) and name else group_name(linears), linears, fold)


def parse_groups(value: object, where: str) -> tuple[SmoothGroup, ...]:
    """A list of groups in any written form (`parse_group`), as SmoothGroups."""
    if isinstance(value, str | Mapping) or not isinstance(value, Iterable):
        raise ConfigError(f"{where} must be a list of groups, got {value!r}")
    return tuple(parse_group(g, f"{where}[{i}]") for i, g in enumerate(value))


def groups_to_json(groups: Iterable[SmoothGroup]) -> list[dict]:
    """[{"name", "linears", "fold": "norm:<module>" | "rows:<Linear>" | None}] (the calibration file's form)."""
    return [
        {"name": g.name, "linears": list(g.linears), "fold": None if g.fold is None else ":".join(g.fold)}
        for g in groups
    ]


def check_groups(
    groups: Iterable[SmoothGroup], model: nn.Module, linears: Mapping[str, nn.Module], where: str = "groups"
) -> list[SmoothGroup]:
    """`groups` checked against the model, completed with one unfolded group per Linear they leave out."""
    out: list[SmoothGroup] = []
    owner: dict[str, str] = {}
    names: set[str] = set()
    modules = dict(model.named_modules())
    for g in groups:
        if g.name in names:
            raise ConfigError(f"{where}: two groups are named {g.name!r}")
        names.add(g.name)
        for n in g.linears:
            if n not in linears:
                hint = "" if n not in modules else f" (it is a {type(modules[n]).__name__}, not a Linear)"
                raise ConfigError(
                    f"{where}: group {g.name!r} names layer {n!r}, which is no Linear of the model{hint}"
                )
            if n in owner:
                raise ConfigError(f"{where}: layer {n!r} is in two groups, {owner[n]!r} and {g.name!r}")
            owner[n] = g.name
        ks = {linears[n].in_features for n in g.linears}
        if len(ks) != 1:
            raise ConfigError(
                f"{where}: group {g.name!r} mixes Linears of in_features {sorted(ks)}; they share one input"
            )
        k = ks.pop()
        if g.fold is not None:
            kind, target = g.fold
            mod = modules.get(target)
            if mod is None:
                raise ConfigError(
                    f"{where}: group {g.name!r} folds into {target!r}, which is no module of the model"
                )
            if kind == "norm":
                w = getattr(mod, "weight", None)
                if not isinstance(w, torch.Tensor) or tuple(w.shape) != (k,):
                    raise ConfigError(
                        f"{where}: group {g.name!r} folds into norm {target!r}, which needs a weight [{k}] "
                        f"(has {None if not isinstance(w, torch.Tensor) else list(w.shape)})"
                    )
            elif target not in linears or linears[target].out_features != k:
                raise ConfigError(
                    f"{where}: group {g.name!r} folds into the rows of {target!r}, which must be a Linear with "
                    f"out_features {k}"
                )
        out.append(g)
    out += [SmoothGroup(n, (n,)) for n in linears if n not in owner]
    return out


def groups_from_aliases(linears: Iterable[str], aliases: Mapping[str, str]) -> list[SmoothGroup]:
    """Unfolded groups of the Linears calibration saw fed one tensor (`CalibrationStats.aliases`: alias -> leader)."""
    members: dict[str, list[str]] = {}
    for n in linears:
        members.setdefault(aliases.get(n, n), []).append(n)
    return [SmoothGroup(group_name(ns), tuple(ns)) for ns in members.values()]
