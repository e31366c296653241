"""Fragility of each Linear under W8A8, and the protected set a budget buys.

`measure_fragility` quantizes one Linear at a time (with the smoothing the recipe would give it: folded groups get
their α, unfoldable ones are measured unsmoothed, as they would be stored) and reruns the transformer on the
calibration probes (complete transformer calls kept by the calibration, spread over the timestep buckets). A
layer's fragility is the relative squared error of the transformer output on the image tokens,
Σ ||y_q - y||² / Σ ||y||² over the probes, with every other layer left as it is.

Any other model takes a `probe`: a callable that runs it (`probe(model)`, e.g. on one tokenized batch). Its error is
then measured on every floating-point tensor its top-level calls return, without the padding tokens: an output
whose leading dims are the call's [B, T] token mask (`token_mask`, default: the `attention_mask` argument) keeps
only the real tokens. Its smoothing groups are those SmoothQuant gives it (`ditq.quant.int8.groups.model_groups`).

`choose_protected` picks layers to keep in bf16 under a budget: a number of layers, extra bytes, or a target error.
The unit of choice is what the file stores as one tensor: to_q/to_k/to_v are one fused `attention.qkv`. The target
error assumes the per-layer errors add up (independent errors): layers are protected from the most fragile down
until the sum of the remaining ones is within the target.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from ditq.errors import ConfigError
from ditq.formats.int8 import Int8Linear, marker_bytes
from ditq.formats.keys import fused_module_name
from ditq.quant.calibration import (
    CalibrationStats,
    TokenMask,
    call_arguments,
    default_token_mask,
    is_linear_like,
    probe_inputs,
)
from ditq.quant.int8.config import (
    DEFAULT_PROTECT,
    Int8W8A8Config,
    SmoothQuantConfig,
    decide_group,
    float_weight,
    is_protected,
)
from ditq.quant.int8.groups import float_tensors, is_ideogram, model_groups, resolve_unfoldable
from ditq.quant.int8.smoothquant import w8a8_relative_error

log = logging.getLogger(__name__)
OUTPUT_IMAGE_INDICATOR = 2


@dataclass(frozen=True)
class FragilityRow:
    transformer: str
    module: str
    fused_module: str
    in_features: int
    out_features: int
    params: int
    extra_bytes: int
    error: float
    local_error: float
    smoothing: str
    default_protected: bool
    rank: int = 0


def extra_bytes(out_features: int, in_features: int) -> int:
    """Bytes a layer costs in bf16 beyond its int8 form (2 vs 1 byte a weight, less the fp32 scales and marker)."""
    return out_features * in_features - 4 * out_features - len(marker_bytes())


def _outputs(model: nn.Module, probes: Sequence[dict], dtype: torch.dtype) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for p in probes:
            kw = probe_inputs(p, dtype)
            y = model(**kw, return_dict=False)[0]
            outs.append(y[kw["indicator"] == OUTPUT_IMAGE_INDICATOR].double())
    return outs


def _probe_outputs(model: nn.Module, probe: Callable, token_mask: TokenMask | None) -> list[torch.Tensor]:
    """The float tensors every top-level call of `model` returns while `probe(model)` runs, padding tokens left
    out (float64)."""
    outs: list[torch.Tensor] = []
    mask: list[torch.Tensor | None] = [None]

    def pre(module, args, kwargs):
        m = None if token_mask is None else token_mask(call_arguments(model, args, kwargs))
        mask[0] = None if m is None else m.bool()

    def post(module, args, kwargs, out):
        for t in float_tensors(out):
            m = mask[0]
            keep = m is not None and tuple(t.shape[: m.dim()]) == tuple(m.shape)
            outs.append((t[m.to(t.device)] if keep else t).detach().double())

    handles = [
        model.register_forward_pre_hook(pre, with_kwargs=True),
        model.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            probe(model)
    finally:
        for h in handles:
            h.remove()
    if not outs:
        raise ConfigError(
            f"the probe ran no call of the {type(model).__name__} it was given (does it call the model?)"
        )
    return outs


def _relative_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    num = sum(float(((y - r) ** 2).sum()) for y, r in zip(outs, refs, strict=True))
    den = sum(float((r**2).sum()) for r in refs)
    return num / den if den > 0 else 0.0


def _swap(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, leaf)
    setattr(owner, leaf, module)
    return old


def measure_fragility(
    model: nn.Module,
    stats: CalibrationStats,
    transformer: str,
    config: SmoothQuantConfig | Int8W8A8Config | None = None,
    layers: Iterable[str] | None = None,
    progress: bool = True,
    *,
    probe: Callable[[nn.Module], object] | None = None,
    token_mask: TokenMask | None = default_token_mask,
) -> list[FragilityRow]:
    """One row per Linear of `model` (the float or FP8 reference), in model order, `rank` unset. Without `probe`,
    the model is run on the statistics' Ideogram 4 probes; with one, `probe(model)` runs it (module docstring)."""
    from tqdm.auto import tqdm

    config = config or SmoothQuantConfig()
    probes = stats.probes.get(transformer, [])
    if probe is None and not probes:
        raise ConfigError(
            f"the statistics hold no probes for {transformer}: recalibrate with probes_per_bucket >= 1, or pass "
            "probe= (a callable that runs the model)"
        )
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    mods = {n: m for n, m in model.named_modules() if is_linear_like(m)}
    wanted = set(mods if layers is None else layers)
    unknown = sorted(wanted - set(mods))
    if unknown:
        raise ConfigError(f"layers: {unknown[0]!r} is no Linear of the model ({len(unknown)} unknown)")
    measure_cfg = config
    ideogram = is_ideogram(model, mods)
    if isinstance(config, SmoothQuantConfig):  # unfoldable groups measured as the model would hold them
        applied = resolve_unfoldable(config.unfoldable, ideogram)
        measure_cfg = replace(config, unfoldable="explicit" if applied == "explicit" else "plain")
    base = config.base if isinstance(config, SmoothQuantConfig) else config
    explicit = config.groups if isinstance(config, SmoothQuantConfig) else None
    groups = model_groups(model, mods, explicit=explicit, stats=stats, transformer=transformer, run=probe)

    def outputs() -> list[torch.Tensor]:
        return _outputs(model, probes, dtype) if probe is None else _probe_outputs(model, probe, token_mask)

    smooth: dict[str, tuple[str, torch.Tensor | None]] = {}
    for g in groups:
        if not wanted & set(g.linears):
            continue
        d = decide_group(g, lambda n: float_weight(mods[n]), stats, transformer, measure_cfg, set())
        label = "none" if d.s is None else f"{d.mode} alpha={d.choice.alpha:g}"
        for n in g.linears:
            smooth[n] = (label, d.s)
    refs = outputs()
    rows = []
    for name in tqdm([n for n in mods if n in wanted], desc=f"fragility {transformer}", disable=not progress):
        m = mods[name]
        w = float_weight(m)
        b = None if m.bias is None else m.bias.detach().float()
        label, s = smooth[name]
        q = Int8Linear.from_float(w, b, s, base.kernel).to(w.device)
        old = _swap(model, name, q)
        try:
            err = _relative_error(outputs(), refs)
        finally:
            _swap(model, name, old)
        st = stats.get(transformer, name)
        local = w8a8_relative_error(w, st.samples.float(), s) if st.samples.shape[0] else 0.0
        n_out, n_in = w.shape
        rows.append(
            FragilityRow(
                transformer=transformer,
                module=name,
                fused_module=fused_module_name(name),
                in_features=n_in,
                out_features=n_out,
                params=n_out * n_in + (0 if b is None else n_out),
                extra_bytes=extra_bytes(n_out, n_in),
                error=err,
                local_error=local,
                smoothing=label,
                default_protected=is_protected(name, DEFAULT_PROTECT),
            )
        )
    return rows


def rank(rows: Iterable[FragilityRow]) -> list[FragilityRow]:
    """Rows sorted most fragile first, with `rank` 1..n."""
    ordered = sorted(rows, key=lambda r: (-r.error, r.transformer, r.module))
    return [FragilityRow(**{**asdict(r), "rank": i + 1}) for i, r in enumerate(ordered)]


COLUMNS = [f.name for f in fields(FragilityRow)]
COLUMNS = ["rank"] + [c for c in COLUMNS if c != "rank"]


def write_csv(rows: Iterable[FragilityRow], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            d = asdict(r)
            d["error"], d["local_error"] = f"{r.error:.6g}", f"{r.local_error:.6g}"
            w.writerow(d)
    tmp.replace(path)
    return path


def read_csv(path: str | Path) -> list[FragilityRow]:
    path = Path(path)
    types = {"in_features": int, "out_features": int, "params": int, "extra_bytes": int, "rank": int}
    types.update(error=float, local_error=float, default_protected=lambda v: v == "True")
    try:
        with open(path, newline="") as f:
            return [
                FragilityRow(**{k: types.get(k, str)(v) for k, v in row.items() if k in COLUMNS})
                for row in csv.DictReader(f)
            ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a ditq fragility table ({exc})") from None


_SIZE = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


@dataclass(frozen=True, kw_only=True)
class ProtectBudget:
    """Exactly one of: `count` layers (fused units), `extra_bytes`, or a `target_error` (sum of fragilities)."""

    count: int | None = None
    extra_bytes: int | None = None
    target_error: float | None = None

    def __post_init__(self) -> None:
        given = [f for f in ("count", "extra_bytes", "target_error") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"a protect budget needs exactly one of count, extra_bytes, target_error; got {given}"
            )
        if any(getattr(self, f) < 0 for f in given):
            raise ConfigError(f"protect budget {given[0]} must be >= 0, got {getattr(self, given[0])}")

    @classmethod
    def parse(cls, spec: str) -> ProtectBudget:
        """`17`, `count=17`, `bytes=2GB`, `bytes=150MiB` or `error=1e-3`."""
        text = spec.strip().lower()
        kind, _, value = text.rpartition("=")
        try:
            if kind in ("", "count"):
                return cls(count=int(value))
            if kind == "bytes":
                m = re.fullmatch(r"([0-9.e+]+)\s*([a-z]*)", value)
                if not m or m.group(2) not in _SIZE:
                    raise ValueError(value)
                return cls(extra_bytes=int(float(m.group(1)) * _SIZE[m.group(2)]))
            if kind == "error":
                return cls(target_error=float(value))
        except ValueError:
            pass
        raise ConfigError(f"protect budget {spec!r}: expected N, count=N, bytes=SIZE (e.g. 2GB) or error=X")


def choose_protected(
    rows: Iterable[FragilityRow], budget: ProtectBudget, always: Sequence[str] = DEFAULT_PROTECT
) -> dict[str, list[str]]:
    """{transformer: [modules to keep in bf16]} chosen most fragile first (units: fused modules)."""
    units: dict[tuple[str, str], list[FragilityRow]] = {}
    for r in rows:
        if not is_protected(r.module, always):
            units.setdefault((r.transformer, r.fused_module), []).append(r)
    order = sorted(units, key=lambda u: (-sum(r.error for r in units[u]), u))
    cost = {u: sum(r.extra_bytes for r in units[u]) for u in order}
    err = {u: sum(r.error for r in units[u]) for u in order}
    chosen: list[tuple[str, str]] = []
    if budget.count is not None:
        if budget.count > len(order):
            raise ConfigError(
                f"protect budget of {budget.count} layers is larger than the model: it has {len(order)} "
                "quantizable layers (fused qkv counts once) besides the always-protected ones"
            )
        chosen = order[: budget.count]
    elif budget.extra_bytes is not None:
        total = sum(cost.values())
        if budget.extra_bytes > total:
            raise ConfigError(
                f"protect budget of {budget.extra_bytes} extra bytes is larger than the model: keeping every "
                f"quantizable layer in bf16 adds only {total} bytes"
            )
        used = 0
        for u in order:
            if used + cost[u] <= budget.extra_bytes:
                chosen.append(u)
                used += cost[u]
    else:
        remaining = sum(err.values())
        for u in order:
            if remaining <= budget.target_error:
                break
            chosen.append(u)
            remaining -= err[u]
    out: dict[str, list[str]] = {}
    for u in chosen:
        out.setdefault(u[0], []).extend(r.module for r in units[u])
    return out
