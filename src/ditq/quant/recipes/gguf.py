"""GGUF recipes (q8_0, q6_k, q5_k, q4_k, q4_k_m, q3_k, q2_k, ...): one `.gguf` file per transformer, streamed.

Which tensors are quantized, and as what, is `ditq.formats.gguf.tensor_type`: stable-diffusion.cpp's Ideogram 4
rule (the weights of `layers.*.adaln_modulation`, `attention.qkv`, `attention.o`, `feed_forward.*`), Q8_0 then BF16
where a row is not whole blocks, F32 for 1-D and small tensors, BF16 for everything else; the `_m` mixes move qkv
and w2 one level up, like llama.cpp's Q4_K_M. Names are the official fused names with no prefix
(stable-diffusion.cpp detects Ideogram 4 by `embed_image_indicator.weight`; ComfyUI-GGUF reads
`general.architecture` = `ideogram`).

The source is read a block of rows at a time with plain file reads (no memory map, whose pages would stay
resident) and each tensor is encoded and appended before the next is read, so peak memory is one tensor's encoding
plus one 64 MiB float32 block.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from ditq._version import __version__
from ditq.errors import CheckpointError, ConfigError
from ditq.formats.gguf import tensor_type
from ditq.gguf.codec import DEFAULT_RULE, resolve_rule
from ditq.io.safetensors_io import TensorSource
from ditq.quant.recipes.base import ConvertContext, Recipe, register_name
from ditq.quant.recipes.source import float_rows, fused_sources, read_float

log = logging.getLogger(__name__)

ARCHITECTURE = "ideogram"
GGUF_NAME = "diffusion_pytorch_model.gguf"
# type name -> (ggml type, llama.cpp file type plain, file type of the _m mix or None where no mix is offered)
GGUF_TYPES = {
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0, None),
    "q6_k": (Q.Q6_K, LlamaFileType.MOSTLY_Q6_K, None),
    "q5_k": (Q.Q5_K, LlamaFileType.MOSTLY_Q5_K_S, LlamaFileType.MOSTLY_Q5_K_M),
    "q4_k": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_S, LlamaFileType.MOSTLY_Q4_K_M),
    "q3_k": (Q.Q3_K, LlamaFileType.MOSTLY_Q3_K_S, LlamaFileType.MOSTLY_Q3_K_M),
    "q2_k": (Q.Q2_K, LlamaFileType.MOSTLY_Q2_K, None),
}
TENSOR_RULES = ("auto", "sdcpp", "all")


@dataclass(frozen=True, kw_only=True)
class GGUFRecipe(Recipe):
    """One transformer as GGUF blocks of `type` (`q4_k`, ...); `mix` makes the `_m` variant.

    `tensors` says which weights are quantized: `sdcpp` is stable-diffusion.cpp's Ideogram 4 rule, `all` every 2-D
    weight, `auto` the former on an Ideogram 4 transformer and the latter on any other model (in memory). With
    calibration statistics the k-quants use their activation energy as llama.cpp's importance matrix.
    """

    kind: ClassVar[str] = "gguf"
    format: ClassVar[str] = "gguf"

    type: str = "q4_k"
    mix: bool = False
    tensors: str = "auto"
    use_imatrix: bool = True
    rule: str = DEFAULT_RULE  # llama.cpp's make_qkx3_quants rule (Q2_K/Q4_K/Q5_K with an importance matrix)

    def __post_init__(self) -> None:
        if self.type not in GGUF_TYPES:
            raise ConfigError(f"GGUF type {self.type!r}: unknown; known: {', '.join(GGUF_TYPES)}")
        if self.mix and GGUF_TYPES[self.type][2] is None:
            raise ConfigError(f"GGUF type {self.type!r} has no _m mix; mixes: q5_k, q4_k, q3_k")
        resolve_rule(self.rule)
        if self.tensors not in TENSOR_RULES:
            raise ConfigError(
                f"GGUF tensors rule {self.tensors!r}: expected one of {', '.join(TENSOR_RULES)}"
            )

    @property
    def name(self) -> str:
        return f"{self.type}_m" if self.mix else self.type

    @property
    def base(self) -> Q:
        return GGUF_TYPES[self.type][0]

    @property
    def file_type(self) -> LlamaFileType:
        plain, mixed = GGUF_TYPES[self.type][1:]
        return mixed if self.mix else plain

    @property
    def uses_stats(self) -> bool:
        return self.use_imatrix and self.base != Q.Q8_0

    def tensor_type(self, name: str, shape: tuple[int, ...], ideogram: bool = True) -> tuple[Q, str]:
        """The type of one tensor (official fused name): see `ditq.formats.gguf.tensor_type`."""
        quantize_all = self.tensors == "all" or (self.tensors == "auto" and not ideogram)
        return tensor_type(name, shape, self.base, mix=self.mix, quantize_all=quantize_all)

    def convert(self, src: Path, dst: Path, ctx: ConvertContext) -> dict:
        imatrix = None
        if ctx.stats is not None and self.uses_stats:
            from ditq.quant.calibration import importance

            def imatrix(module: str, _t=ctx.component):
                return importance(ctx.stats, _t, module)

        return write_transformer_gguf(src, dst / GGUF_NAME, self, imatrix, ctx.threads, ctx.progress)


for _type, (_q, _plain, _mixed) in GGUF_TYPES.items():
    register_name(_type, lambda _t=_type, **options: GGUFRecipe(type=_t, **options))
    if _mixed is not None:
        register_name(f"{_type}_m", lambda _t=_type, **options: GGUFRecipe(type=_t, mix=True, **options))


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    qtype: Q
    sources: list[str] = field(default_factory=list)
    note: str = ""


def plan_tensors(source: TensorSource, recipe: GGUFRecipe) -> list[TensorPlan]:
    """Output tensors (official fused names) from a source in fused or split layout, FP8 or float."""
    plans = {name: TensorPlan(name, (), Q.F32, keys) for name, keys in fused_sources(source).items()}
    for plan in plans.values():
        shapes = [source.info(s).shape for s in plan.sources]
        rows = sum(s[0] for s in shapes) if len(shapes) > 1 else shapes[0][0] if shapes[0] else 0
        plan.shape = (rows, *shapes[0][1:]) if len(shapes) > 1 else tuple(shapes[0])
        plan.qtype, plan.note = recipe.tensor_type(plan.name, plan.shape)
    return list(plans.values())


def encode_rows(
    source: TensorSource,
    keys: list[str],
    shape: tuple[int, ...],
    qtype: Q,
    imatrix: np.ndarray | None = None,
    threads: int | None = None,
    rule: str = DEFAULT_RULE,
) -> np.ndarray:
    """The tensors `keys` stacked along dim 0 (logical `shape`) encoded as `qtype`: uint8 (rows, row_bytes),
    encoded a block of rows at a time so that only the output and one float32 block are in memory."""
    from ditq.gguf import quantize, row_bytes

    if len(shape) <= 1:  # one row; parts of a split 1-D tensor join along it
        x = np.concatenate([read_float(source, k).reshape(-1) for k in keys]).reshape(1, -1)
        return quantize(x, qtype, imatrix, threads=threads, rule=rule)
    rows = math.prod(shape[:-1])
    out = np.empty((rows, row_bytes(qtype, shape[-1])), dtype=np.uint8)
    r = 0
    for key in keys:
        for x in float_rows(source, key):
            out[r : r + len(x)] = quantize(x, qtype, imatrix, threads=threads, rule=rule)
            r += len(x)
    if r != rows:
        raise CheckpointError(f"{source.path}: {keys} hold {r} rows, expected {rows} for shape {list(shape)}")
    return out


def write_transformer_gguf(
    src: Path,
    dst: Path,
    recipe: GGUFRecipe,
    imatrix: Callable[[str], np.ndarray | None] | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Convert one transformer component folder to `dst` (a .gguf path); returns a summary."""
    from tqdm import tqdm

    from ditq.gguf import GGUFStreamWriter, TensorSpec

    source = TensorSource(src)
    plans = plan_tensors(source, recipe)
    for p in plans:
        if p.note:
            log.warning("%s: %s -> %s (%s)", dst.name, p.name, p.qtype.name, p.note)
    counts: dict[str, int] = {}
    for p in plans:
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
    metadata = {
        "general.architecture": ARCHITECTURE,
        "general.name": "Ideogram 4 transformer",
        "general.file_type": np.uint32(int(recipe.file_type)),
        "general.quantization_version": np.uint32(2),
        "ditq.version": __version__,
        "ditq.recipe": json.dumps({**recipe.to_dict(), "tensor_types": counts}),
    }
    specs = [TensorSpec(p.name, p.shape or (1,), p.qtype) for p in plans]
    start = time.perf_counter()
    in_bytes = 0
    with GGUFStreamWriter(dst, specs, metadata, rule=recipe.rule) as writer:
        for p in tqdm(plans, desc=f"{src.name} -> {recipe.name}", unit="tensor", disable=not progress):
            imat = None
            if imatrix is not None and recipe.use_imatrix and p.qtype not in (Q.F32, Q.BF16, Q.F16, Q.Q8_0):
                imat = imatrix(p.name.rsplit(".", 1)[0])
            shape = p.shape or (1,)
            writer.write_raw(p.name, encode_rows(source, p.sources, shape, p.qtype, imat, threads, recipe.rule))
            in_bytes += 4 * math.prod(shape)
    return {
        "file": str(dst),
        "bytes": dst.stat().st_size,
        "tensor_types": counts,
        "seconds": time.perf_counter() - start,
        "input_mb_per_s": in_bytes / 1e6 / max(time.perf_counter() - start, 1e-9),
    }
