"""Activation statistics of every Linear input, per timestep bucket and per transformer: what SmoothQuant, the
fragility analysis and GGUF importance matrices are computed from.

- `stats`: `ModuleStats`, `CalibrationStats` (and its safetensors file), `importance`.
- `accumulate`: the per-input accumulators (on the device; priority-sampled tokens).
- `recorder`: `CalibrationRecorder` (forward hooks, padding masks, resumable state), probes of transformer calls.
- `run`: `calibrate_pipeline` over the real sampling schedule; `calibrate_model` for any model and probe.
- `synthetic`: `synthetic_inputs`, random Ideogram 4 transformer calls.
"""

from __future__ import annotations

from ditq.quant.calibration.recorder import (
    CalibrationRecorder,
    TokenMask,
    call_arguments,
    default_token_mask,
    probe_inputs,
)
from ditq.quant.calibration.run import calibrate_model, calibrate_pipeline
from ditq.quant.calibration.stats import (
    DEFAULT_BUCKETS,
    LLM_TOKEN_INDICATOR,
    METADATA_KEY,
    PROBE_ARGS,
    QUANTILES,
    SEQUENCE_PADDING_INDICATOR,
    CalibrationStats,
    ModuleStats,
    captions_hash,
    fingerprint,
    importance,
    is_linear_like,
    linear_shapes,
)
from ditq.quant.calibration.synthetic import synthetic_inputs

__all__ = [
    "DEFAULT_BUCKETS",
    "LLM_TOKEN_INDICATOR",
    "METADATA_KEY",
    "PROBE_ARGS",
    "QUANTILES",
    "SEQUENCE_PADDING_INDICATOR",
    "CalibrationRecorder",
    "CalibrationStats",
    "ModuleStats",
    "TokenMask",
    "calibrate_model",
    "call_arguments",
    "calibrate_pipeline",
    "captions_hash",
    "default_token_mask",
    "fingerprint",
    "importance",
    "is_linear_like",
    "linear_shapes",
    "probe_inputs",
    "synthetic_inputs",
]
