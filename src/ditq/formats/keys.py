"""Key layouts of the Ideogram 4 transformer: the official fused names and diffusers' split names.

The official checkpoints (and stable-diffusion.cpp / ComfyUI files) store attention as one fused projection::

    layers.{i}.attention.qkv.<suffix>   rows [0:H) = q, [H:2H) = k, [2H:3H) = v
    layers.{i}.attention.o.<suffix>

diffusers' `Ideogram4Transformer2DModel` uses `to_q`, `to_k`, `to_v` and `to_out.0`. Every other name is the same in
both layouts. Tensors attached to a fused projection are split by rows when their first dimension is the row count
(weights, per-row scales, biases); per-module markers (e.g. ComfyUI's `comfy_quant` JSON) are copied to each part.
Formats whose row data is packed (NF4, GGUF blocks) provide their own row slicer through `row_slicer`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from ditq.errors import CheckpointError

T = TypeVar("T")

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_QKV = re.compile(r"^(layers\.\d+\.attention\.)qkv\.(.+)$")
_O = re.compile(r"^(layers\.\d+\.attention\.)o\.(.+)$")
_SPLIT_QKV = re.compile(r"^(layers\.\d+\.attention\.)to_([qkv])\.(.+)$")
_SPLIT_O = re.compile(r"^(layers\.\d+\.attention\.)to_out\.0\.(.+)$")

# (tensor, part index, number of parts) -> that part's rows
RowSlicer = Callable[[T, int, int], T]
RowJoiner = Callable[[list[T]], T]


def strip_prefix(name: str) -> str:
    """Drop a ComfyUI-style `model.diffusion_model.` prefix."""
    for prefix in COMFY_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def find_prefix(names: Iterable[str]) -> str:
    """The ComfyUI-style prefix every name carries ("" for none); refuse a file where only some names carry it.

    ComfyUI and ComfyUI-GGUF keep only the prefixed tensors of a file that has any, so a partial prefix would
    silently drop the rest.
    """
    names = list(names)
    found = {next((p for p in COMFY_PREFIXES if n.startswith(p)), "") for n in names}
    if len(found) > 1:
        bare = [n for n in names if not n.startswith(COMFY_PREFIXES)][:3]
        raise CheckpointError(
            f"only some tensor names carry a {' / '.join(sorted(found - {''}))} prefix (e.g. {', '.join(bare)} do "
            "not); expected all or none"
        )
    return found.pop() if found else ""


def add_prefix(state: Mapping[str, T], prefix: str) -> dict[str, T]:
    """The same tensors under `prefix + name` (any existing ComfyUI prefix replaced)."""
    return {prefix + strip_prefix(name): tensor for name, tensor in state.items()}


def detect_layout(names: Iterable[str]) -> str:
    """Return "fused", "split" or "neutral" (no attention keys); refuse a mix of both."""
    fused = split = False
    for raw in names:
        name = strip_prefix(raw)
        fused |= bool(_QKV.match(name) or _O.match(name))
        split |= bool(_SPLIT_QKV.match(name) or _SPLIT_O.match(name))
    if fused and split:
        raise CheckpointError(
            "checkpoint mixes fused (attention.qkv / attention.o) and split (attention.to_q/to_k/to_v/to_out.0) "
            "attention keys; expected one layout"
        )
    return "fused" if fused else "split" if split else "neutral"


def _default_slice(tensor, part: int, parts: int):
    rows = tensor.shape[0]
    if rows % parts:
        raise CheckpointError(f"fused tensor with {rows} rows cannot be split into {parts} equal parts")
    step = rows // parts
    return tensor[part * step : (part + 1) * step]


def _is_row_tensor(suffix: str, tensor) -> bool:
    """Tensors indexed by output row: weights, biases and per-row scales (not 0-d or byte markers)."""
    if suffix.endswith("comfy_quant") or getattr(tensor, "ndim", 1) == 0:
        return False
    return True


def _same(a, b) -> bool:
    """Whether two per-module tensors (markers, GGUF type tags) agree; non-tensor values (names) always do."""
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return True


def fused_to_split(
    state: Mapping[str, T],
    row_slicer: Callable[[str, T, int, int], T] | None = None,
) -> dict[str, T]:
    """Convert official fused names to diffusers split names (prefixes removed).

    `row_slicer(suffix, tensor, part, parts)` returns one part's rows; by default a plain first-dim slice.
    """
    out: dict[str, T] = {}
    for raw, tensor in state.items():
        name = strip_prefix(raw)
        if m := _QKV.match(name):
            head, suffix = m.groups()
            for i, part in enumerate("qkv"):
                if _is_row_tensor(suffix, tensor):
                    value = row_slicer(suffix, tensor, i, 3) if row_slicer else _default_slice(tensor, i, 3)
                else:
                    value = tensor
                out[f"{head}to_{part}.{suffix}"] = value
        elif m := _O.match(name):
            out[f"{m.group(1)}to_out.0.{m.group(2)}"] = tensor
        else:
            out[name] = tensor
    return out


def split_to_fused(
    state: Mapping[str, T],
    row_joiner: Callable[[str, list[T]], T] | None = None,
    prefix: str = "",
) -> dict[str, T]:
    """Convert diffusers split names to official fused names, optionally adding `prefix`.

    `row_joiner(suffix, [q, k, v])` concatenates rows; by default `torch.cat(dim=0)`.
    """
    import torch

    groups: dict[tuple[str, str], dict[str, T]] = {}
    out: dict[str, T] = {}
    for raw, tensor in state.items():
        name = strip_prefix(raw)
        if m := _SPLIT_QKV.match(name):
            head, part, suffix = m.groups()
            groups.setdefault((head, suffix), {})[part] = tensor
        elif m := _SPLIT_O.match(name):
            out[f"{prefix}{m.group(1)}o.{m.group(2)}"] = tensor
        else:
            out[prefix + name] = tensor
    for (head, suffix), parts in groups.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise CheckpointError(
                f"{head}to_{missing[0]}.{suffix} is missing: to_q, to_k and to_v are needed to build {head}qkv.{suffix}"
            )
        ordered = [parts[p] for p in "qkv"]
        if not _is_row_tensor(suffix, ordered[0]):
            if any(not _same(t, ordered[0]) for t in ordered[1:]):
                raise CheckpointError(
                    f"{head}to_q/to_k/to_v.{suffix} differ (different types or markers); they cannot share one "
                    f"{head}qkv.{suffix}"
                )
            value = ordered[0]
        elif row_joiner:
            value = row_joiner(suffix, ordered)
        else:
            value = torch.cat(ordered, dim=0)
        out[f"{prefix}{head}qkv.{suffix}"] = value
    return out


def split_module_name(fused_module: str) -> list[str]:
    """Diffusers module names for one official module name (three for a fused qkv)."""
    if m := re.match(r"^(layers\.\d+\.attention\.)qkv$", fused_module):
        return [f"{m.group(1)}to_{p}" for p in "qkv"]
    if m := re.match(r"^(layers\.\d+\.attention\.)o$", fused_module):
        return [f"{m.group(1)}to_out.0"]
    return [fused_module]


def fused_module_name(split_module: str) -> str:
    """Official module name for a diffusers module name."""
    if m := re.match(r"^(layers\.\d+\.attention\.)to_[qkv]$", split_module):
        return f"{m.group(1)}qkv"
    if m := re.match(r"^(layers\.\d+\.attention\.)to_out\.0$", split_module):
        return f"{m.group(1)}o"
    return split_module
