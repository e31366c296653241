"""INT8 W8A8 quantization with SmoothQuant for the Ideogram 4 transformers.

- `config`: `Int8W8A8Config`, `SmoothQuantConfig` (applied with `ditq.quant.api.quantize_`).
- `calibrate`: per-timestep-bucket activation statistics of both transformers (`ditq calibrate`), `importance`.
- `smoothquant`: smoothing groups, α search, exact folding.
- `sensitivity`: per-layer fragility (`ditq sensitivity`) and protect budgets.
- `convert`: streaming conversion of one transformer checkpoint (the INT8 recipe's writer).
"""

from __future__ import annotations

from ditq.formats.int8 import Int8Linear
from ditq.formats.int8_ops import quantize_per_token, quantize_weight_per_channel
from ditq.quant.api import quantize_
from ditq.quant.int8.calibrate import CalibrationRecorder, CalibrationStats, calibrate_pipeline, importance
from ditq.quant.int8.config import DEFAULT_PROTECT, Int8W8A8Config, SmoothQuantConfig
from ditq.quant.int8.convert import ConvertReport, convert_transformer_int8
from ditq.quant.int8.sensitivity import (
    FragilityRow,
    ProtectBudget,
    choose_protected,
    measure_fragility,
    rank,
    read_csv,
    write_csv,
)

__all__ = [
    "DEFAULT_PROTECT",
    "CalibrationRecorder",
    "CalibrationStats",
    "ConvertReport",
    "FragilityRow",
    "Int8Linear",
    "Int8W8A8Config",
    "ProtectBudget",
    "SmoothQuantConfig",
    "calibrate_pipeline",
    "choose_protected",
    "convert_transformer_int8",
    "importance",
    "measure_fragility",
    "quantize_",
    "quantize_per_token",
    "quantize_weight_per_channel",
    "rank",
    "read_csv",
    "write_csv",
]
