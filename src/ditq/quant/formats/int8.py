"""INT8 W8A8 weights in ComfyUI's `comfy_quant` layout (format `int8_tensorwise`, no rotation).

Per quantized Linear `m` (official fused names: `layers.{i}.attention.qkv`, `attention.o`, ...)::

    m.weight        I8   [N, K]   round(W / weight_scale), symmetric, in [-127, 127]
    m.weight_scale  F32  [N, 1]   one scale per output row: row absmax / 127
    m.comfy_quant   U8   [L]      UTF-8 JSON {"format": "int8_tensorwise"}
    m.bias          BF16 [N]      when the layer has one

ComfyUI (`comfy/ops.py`, mixed-precision ops) reads `comfy_quant` per layer and treats a `[N, 1]` scale as per-row;
stable-diffusion.cpp reads the same layers from the file-level metadata key `_quantization_metadata`
(`{"format_version": "1.0", "layers": {m: {"format": "int8_tensorwise"}}}`), which ComfyUI also understands; ditq
writes both. Activations are quantized per token at run time (no `input_scale`). ditq also reads a scalar
(tensor-wise) scale and a flat `[N]` scale. ConvRot files (`"convrot": true`, `"convrot_groupsize": G`) store the
weight in a block-Hadamard-rotated basis; they run as ComfyUI runs them, rotating each token's input first
(`ditq.interop.convrot`).
"""

from __future__ import annotations

import json

import torch
from torch import nn

from ditq.errors import CheckpointError
from ditq.quant.formats.base import LinearFormat, register_format

COMFY_FORMAT = "int8_tensorwise"
MARKER = {"format": COMFY_FORMAT}
QUANT_METADATA_KEY = "_quantization_metadata"


def marker_bytes(marker: dict | None = None) -> bytes:
    """The `comfy_quant` payload, serialized as ComfyUI itself does (`json.dumps` defaults)."""
    return json.dumps(marker or MARKER).encode("utf-8")


def marker_tensor(marker: dict | None = None) -> torch.Tensor:
    return torch.tensor(list(marker_bytes(marker)), dtype=torch.uint8)


def parse_marker(tensor: torch.Tensor, where: str = "comfy_quant") -> dict:
    try:
        conf = json.loads(bytes(tensor.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: not a UTF-8 JSON marker ({exc})") from None
    if not isinstance(conf, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(conf).__name__}")
    return conf


def quantization_metadata(layers: list[str]) -> str:
    """The file-level `_quantization_metadata` JSON for these (fused) module names."""
    return json.dumps({"format_version": "1.0", "layers": {name: dict(MARKER) for name in layers}})


def _check_marker(tensors: dict[str, torch.Tensor]) -> int | None:
    """The ConvRot group size the marker declares (ComfyUI reads it flat or under "params"), None if unrotated."""
    if "comfy_quant" not in tensors:
        return None
    conf = parse_marker(tensors["comfy_quant"])
    fmt = conf.get("format")
    if fmt != COMFY_FORMAT:
        raise CheckpointError(f"comfy_quant format is {fmt!r}; the int8 reader handles {COMFY_FORMAT!r} only")
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    if not conf.get("convrot", params.get("convrot", False)):
        return None
    size = conf.get("convrot_groupsize", params.get("convrot_groupsize", 256))
    if not isinstance(size, int) or isinstance(size, bool):
        raise CheckpointError(f"comfy_quant convrot_groupsize is {size!r}; expected an integer power of 4")
    return size


@register_format
class Int8TensorwiseFormat(LinearFormat):
    name = "int8"
    extra_suffixes = ("weight_scale", "comfy_quant")
    bits_per_weight = 8.0

    def matches(self, tensors: dict[str, torch.Tensor]) -> bool:
        w = tensors.get("weight")
        return w is not None and w.dtype == torch.int8 and "weight_scale" in tensors

    @staticmethod
    def _row_scale(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        w, scale = tensors["weight"], tensors["weight_scale"].float()
        rows = w.shape[0]
        if scale.numel() == 1:
            return scale.reshape(1).expand(rows).contiguous()
        if scale.numel() != rows or (scale.ndim == 2 and scale.shape[1] != 1) or scale.ndim > 2:
            raise CheckpointError(
                f"int8 weight_scale has shape {list(scale.shape)}; expected [{rows}, 1], [{rows}] or a scalar"
            )
        return scale.reshape(rows)

    def build(
        self, tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype, kernel: str = "auto"
    ) -> nn.Module:
        from ditq.quant.int8.linear import Int8Linear

        group = _check_marker(tensors)
        if group is None:
            return Int8Linear(tensors["weight"], self._row_scale(tensors), tensors.get("bias"), kernel=kernel)
        from ditq.interop.convrot import ConvRotInt8Linear

        return ConvRotInt8Linear(
            tensors["weight"], self._row_scale(tensors), tensors.get("bias"), group, kernel
        )

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        group = _check_marker(tensors)
        w = tensors["weight"].float() * self._row_scale(tensors)[:, None]
        if group is None:
            return w
        from ditq.interop.convrot import rotate

        return rotate(w, group)

    def slice_rows(self, suffix: str, tensor: torch.Tensor, part: int, parts: int) -> torch.Tensor:
        if suffix == "comfy_quant" or tensor.numel() == 1:
            return tensor
        return super().slice_rows(suffix, tensor, part, parts)

    def join_rows(self, suffix: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if suffix == "comfy_quant":
            return tensors[0]
        if all(t.ndim == 0 for t in tensors):
            if any(not torch.equal(t, tensors[0]) for t in tensors):
                raise CheckpointError(
                    "cannot join int8 parts with different tensor-wise scales into one tensor"
                )
            return tensors[0]
        return torch.cat(tensors, dim=0)
