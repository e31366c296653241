"""ditq: post-training quantization and a paired benchmark for flow-matching diffusion transformers.

The public API (imported on first use, so `import ditq` stays light):

    pipe = ditq.load_pipeline("tiny")                     # a plain diffusers Ideogram4Pipeline
    ditq.pipeline_info(pipe).variant                      # what was loaded
    stats = ditq.calibrate(pipe, captions, ...)           # activation statistics (CalibrationStats)
    ditq.quantize_pipeline("tiny", ditq.Int8Recipe(), "variants/int8", stats="stats.safetensors")
    ditq.quantize_(model, ditq.GGUFRecipe(type="q4_k"))   # any model's Linear layers, in memory
    ditq.generate(pipe, prompt, seed, settings)           # one image, paired noise
"""

from __future__ import annotations

import importlib

from ditq._version import __version__

# public name -> module that defines it
_API = {
    "load_pipeline": "ditq.models.loading",
    "pipeline_info": "ditq.models.loading",
    "PipelineInfo": "ditq.models.loading",
    "VariantRecord": "ditq.models.record",
    "SamplingSettings": "ditq.models.sampling",
    "generate": "ditq.models.sampling",
    "quantize_pipeline": "ditq.quant.writer",
    "quantize_": "ditq.quant.api",
    "quantization_record": "ditq.quant.api",
    "QuantizationRecord": "ditq.quant.api",
    "Recipe": "ditq.quant.recipes",
    "Int8Recipe": "ditq.quant.recipes",
    "GGUFRecipe": "ditq.quant.recipes",
    "NF4Recipe": "ditq.quant.recipes",
    "FP8Recipe": "ditq.quant.recipes",
    "parse_recipe": "ditq.quant.recipes",
    "recipe_from_dict": "ditq.quant.recipes",
    "recipe_names": "ditq.quant.recipes",
    "Int8W8A8Config": "ditq.quant.int8.config",
    "SmoothQuantConfig": "ditq.quant.int8.config",
    "CalibrationStats": "ditq.quant.calibration",
    "calibrate": "ditq.quant.calibration",
    "inspect_model": "ditq.quant.inspect",
}
_ALIASES = {"calibrate": "calibrate_pipeline"}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'ditq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
