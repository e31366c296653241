"""Activation statistics of every Linear input, per timestep bucket and per transformer: what SmoothQuant, the
fragility analysis and GGUF importance matrices are computed from.

- `stats`: `ModuleStats`, `CalibrationStats` (and its safetensors file), `importance`.
- `recorder`: `CalibrationRecorder` (forward hooks), probes of complete transformer calls, `synthetic_inputs`.
- `run`: `calibrate_pipeline` over the real sampling schedule.
"""

from __future__ import annotations

from ditq.quant.calibration.recorder import (
    CalibrationRecorder,
    probe_inputs,
    synthetic_inputs,
)
from ditq.quant.calibration.run import calibrate_pipeline
from ditq.quant.calibration.stats import (
    DEFAULT_BUCKETS,
    LLM_TOKEN_INDICATOR,
    METADATA_KEY,
    PROBE_ARGS,
    QUANTILES,
    CalibrationStats,
    ModuleStats,
    captions_hash,
    fingerprint,
    importance,
    is_linear_like,
    linear_shapes,
)

__all__ = [
    "DEFAULT_BUCKETS",
    "LLM_TOKEN_INDICATOR",
    "METADATA_KEY",
    "PROBE_ARGS",
    "QUANTILES",
    "CalibrationRecorder",
    "CalibrationStats",
    "ModuleStats",
    "calibrate_pipeline",
    "captions_hash",
    "fingerprint",
    "importance",
    "is_linear_like",
    "linear_shapes",
    "probe_inputs",
    "synthetic_inputs",
]
