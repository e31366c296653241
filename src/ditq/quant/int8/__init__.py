"""INT8 W8A8 quantization with SmoothQuant for the Ideogram 4 transformers.

- `config`: `Int8W8A8Config`, `SmoothQuantConfig` (applied with `ditq.quant.api.quantize_`), the per-group
  smoothing decisions and the protected set.
- `smoothquant`: Ideogram 4's smoothing groups, alpha search, exact folding.
- `groups`, `groupspec`: any model's smoothing groups (traced from one call, folds checked exactly; or given
  explicitly with `SmoothQuantConfig(groups=...)`).
- `sensitivity`: per-layer fragility (`ditq sensitivity`) and protect budgets.
- `convert`: streaming conversion of one transformer checkpoint (the INT8 recipe's writer).
The layer itself is `ditq.formats.int8.Int8Linear`; the statistics are `ditq.quant.calibration`'s.
"""

from __future__ import annotations

from ditq.quant.int8.config import DEFAULT_PROTECT, Int8W8A8Config, SmoothQuantConfig
from ditq.quant.int8.convert import ConvertReport, convert_transformer_int8
from ditq.quant.int8.groups import GroupTrace, discover_groups, trace_groups
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
    "ConvertReport",
    "FragilityRow",
    "GroupTrace",
    "Int8W8A8Config",
    "ProtectBudget",
    "SmoothQuantConfig",
    "choose_protected",
    "convert_transformer_int8",
    "discover_groups",
    "measure_fragility",
    "rank",
    "read_csv",
    "trace_groups",
    "write_csv",
]
