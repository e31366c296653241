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
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ditq.errors import ConfigError
from ditq.formats.int8 import KERNELS, Int8Linear
from ditq.formats.keys import fused_module_name
from ditq.quant.int8.calibrate import DEFAULT_BUCKETS, CalibrationRecorder, CalibrationStats, is_linear_like
from ditq.quant.int8.smoothquant import SEARCH_ROWS, AlphaChoice, SmoothGroup, fold_into_norm, search_alpha

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
UNFOLDABLE = ("bf16", "explicit", "plain")
STEPS = ("prepare", "convert")


@dataclass(frozen=True, kw_only=True)
class Int8W8A8Config:
    """Plain W8A8: int8 per-output-channel weights, int8 per-token dynamic activations."""

    protect: tuple[str, ...] = DEFAULT_PROTECT
    kernel: str = "auto"

    def __post_init__(self) -> None:
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
    everywhere. `unfoldable` says what happens to a smoothed group with no neighbour to fold 1/s into. The search
    measures each candidate on `search_rows` evenly spaced output rows per weight (None: all rows)."""

    base: Int8W8A8Config = field(default_factory=Int8W8A8Config)
    alpha: float | None = None
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    allow_no_smoothing: bool = True
    unfoldable: str = "bf16"
    step: str = "convert"
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    sample_tokens: int = 64
    search_rows: int | None = SEARCH_ROWS

    def __post_init__(self) -> None:
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
    if config.unfoldable == "bf16":
        return GroupDecision(group, "bf16", choice, f"{gain} but has no neighbouring weight to fold 1/s into")
    return GroupDecision(group, "none", choice, f"{gain} but cannot be folded; quantized without smoothing")


# ---------------------------------------------------------------------------------------------- quantize_

_HANDLERS: dict[type, Callable] = {}


def register_quantize_handler(config_type: type):
    def decorate(fn: Callable) -> Callable:
        _HANDLERS[config_type] = fn
        return fn

    return decorate


def quantize_(
    model: nn.Module,
    config: Int8W8A8Config | SmoothQuantConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    stats: CalibrationStats | None = None,
    transformer: str | None = None,
) -> nn.Module:
    """Quantize `model` in place with `config`; `filter_fn(module, name)` False keeps a Linear as it is.

    The recipe (α and smoothing per group, protected layers and why) is left in `model.ditq_recipe`.
    """
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(t.__name__ for t in _HANDLERS)
        raise ConfigError(f"no quantize_ handler for {type(config).__name__}; known: {known}")
    already = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    if already:
        raise ConfigError(
            f"model already has {len(already)} INT8 layer(s) (e.g. {already[0]}); quantize the float or FP8 model"
        )
    return handler(model, config, filter_fn, stats=stats, transformer=transformer)


def float_weight(module: nn.Module) -> torch.Tensor:
    """The float32 weight [N, K] of a Linear-like module."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    return module.dequantized_weight(torch.float32)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _float_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
    return lin


def _linears(model: nn.Module, filter_fn) -> tuple[dict[str, nn.Module], set[str]]:
    mods = {n: m for n, m in model.named_modules() if is_linear_like(m)}
    skipped = {n for n, m in mods.items() if filter_fn is not None and not filter_fn(m, n)}
    return mods, skipped


def apply_decisions_(
    model: nn.Module,
    decisions: list[GroupDecision],
    mods: Mapping[str, nn.Module],
    protected: set[str],
    kernel: str,
    skipped: set[str] = frozenset(),
) -> dict[str, str]:
    """Fold, smooth and quantize in place; returns {layer kept in float: reason}.

    Layers in `skipped` (refused by filter_fn) stay as they are unless a fold must change their rows.
    """
    dtype = _model_dtype(model)
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
                norm = model.get_submodule(target)
                with torch.no_grad():
                    norm.weight.copy_(fold_into_norm(norm.weight, d.s))
    kept: dict[str, str] = {}

    def reason(name: str, d: GroupDecision | None) -> str:
        return "filter_fn" if name in skipped else "protected" if name in protected else d.reason

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
            _set_module(model, name, _float_linear(w, b, dtype, device))
            kept[name] = reason(name, d)
        elif d is not None and d.mode == "explicit":
            _set_module(model, name, Int8Linear.from_float(w, b, d.s, kernel).to(device))
        else:
            if d is not None and d.mode == "folded":
                w = w * d.s[None, :].to(device)
            _set_module(model, name, Int8Linear.from_float(w, b, None, kernel).to(device))
    return kept


def recipe_dict(
    config, decisions: list[GroupDecision], kept: Mapping[str, str], stats: CalibrationStats | None
) -> dict:
    from ditq import __version__

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


@register_quantize_handler(Int8W8A8Config)
def _quantize_w8a8(model, config: Int8W8A8Config, filter_fn, *, stats=None, transformer=None):
    from ditq.quant.int8.smoothquant import smooth_groups

    mods, skipped = _linears(model, filter_fn)
    protected = protected_set(mods, config.protect) | skipped
    decisions = [
        decide_group(g, lambda n: float_weight(mods[n]), None, "", config, protected)
        for g in smooth_groups(mods)
    ]
    kept = apply_decisions_(model, decisions, mods, protected, config.kernel, skipped)
    model.ditq_recipe = recipe_dict(config, decisions, kept, None)
    return model


@register_quantize_handler(SmoothQuantConfig)
def _quantize_smoothquant(model, config: SmoothQuantConfig, filter_fn, *, stats=None, transformer=None):
    from ditq.quant.int8.smoothquant import smooth_groups

    if config.step == "prepare":
        rec = CalibrationRecorder(config.buckets, config.sample_tokens, probes_per_bucket=0)
        model._ditq_recorder = rec.attach(model, transformer or "model")
        return model
    if stats is None:
        rec = getattr(model, "_ditq_recorder", None)
        if rec is None:
            raise ConfigError(
                "SmoothQuant convert needs calibration statistics: run step='prepare' and calibration first, "
                "or pass stats="
            )
        rec.detach()
        del model._ditq_recorder
        stats = rec.result()
    transformer = _pick_transformer(stats, transformer)
    mods, skipped = _linears(model, filter_fn)
    protected = protected_set(mods, config.base.protect) | skipped
    decisions = []
    for g in smooth_groups(mods):
        decisions.append(
            decide_group(g, lambda n: float_weight(mods[n]), stats, transformer, config, protected)
        )
        log.debug("%s: %s", g.name, decisions[-1].summary())
    kept = apply_decisions_(model, decisions, mods, protected, config.base.kernel, skipped)
    model.ditq_recipe = recipe_dict(config, decisions, kept, stats)
    return model


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
