"""Reading a transformer checkpoint for the streaming recipes: official fused names from any layout, and float32
blocks of whole rows (FP8 dequantized with its row scales), read with plain file reads, not a memory map, so that the
pages of a 9 GB source do not stay resident."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ditq.errors import CheckpointError, ConfigError
from ditq.formats.keys import detect_layout, fused_module_name, split_to_fused, strip_prefix
from ditq.io.safetensors_io import TensorInfo, TensorSource

_SPLIT_QKV = re.compile(r"\.attention\.to_([qkv])\.")
CHUNK_VALUES = 1 << 24  # float32 values decoded at a time (64 MiB)


def fused_sources(source: TensorSource) -> dict[str, list[str]]:
    """{official fused output name: the stored keys it is made of (q, k, v parts of a split layout)}, skipping
    the FP8 scales and ComfyUI markers that travel with weights; a source already integer-quantized is refused."""
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
    # a fused qkv is q, k, v in that order, whatever order the file lists its parts in
    return {fused: sorted(keys, key=_qkv_order) for fused, keys in out.items()}


def _qkv_order(key: str) -> int:
    m = _SPLIT_QKV.search(key)
    return "qkv".index(m.group(1)) if m else 0


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


class FusedReader:
    """Fused-name view of a component's tensors, read with plain file reads (split q/k/v are concatenated)."""

    def __init__(self, folder: Path) -> None:
        self.src = TensorSource(folder)
        self.folder = folder
        names = {strip_prefix(k): k for k in self.src.keys()}
        if detect_layout(names) == "split":
            self.keys = split_to_fused(names, row_joiner=lambda suffix, parts: tuple(parts))
        else:
            self.keys = names

    def infos(self, name: str) -> list[TensorInfo]:
        key = self.keys[name]
        return [self.src.info(k) for k in (key if isinstance(key, tuple) else (key,))]

    def dtype(self, name: str) -> torch.dtype:
        return self.infos(name)[0].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        infos = self.infos(name)
        return (sum(i.shape[0] for i in infos), *infos[0].shape[1:]) if infos[0].shape else infos[0].shape

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor under its fused name (split q/k/v parts concatenated), read with positioned reads."""
        key = self.keys[name]
        parts = [self.src.get(k) for k in (key if isinstance(key, tuple) else (key,))]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def close(self) -> None:
        self.src.close()


class StoredRows:
    """A stored Linear weight [N, K] (FP8 with row scales, or float) dequantized to float32 a block of rows at a
    time: the same arithmetic as `Fp8Linear.dequantized_weight(torch.float32)`."""

    def __init__(self, weight: torch.Tensor, row_scale: torch.Tensor | None) -> None:
        self.weight, self.row_scale = weight, row_scale
        self.shape = tuple(weight.shape)

    def rows(self, index: slice | torch.Tensor) -> torch.Tensor:
        w = self.weight[index].float()
        return w if self.row_scale is None else w * self.row_scale[index][:, None]

    def part(self, part: int, parts: int) -> StoredRows:
        step = self.shape[0] // parts
        sl = slice(part * step, (part + 1) * step)
        return StoredRows(self.weight[sl], None if self.row_scale is None else self.row_scale[sl])
