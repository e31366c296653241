"""How a pipeline runs, apart from what it computes: device, dtype, FP8 compute, `torch.compile`, the attention
kernel, where components live (offload policy). One frozen config, recorded with runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ditq.errors import ConfigError
from ditq.names import ATTENTION, OFFLOAD

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Variant-name suffixes that change how a variant runs, not what it is: `int8@attn8` is the `int8` folder run with
# INT8 attention, so one run compares both kernels on the same weights.
VARIANT_SUFFIXES: dict[str, dict[str, str]] = {"attn8": {"attention": "int8"}}


@dataclass(frozen=True, kw_only=True)
class ExecutionOptions:
    """`attention`: "sdpa" (PyTorch's) or "int8" (comfy-kitchen's INT8 attention, CUDA). `offload`: see
    `ditq.models.placement`. (How the text is padded changes the images in bf16, so it is a sampling setting:
    `SamplingSettings.text_padding`.)"""

    device: str = "cpu"
    dtype: str = "bf16"
    fp8_compute: str = "dequant"
    compile: bool = False
    attention: str = "sdpa"
    offload: str = "none"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"--attention {self.attention!r}: expected one of {', '.join(ATTENTION)}")
        if self.offload not in OFFLOAD:
            raise ConfigError(f"--offload {self.offload!r}: expected one of {', '.join(OFFLOAD)}")
        if self.fp8_compute not in ("dequant", "scaled_mm"):
            raise ConfigError(f"--fp8-compute {self.fp8_compute!r}: expected dequant or scaled_mm")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)


def split_variant(name: str) -> tuple[str, dict[str, str]]:
    """`int8@attn8` -> ("int8", {"attention": "int8"}): the variant's model name and its execution overrides
    (`VARIANT_SUFFIXES`; several suffixes may follow each other). A name without `@` has none."""
    base, *suffixes = name.split("@")
    overrides: dict[str, str] = {}
    for suffix in suffixes:
        if suffix not in VARIANT_SUFFIXES:
            known = ", ".join(f"@{k}" for k in VARIANT_SUFFIXES)
            raise ConfigError(f"variant {name!r}: unknown suffix @{suffix}; known: {known}")
        overrides.update(VARIANT_SUFFIXES[suffix])
    if not base:
        raise ConfigError(f"variant {name!r}: no variant name before the @suffix")
    return base, overrides


def compile_transformers(pipe) -> None:
    """`torch.compile` both transformers in place (the modules stay the pipeline's own objects)."""
    for name in ("transformer", "unconditional_transformer"):
        getattr(pipe, name).compile(fullgraph=False, dynamic=False)
