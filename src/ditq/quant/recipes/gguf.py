"""GGUF recipes (q8_0, q6_k, q5_k, q4_k, q4_k_m, q3_k, q2_k): one `.gguf` file per transformer, streamed.

Which tensors are quantized follows stable-diffusion.cpp's Ideogram 4 conversion rule: the weights of
`layers.*.adaln_modulation`, `layers.*.attention.qkv`, `layers.*.attention.o` and `layers.*.feed_forward.*`. A row
length that is not a multiple of the type's block size falls back to Q8_0 (32-element blocks), then BF16, and is
logged. Every other tensor keeps full precision: 1-D tensors and tensors of at most 1024 elements as F32 (what
ComfyUI-GGUF expects), other weights (embedders, input/text/final projections) as BF16. The `_m` mixes move the
fused qkv projection (it holds v) and the feed-forward down projection (w2) one level higher, like llama.cpp's
Q4_K_M. Names are the official fused names with no prefix (stable-diffusion.cpp detects Ideogram 4 by
`embed_image_indicator.weight`; ComfyUI-GGUF reads `general.architecture` = `ideogram`).

The source is read a block of rows at a time with plain file reads (no memory map, whose pages would stay
resident) and each tensor is encoded and appended before the next is read, so peak memory is one tensor's encoding
plus one 64 MiB float32 block.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from ditq import __version__
from ditq.errors import CheckpointError, ConfigError
from ditq.formats.keys import fused_module_name, strip_prefix
from ditq.io.safetensors_io import TensorSource

log = logging.getLogger(__name__)

ARCHITECTURE = "ideogram"
GGUF_NAME = "diffusion_pytorch_model.gguf"
QUANTIZED = re.compile(
    r"^layers\.\d+\.(adaln_modulation|attention\.qkv|attention\.o|feed_forward\.w[123])\.weight$"
)
MIX_UP = re.compile(r"^layers\.\d+\.(attention\.qkv|feed_forward\.w2)\.weight$")
LEVEL_UP = {Q.Q2_K: Q.Q3_K, Q.Q3_K: Q.Q4_K, Q.Q4_K: Q.Q5_K, Q.Q5_K: Q.Q6_K, Q.Q6_K: Q.Q8_0, Q.Q8_0: Q.Q8_0}
# recipe name -> (base type, mix, llama.cpp file type)
GGUF_RECIPES = {
    "q8_0": (Q.Q8_0, False, LlamaFileType.MOSTLY_Q8_0),
    "q6_k": (Q.Q6_K, False, LlamaFileType.MOSTLY_Q6_K),
    "q5_k": (Q.Q5_K, False, LlamaFileType.MOSTLY_Q5_K_S),
    "q5_k_m": (Q.Q5_K, True, LlamaFileType.MOSTLY_Q5_K_M),
    "q4_k": (Q.Q4_K, False, LlamaFileType.MOSTLY_Q4_K_S),
    "q4_k_m": (Q.Q4_K, True, LlamaFileType.MOSTLY_Q4_K_M),
    "q3_k": (Q.Q3_K, False, LlamaFileType.MOSTLY_Q3_K_S),
    "q3_k_m": (Q.Q3_K, True, LlamaFileType.MOSTLY_Q3_K_M),
    "q2_k": (Q.Q2_K, False, LlamaFileType.MOSTLY_Q2_K),
}
CHUNK_VALUES = 1 << 24  # float32 values decoded and encoded at a time (64 MiB)
BLOCK = {Q.Q8_0: 32, Q.Q2_K: 256, Q.Q3_K: 256, Q.Q4_K: 256, Q.Q5_K: 256, Q.Q6_K: 256}


@dataclass(frozen=True, kw_only=True)
class GGUFRecipe:
    """How to write one transformer as GGUF."""

    name: str = "q4_k"
    quantize_all: bool = (
        False  # also quantize 2-D weights outside sd.cpp's rule (input/text/final projections)
    )
    use_imatrix: bool = True  # when calibration statistics are given
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.name not in GGUF_RECIPES:
            raise ConfigError(f"recipe {self.name!r}: unknown GGUF recipe; known: {', '.join(GGUF_RECIPES)}")

    @property
    def base(self) -> Q:
        return GGUF_RECIPES[self.name][0]

    @property
    def file_type(self) -> LlamaFileType:
        return GGUF_RECIPES[self.name][2]


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    qtype: Q
    sources: list[str] = field(default_factory=list)
    note: str = ""


def storage_type(name: str, shape: tuple[int, ...], recipe: GGUFRecipe) -> tuple[Q, str]:
    """The GGUF type of one tensor (official fused name) under `recipe`, and a note when it fell back."""
    numel = int(np.prod(shape)) if shape else 1
    if len(shape) <= 1 or numel <= 1024:
        return Q.F32, ""
    wanted = None
    if QUANTIZED.match(name) or (recipe.quantize_all and len(shape) == 2 and name.endswith(".weight")):
        wanted = recipe.base
        if GGUF_RECIPES[recipe.name][1] and MIX_UP.match(name):
            wanted = LEVEL_UP[wanted]
    if wanted is None:
        return Q.BF16, ""
    for qtype in (wanted, Q.Q8_0):
        if shape[-1] % BLOCK[qtype] == 0:
            note = "" if qtype == wanted else f"row length {shape[-1]} is not a multiple of {BLOCK[wanted]}"
            return qtype, note
    return Q.BF16, f"row length {shape[-1]} is not a multiple of 32"


def fused_sources(source: TensorSource) -> dict[str, list[str]]:
    """{official fused output name: the stored keys it is made of (q, k, v parts of a split layout)}, skipping
    the FP8 scales and ComfyUI markers that travel with weights; a source already integer-quantized is refused."""
    from ditq.formats.keys import detect_layout

    names = [strip_prefix(k) for k in source.keys()]
    raw = dict(zip(names, source.keys(), strict=True))
    layout = detect_layout(names)
    out: dict[str, list[str]] = {}
    for name in names:
        if name.endswith((".weight_scale", ".scale_weight", ".comfy_quant", ".input_scale")):
            continue
        if source.info(raw[name]).dtype in (torch.int8, torch.uint8) and name.endswith(".weight"):
            raise ConfigError(
                f"{source.path}: {name} is already integer-quantized; convert from the FP8 or bf16 reference"
            )
        fused = name
        if layout == "split":
            module, _, leaf = name.rpartition(".")
            fused = f"{fused_module_name(module)}.{leaf}"
        out.setdefault(fused, []).append(raw[name])
    return out


def plan_tensors(source: TensorSource, recipe: GGUFRecipe) -> list[TensorPlan]:
    """Output tensors (official fused names) from a source in fused or split layout, FP8 or float."""
    plans = {name: TensorPlan(name, (), Q.F32, keys) for name, keys in fused_sources(source).items()}
    for plan in plans.values():
        shapes = [source.info(s).shape for s in plan.sources]
        rows = sum(s[0] for s in shapes) if len(shapes) > 1 else shapes[0][0] if shapes[0] else 0
        plan.shape = (rows, *shapes[0][1:]) if len(shapes) > 1 else tuple(shapes[0])
        plan.qtype, plan.note = storage_type(plan.name, plan.shape, recipe)
    return list(plans.values())


def float_rows(source: TensorSource, key: str, max_values: int = CHUNK_VALUES) -> Iterator[np.ndarray]:
    """float32 blocks of whole rows (rows, row_len) of one stored tensor, in order, FP8 dequantized with its per-row
    scale; row_len is the last dimension (a 1-D tensor is one row). Peak memory is one block, whatever the tensor.
    Raises CheckpointError naming the tensor on NaN or Inf."""
    info = source.info(key)
    shape = info.shape or (1,)
    row_len = shape[-1]
    rows = math.prod(shape[:-1])
    scale = None
    if info.dtype == torch.float8_e4m3fn:
        module = key[: -len(".weight")]
        for s in ("weight_scale", "scale_weight"):
            if f"{module}.{s}" in source:
                scale = source.get(f"{module}.{s}").float().reshape(-1)
                break
        else:
            raise CheckpointError(f"{source.path}: {key} is float8 without a weight_scale")
        if len(shape) != 2 or scale.numel() != rows:
            raise CheckpointError(
                f"{source.path}: {key} {list(shape)} has {scale.numel()} row scales, expected {rows}"
            )
    elif not info.dtype.is_floating_point:
        raise CheckpointError(f"{source.path}: {key} is {info.dtype}; expected a float or FP8 tensor")
    size = torch.empty((), dtype=info.dtype).element_size()
    step = max(1, max_values // max(row_len, 1))
    for r in range(0, rows, step):
        n = min(step, rows - r)
        raw = source.read_bytes(key, r * row_len * size, n * row_len * size)
        x = torch.frombuffer(raw, dtype=torch.uint8).view(info.dtype).reshape(n, row_len).float()
        if scale is not None:
            x.mul_(scale[r : r + n, None])
        x = x.numpy()
        if not np.isfinite(x).all():  # numpy's check is ~10x faster than torch's here
            row, col = np.argwhere(~np.isfinite(x))[0].tolist()
            raise CheckpointError(
                f"{source.path}: {key} holds a non-finite value (NaN or Inf) at row {r + row}, column {col}; "
                "refusing to quantize it"
            )
        yield x


def read_float(source: TensorSource, key: str) -> np.ndarray:
    """A whole tensor as float32 in its stored shape (see `float_rows`)."""
    parts = list(float_rows(source, key))
    shape = source.info(key).shape or (1,)
    return (parts[0] if len(parts) == 1 else np.concatenate(parts)).reshape(shape)


def encode_rows(
    source: TensorSource,
    keys: list[str],
    shape: tuple[int, ...],
    qtype: Q,
    imatrix: np.ndarray | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """The tensors `keys` stacked along dim 0 (logical `shape`) encoded as `qtype`: uint8 (rows, row_bytes),
    encoded a block of rows at a time so that only the output and one float32 block are in memory."""
    from ditq.gguf import quantize, row_bytes

    if len(shape) <= 1:  # one row; parts of a split 1-D tensor join along it
        x = np.concatenate([read_float(source, k).reshape(-1) for k in keys]).reshape(1, -1)
        return quantize(x, qtype, imatrix, threads=threads)
    rows = math.prod(shape[:-1])
    out = np.empty((rows, row_bytes(qtype, shape[-1])), dtype=np.uint8)
    r = 0
    for key in keys:
        for x in float_rows(source, key):
            out[r : r + len(x)] = quantize(x, qtype, imatrix, threads=threads)
            r += len(x)
    if r != rows:
        raise CheckpointError(f"{source.path}: {keys} hold {r} rows, expected {rows} for shape {list(shape)}")
    return out


def write_transformer_gguf(
    src: Path,
    dst: Path,
    recipe: GGUFRecipe,
    imatrix: Callable[[str], np.ndarray | None] | None = None,
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
        "ditq.recipe": json.dumps({**asdict(recipe), "format": "gguf", "tensor_types": counts}),
    }
    specs = [TensorSpec(p.name, p.shape or (1,), p.qtype) for p in plans]
    start = time.perf_counter()
    in_bytes = 0
    with GGUFStreamWriter(dst, specs, metadata) as writer:
        for p in tqdm(plans, desc=f"{src.name} -> {recipe.name}", unit="tensor", disable=not progress):
            imat = None
            if imatrix is not None and recipe.use_imatrix and p.qtype not in (Q.F32, Q.BF16, Q.F16, Q.Q8_0):
                imat = imatrix(p.name.rsplit(".", 1)[0])
            shape = p.shape or (1,)
            writer.write_raw(p.name, encode_rows(source, p.sources, shape, p.qtype, imat, recipe.threads))
            in_bytes += 4 * math.prod(shape)
    return {
        "file": str(dst),
        "bytes": dst.stat().st_size,
        "tensor_types": counts,
        "seconds": time.perf_counter() - start,
        "input_mb_per_s": in_bytes / 1e6 / max(time.perf_counter() - start, 1e-9),
    }
