"""`quantize_(model, config, filter_fn)`: quantize a model's Linear layers in place, in any ditq format.

    quantize_(model, Int8Recipe(), stats=stats, transformer="transformer")   INT8 W8A8 + SmoothQuant
    quantize_(model, GGUFRecipe(type="q4_k"))                                GGUF Q4_K (imatrix from `stats`)
    quantize_(model, NF4Recipe())                                            bitsandbytes NF4
    quantize_(model, Int8W8A8Config()) / quantize_(model, SmoothQuantConfig(step="prepare"))   the INT8 steps

One handler is registered per config type (`register_quantize_handler`). What was done (per layer: format, or kept
in float and why) is returned by `quantization_record(model)`, not attached to the model. On an Ideogram 4
transformer, the result equals what `quantize_pipeline` writes for the same recipe.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ditq.errors import ConfigError

log = logging.getLogger(__name__)

_HANDLERS: dict[type, Callable] = {}
_RECORDS: weakref.WeakKeyDictionary[nn.Module, QuantizationRecord] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class QuantizationRecord:
    """What `quantize_` did to a model: the config, the quantized layers and the ones kept in float with why."""

    config: dict[str, Any]
    quantized: dict[str, str] = field(default_factory=dict)  # layer -> format (or GGUF type)
    kept_float: dict[str, str] = field(default_factory=dict)  # layer -> reason
    details: dict[str, Any] = field(
        default_factory=dict
    )  # format-specific (INT8: smoothing groups and alpha)


def register_quantize_handler(config_type: type):
    def decorate(fn: Callable) -> Callable:
        _HANDLERS[config_type] = fn
        return fn

    return decorate


def _load_handlers() -> None:
    import ditq.quant.handlers  # noqa: F401  (GGUF, NF4, FP8 and the INT8 recipe)
    import ditq.quant.int8.config  # noqa: F401  (Int8W8A8Config, SmoothQuantConfig)


def quantize_(
    model: nn.Module,
    config,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    stats=None,
    transformer: str | None = None,
) -> nn.Module:
    """Quantize `model` in place with `config`; `filter_fn(module, name)` False keeps a Linear as it is.

    `stats` (`CalibrationStats`) feeds SmoothQuant and GGUF importance matrices; `transformer` names its entry.
    Returns the model; `quantization_record(model)` says what was done.
    """
    from ditq.formats.base import QuantizedLinear
    from ditq.formats.fp8 import Fp8Linear

    _load_handlers()
    handler = next((_HANDLERS[t] for t in type(config).__mro__ if t in _HANDLERS), None)
    if handler is None:
        known = ", ".join(sorted(t.__name__ for t in _HANDLERS))
        raise ConfigError(f"no quantize_ handler for {type(config).__name__}; known: {known}")
    already = [
        n for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and not isinstance(m, Fp8Linear)
    ]
    if already:
        raise ConfigError(
            f"model already has {len(already)} quantized layer(s) (e.g. {already[0]}); quantize the float or FP8 model"
        )
    record = handler(model, config, filter_fn, stats=stats, transformer=transformer)
    _RECORDS[model] = record
    _warn_if_little(record, type(config).__name__)
    return model


def quantization_record(model: nn.Module) -> QuantizationRecord | None:
    """What the last `quantize_` call on `model` did, None if it was never quantized by `quantize_`."""
    return _RECORDS.get(model)


def _warn_if_little(record: QuantizationRecord, config_name: str) -> None:
    """A config that quantizes nothing, or keeps more than half of the eligible layers in float, says so."""
    eligible = {n: r for n, r in record.kept_float.items() if r != "filter_fn"}
    n_q, n_kept = len(record.quantized), len(eligible)
    if n_q == 0 and n_kept == 0:
        log.warning("%s quantized no layer: the model has no Linear layer it applies to", config_name)
    elif n_q == 0 or n_kept > n_q:
        reasons: dict[str, int] = {}
        for r in eligible.values():
            reasons[r.split(":")[0]] = reasons.get(r.split(":")[0], 0) + 1
        why = "; ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:3])
        log.warning(
            "%s quantized %d of %d eligible Linear layers and kept %d in float (%s)",
            config_name,
            n_q,
            n_q + n_kept,
            n_kept,
            why,
        )


def dense_float(module: nn.Module, dtype: torch.dtype, device) -> nn.Linear:
    """A Linear-like module as a frozen nn.Linear in `dtype` (what a file stores as a float tensor loads as)."""
    from ditq.quant.modules import float_bias, float_linear, float_weight

    return float_linear(float_weight(module), float_bias(module), dtype, device)
