"""GGUF-quantized Linear layers: rows of ggml blocks kept resident, dequantized per forward in torch.

A GGUF file is exposed to the module-by-module loader as tensors: a quantized weight `m.weight` appears as its raw
bytes (uint8 [rows, row_bytes]) plus a 0-d `m.gguf_qtype`; F32/F16/BF16 tensors appear as ordinary tensors. Each
forward dequantizes the weight with diffusers' torch block decoders (CPU and CUDA) and multiplies in the compute
dtype. diffusers 0.42.1 has no single-file/GGUF loading path for Ideogram 4, so ditq provides this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from ditq.errors import CheckpointError
from ditq.quant.formats.base import LinearFormat, register_format

QTYPE_SUFFIX = "gguf_qtype"
_FLOAT_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


def dequantize_rows(raw: torch.Tensor, qtype: GGMLQuantizationType, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [rows, row_bytes] -> [rows, row_len] in `dtype`, on the tensor's device.

    Decoded in float32, as ggml does: diffusers' decoders otherwise keep the dtype of the stored float16 block
    scales and do the arithmetic in float16, which lands up to ~1e-3 of a block's range away from ggml's values.
    """
    from diffusers.quantizers.gguf.utils import dequantize_functions

    block, type_size = GGML_QUANT_SIZES[qtype]
    rows = raw.shape[0]
    blocks = raw.reshape(-1, type_size)
    out = dequantize_functions[qtype](blocks, block, type_size, dtype=torch.float32)
    return out.reshape(rows, -1).to(dtype)


class GGUFLinear(nn.Module):
    """Linear layer whose weight stays in a ggml block format (Q8_0, Q2_K ... Q6_K)."""

    def __init__(
        self, raw: torch.Tensor, qtype: GGMLQuantizationType, bias: torch.Tensor | None, compute_dtype
    ):
        super().__init__()
        block, type_size = GGML_QUANT_SIZES[qtype]
        self.qtype = GGMLQuantizationType(qtype)
        self.out_features = raw.shape[0]
        self.in_features = raw.shape[1] // type_size * block
        self.register_buffer("weight", raw.contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(compute_dtype))
        self.compute_dtype = compute_dtype

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_rows(self.weight, self.qtype, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype.name}"


@register_format
class GGUFBlockFormat(LinearFormat):
    name = "gguf"
    extra_suffixes = (QTYPE_SUFFIX,)
    bits_per_weight = 4.5

    def matches(self, tensors: dict[str, torch.Tensor]) -> bool:
        return QTYPE_SUFFIX in tensors

    @staticmethod
    def qtype(tensors) -> GGMLQuantizationType:
        return GGMLQuantizationType(int(tensors[QTYPE_SUFFIX]))

    def weight_shape(self, tensors) -> tuple[int, int]:
        block, type_size = GGML_QUANT_SIZES[self.qtype(tensors)]
        raw = tensors["weight"]
        return (raw.shape[0], raw.shape[1] // type_size * block)

    def build(self, tensors, compute_dtype, **_):
        return GGUFLinear(tensors["weight"], self.qtype(tensors), tensors.get("bias"), compute_dtype)

    def dequantize(self, tensors) -> torch.Tensor:
        from ditq.gguf import dequantize

        return torch.from_numpy(dequantize(tensors["weight"].numpy(), self.qtype(tensors)))

    def slice_rows(self, suffix, tensor, part, parts):
        if suffix == QTYPE_SUFFIX:
            return tensor
        return super().slice_rows(suffix, tensor, part, parts)

    def join_rows(self, suffix, tensors):
        if suffix == QTYPE_SUFFIX:
            if any(int(t) != int(tensors[0]) for t in tensors):
                names = [GGMLQuantizationType(int(t)).name for t in tensors]
                raise CheckpointError(f"cannot join GGUF parts of different types {names} into one tensor")
            return tensors[0]
        return super().join_rows(suffix, tensors)


class GGUFSource:
    """A GGUF file seen as named tensors for `ditq.models.weights.load_into`."""

    def __init__(self, path: str | Path) -> None:
        from ditq.gguf import GGUFFile

        self.path = Path(path)
        self.file = GGUFFile(self.path)
        self.metadata = dict(self.file.metadata)
        self._names: dict[str, tuple[str, str]] = {}
        for name, info in self.file.tensors.items():
            if info.qtype in _FLOAT_TYPES:
                self._names[name] = (name, "float")
            elif info.qtype in GGML_QUANT_SIZES and len(info.shape) == 2:
                self._names[name] = (name, "raw")
                module = name.rsplit(".", 1)[0]
                self._names[f"{module}.{QTYPE_SUFFIX}"] = (name, "qtype")
            else:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} is {info.qtype.name} with shape {list(info.shape)}; "
                    "expected a float type or a 2-D block-quantized weight"
                )

    def keys(self) -> list[str]:
        return list(self._names)

    def get(self, name: str) -> torch.Tensor:
        try:
            stored, kind = self._names[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None
        info = self.file.info(stored)
        if kind == "qtype":
            return torch.tensor(int(info.qtype), dtype=torch.int32)
        if kind == "raw":
            return torch.from_numpy(np.array(self.file.raw(stored)))
        data = np.array(self.file.raw(stored)).reshape(-1)
        dtype = _FLOAT_TYPES[info.qtype]
        return torch.from_numpy(data).view(dtype).reshape(info.shape)
