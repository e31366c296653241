"""INT8 W8A8 recipes as frozen configs, applied with one verb: `quantize_(model, config, filter_fn)`.

    quantize_(model, Int8W8A8Config())                                # plain W8A8 (dynamic per-token activations)
    quantize_(model, SmoothQuantConfig(step="prepare"))               # attach calibration hooks
    ...run the model on calibration inputs...
    quantize_(model, SmoothQuantConfig(alpha=None))                   # search α per group, fold, quantize
    quantize_(model, SmoothQuantConfig(), stats=CalibrationStats.load("stats.safetensors"), transformer="transformer")

Protected layers stay in float (bf16 for a bf16 model). By default these are the conditioning path, which runs
once per sample on a single token: the adaLN modulation layers of every block and of the final layer, and the
timestep-embedding MLP plus `adaln_proj` that feed them. Per-token activation quantization of a one-token GEMV
scales the whole conditioning vector by its largest entry and collapses the small entries that set each block's
scale and gate. Override with `Int8W8A8Config(protect=...)` (fnmatch patterns on diffusers or official names).
The official fused `attention.qkv` is one tensor on disk, so protecting any of to_q/to_k/to_v protects all three.
Any other model's smoothing groups come from `SmoothQuantConfig(groups=...)` or a trace (`ditq.quant.int8.groups`).
"""

from __future__ import annotations

import fnmatch
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ditq.errors import ConfigError
from ditq.formats.fused import fuse_int8_projections_
from ditq.formats.int8 import KERNELS, Int8Linear
from ditq.formats.keys import fused_module_name
from ditq.quant.api import QuantizationRecord, register_quantize_handler
from ditq.quant.calibration import DEFAULT_BUCKETS, CalibrationRecorder, CalibrationStats
from ditq.quant.int8.groups import fold_norm_, is_ideogram, model_groups, parse_groups, resolve_unfoldable
from ditq.quant.int8.smoothquant import SEARCH_ROWS, AlphaChoice, SmoothGroup, search_alpha
from ditq.quant.modules import float_linear, float_weight, linear_modules, model_dtype, set_module

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
DEFAULT_PROTECT = (
    "layers.*.adaln_modulation",
    "final_layer.adaln_modulation",
    "t_embedding.mlp_in",
    "t_embedding.mlp_out",
    "adaln_proj",
)
ALPHA_GRID = tuple(i / 10 for i in range(11))


def parse_alpha(alpha: float | str | None) -> float | None:
    """A SmoothQuant alpha as recipes take it: 'auto' (or None) searches; a number or its string is fixed."""
    if not isinstance(alpha, str):
        return alpha
    if alpha == "auto":
        return None
    try:
        return float(alpha)
    except ValueError:
        raise ConfigError(f"--alpha {alpha!r}: expected 'auto' or a number in [0, 1]") from None


UNFOLDABLE = ("auto", "bf16", "explicit", "plain")
STEPS = ("prepare", "convert")


@dataclass(frozen=True, kw_only=True)
class Int8W8A8Config:
    """Plain W8A8: int8 per-output-channel weights, int8 per-token dynamic activations."""

    protect: tuple[str, ...] = DEFAULT_PROTECT
    kernel: str = "auto"
    in_features_multiple: int = 32

    def __post_init__(self) -> None:
        if self.in_features_multiple < 1:
            raise ConfigError(f"in_features_multiple must be >= 1, got {self.in_features_multiple}")
        if isinstance(self.protect, str) or not all(isinstance(p, str) for p in self.protect):
            raise ConfigError(f"protect must be a sequence of name patterns, got {self.protect!r}")
        object.__setattr__(self, "protect", tuple(self.protect))
        if self.kernel not in KERNELS:
            raise ConfigError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig:
    """SmoothQuant around a W8A8 config. `alpha=None` searches α per group over `alpha_grid`; a number applies it
    everywhere. `unfoldable` says what happens to a smoothed group with no neighbour to fold 1/s into: "bf16" keeps
    it in float, "explicit" fuses s into activation quantization, "plain" quantizes it unsmoothed, "auto" is "bf16"
    on an Ideogram 4 transformer and "explicit" on any other model (`groups.resolve_unfoldable`). The search
    measures each candidate on `search_rows` evenly spaced output rows per weight (None: all rows). `groups`
    (SmoothGroups, {"linears", "fold": "norm:<module>" | "rows:<Linear>", "name"} mappings or lists of Linear
    names) replaces the model's own groups; Linears it leaves out are smoothed alone, unfolded."""

    base: Int8W8A8Config = field(default_factory=Int8W8A8Config)
    alpha: float | None = None
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    allow_no_smoothing: bool = True
    unfoldable: str = "auto"
    step: str = "convert"
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    sample_tokens: int = 64
    search_rows: int | None = SEARCH_ROWS
    groups: tuple[SmoothGroup, ...] | None = None

    def __post_init__(self) -> None:
        if self.groups is not None:
            object.__setattr__(self, "groups", parse_groups(self.groups, "SmoothQuantConfig.groups"))
        if not isinstance(self.base, Int8W8A8Config):
            raise ConfigError(f"base must be an Int8W8A8Config, got {type(self.base).__name__}")
        if self.alpha is not None and not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1] (or None to search), got {self.alpha}")
        grid = tuple(float(a) for a in self.alpha_grid)
        if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
            raise ConfigError(
                f"alpha_grid must be a non-empty list of values in [0, 1], got {list(self.alpha_grid)}"
            )
        object.__setattr__(self, "alpha_grid", grid)
        if self.unfoldable not in UNFOLDABLE:
            raise ConfigError(f"unfoldable must be one of {UNFOLDABLE}, got {self.unfoldable!r}")
        if self.step not in STEPS:
            raise ConfigError(f"step must be one of {STEPS}, got {self.step!r}")
        if self.sample_tokens < 1:
            raise ConfigError(f"sample_tokens must be >= 1, got {self.sample_tokens}")
        if self.search_rows is not None and self.search_rows < 1:
            raise ConfigError(f"search_rows must be >= 1 or None (all rows), got {self.search_rows}")

    def to_dict(self) -> dict:
        d = {"type": type(self).__name__, **asdict(self)}
        d["base"] = self.base.to_dict()
        return d


def is_protected(name: str, patterns: Iterable[str]) -> bool:
    names = (name, fused_module_name(name))
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def protected_set(names: Iterable[str], patterns: Iterable[str]) -> set[str]:
    """The protected modules among `names`, widened to whole fused qkv projections."""
    names = list(names)
    patterns = tuple(patterns)
    hit = {n for n in names if is_protected(n, patterns)}
    fused = {fused_module_name(n) for n in hit}
    return {n for n in names if n in hit or fused_module_name(n) in fused}


@dataclass
class GroupDecision:
    """What happens to one smoothing group: mode is none | folded | explicit | bf16 | protected."""

    group: SmoothGroup
    mode: str
    choice: AlphaChoice | None = None
    reason: str = ""

    @property
    def s(self) -> torch.Tensor | None:
        return self.choice.s if self.mode in ("folded", "explicit") and self.choice else None

    def summary(self) -> dict:
        c = self.choice
        return {
            "mode": self.mode,
            "alpha": None if c is None else c.alpha,
            "fold": None if self.mode != "folded" else f"{self.group.fold[0]}:{self.group.fold[1]}",
            "error": None if c is None else c.error,
            "plain_error": None if c is None else c.plain_error,
            "reason": self.reason,
        }


def decide_group(
    group: SmoothGroup,
    get_weight: Callable[[str], torch.Tensor],
    stats: CalibrationStats | None,
    transformer: str,
    config: SmoothQuantConfig | Int8W8A8Config,
    protected: set[str],
) -> GroupDecision:
    """Choose the smoothing of one group (weights loaded through `get_weight(name) -> fp32 [N, K]`)."""
    if all(n in protected for n in group.linears):
        return GroupDecision(group, "protected", reason="protected")
    if isinstance(config, Int8W8A8Config):
        return GroupDecision(group, "none")
    choice = search_alpha(
        [get_weight(n) for n in group.linears],
        stats.get(transformer, group.linears[0]),
        config.alpha_grid,
        config.alpha,
        config.allow_no_smoothing,
        where=group.name,
        search_rows=config.search_rows,
    )
    if choice.alpha is None:
        return GroupDecision(group, "none", choice)
    if group.fold is not None:
        return GroupDecision(group, "folded", choice)
    gain = f"smoothing (alpha={choice.alpha:g}) cuts its calibration error {choice.plain_error:.3g} -> {choice.error:.3g}"
    if config.unfoldable == "explicit":
        return GroupDecision(
            group, "explicit", choice, f"{gain}; applied as a scale fused into activation quantization"
        )
    if config.unfoldable in ("bf16", "auto"):  # "auto" left unresolved: the rule a file follows
        return GroupDecision(group, "bf16", choice, f"no neighbouring weight to fold 1/s into: {gain}")
    return GroupDecision(group, "none", choice, f"{gain} but cannot be folded; quantized without smoothing")


def apply_decisions_(
    model: nn.Module,
    decisions: list[GroupDecision],
    mods: Mapping[str, nn.Module],
    protected: set[str],
    kernel: str,
    skipped: set[str] = frozenset(),
    reasons: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Fold, smooth and quantize in place; returns {layer kept in float: reason}.

    Layers in `skipped` (refused by filter_fn) stay as they are unless a fold must change their rows.
    """
    dtype = model_dtype(model)
    col: dict[str, GroupDecision] = {}
    rows: dict[str, torch.Tensor] = {}
    for d in decisions:
        for n in d.group.linears:
            col[n] = d
        if d.mode == "folded":
            kind, target = d.group.fold
            if kind == "rows":
                rows[target] = d.s
            else:
                fold_norm_(model.get_submodule(target), d.s)  # weight (and a LayerNorm's bias) / s
    kept: dict[str, str] = {}

    def reason(name: str, d: GroupDecision | None) -> str:
        if name in skipped:
            return "filter_fn"
        if reasons and name in reasons:
            return reasons[name]
        return "protected" if name in protected else d.reason

    for name, m in mods.items():
        d = col.get(name)
        keep = name in protected or (d is not None and d.mode == "bf16")
        touched = name in rows or (d is not None and d.mode in ("folded", "explicit"))
        if not touched and (name in skipped or (keep and isinstance(m, nn.Linear))):
            kept[name] = reason(name, d)
            continue
        w = float_weight(m)
        b = None if m.bias is None else m.bias.detach().float()
        if name in rows:
            w = w / rows[name][:, None].to(w.device)
            b = None if b is None else b / rows[name].to(b.device)
        device = w.device
        if keep:
            if d is not None and d.mode == "folded":
                w = w * d.s[None, :].to(device)
            set_module(model, name, float_linear(w, b, dtype, device))
            kept[name] = reason(name, d)
        elif d is not None and d.mode == "explicit":
            set_module(model, name, Int8Linear.from_float(w, b, d.s, kernel, dtype).to(device))
        else:
            if d is not None and d.mode == "folded":
                w = w * d.s[None, :].to(device)
            set_module(model, name, Int8Linear.from_float(w, b, None, kernel, dtype).to(device))
    return kept


def recipe_dict(
    config, decisions: list[GroupDecision], kept: Mapping[str, str], stats: CalibrationStats | None
) -> dict:
    from ditq._version import __version__

    out = {
        "format": "int8",
        "version": RECIPE_VERSION,
        "config": config.to_dict(),
        "groups": {d.group.name: d.summary() for d in decisions},
        "alpha": {d.group.name: (d.choice.alpha if d.choice else None) for d in decisions},
        "kept_float": dict(sorted(kept.items())),
        "ditq_version": __version__,
    }
    if stats is not None:
        out["calibration"] = {
            k: stats.meta.get(k) for k in ("samples", "captions_sha256", "models", "settings")
        }
        out["calibration"]["buckets"] = list(stats.buckets)
    return out


def _record(config, decisions, kept, mods, stats) -> QuantizationRecord:
    quantized = {n: "int8" for n in mods if n not in kept}
    return QuantizationRecord(
        config=config.to_dict(),
        quantized=quantized,
        kept_float=dict(kept),
        details=recipe_dict(config, decisions, kept, stats),
    )


@register_quantize_handler(Int8W8A8Config)
def _quantize_w8a8(model, config: Int8W8A8Config, filter_fn, *, stats=None, transformer=None):
    from ditq.quant.int8.smoothquant import smooth_groups

    mods, skipped = linear_modules(model, filter_fn)
    protected = protected_set(mods, config.protect) | skipped | too_narrow(mods, config)
    decisions = [
        decide_group(g, lambda n: float_weight(mods[n]), None, "", config, protected)
        for g in smooth_groups(mods)
    ]
    kept = apply_decisions_(model, decisions, mods, protected, config.kernel, skipped, _reasons(mods, config))
    fuse_int8_projections_(model)
    return _record(config, decisions, kept, mods, None)


# SmoothQuant's prepare step: the recorder calibrating a model, until its convert step
_RECORDERS: weakref.WeakKeyDictionary[nn.Module, CalibrationRecorder] = weakref.WeakKeyDictionary()


@register_quantize_handler(SmoothQuantConfig)
def _quantize_smoothquant(model, config: SmoothQuantConfig, filter_fn, *, stats=None, transformer=None):
    ideogram = is_ideogram(model)
    if config.step == "prepare":
        rec = CalibrationRecorder(config.buckets, config.sample_tokens, probes_per_bucket=0)
        # another model's groups are traced on its first call, at convert
        _RECORDERS[model] = rec.attach(model, transformer or "model", capture_first_call=not ideogram)
        return QuantizationRecord(config=config.to_dict(), details={"step": "prepare"})
    run = None
    if stats is None:
        rec = _RECORDERS.pop(model, None)
        if rec is None:
            raise ConfigError(
                "SmoothQuant convert needs calibration statistics: run step='prepare' and calibration first, "
                "or pass stats="
            )
        rec.detach()
        stats = rec.result()
        first = next(iter(rec.first_calls.values()), None)
        if first is not None:
            run = lambda m: m(*first[0], **first[1])  # noqa: E731
    transformer = _pick_transformer(stats, transformer)
    mods, skipped = linear_modules(model, filter_fn)
    protected = protected_set(mods, config.base.protect) | skipped | too_narrow(mods, config.base)
    groups = model_groups(model, mods, explicit=config.groups, stats=stats, transformer=transformer, run=run)
    applied = replace(config, unfoldable=resolve_unfoldable(config.unfoldable, ideogram))
    decisions = []
    for g in groups:
        decisions.append(
            decide_group(g, lambda n: float_weight(mods[n]), stats, transformer, applied, protected)
        )
        log.debug("%s: %s", g.name, decisions[-1].summary())
    reasons = _reasons(mods, config.base)
    kept = apply_decisions_(model, decisions, mods, protected, config.base.kernel, skipped, reasons)
    fuse_int8_projections_(model)
    return _record(config, decisions, kept, mods, stats)


def too_narrow(linears: Mapping[str, object], config: Int8W8A8Config) -> set[str]:
    """Layers kept in float because their in_features is not a multiple of `config.in_features_multiple`
    (stable-diffusion.cpp reads INT8 rows as Q8_0 blocks of 32). `linears` maps names to modules or shapes."""
    m = config.in_features_multiple
    out = set()
    for name, mod in linears.items():
        k = mod[1] if isinstance(mod, tuple) else mod.in_features
        if m > 1 and k % m:
            out.add(name)
    return out


def _reasons(linears, config: Int8W8A8Config) -> dict[str, str]:
    m = config.in_features_multiple
    return {
        n: f"in_features {mod.in_features} is not a multiple of {m} (stable-diffusion.cpp Q8_0 rows)"
        for n, mod in linears.items()
        if n in too_narrow({n: mod}, config)
    }


def _pick_transformer(stats: CalibrationStats, transformer: str | None) -> str:
    if transformer is not None:
        if transformer not in stats.modules:
            raise ConfigError(
                f"statistics have no transformer {transformer!r}; have: {', '.join(stats.transformers)}"
            )
        return transformer
    if len(stats.transformers) != 1:
        raise ConfigError(
            f"statistics cover {', '.join(stats.transformers)}; pass transformer= to say which this model is"
        )
    return stats.transformers[0]
