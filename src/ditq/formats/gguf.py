"""GGUF-quantized Linear layers: rows of ggml blocks kept resident, dequantized per forward in torch.

A GGUF file is exposed to the module-by-module loader as tensors: a quantized weight `m.weight` appears as its raw
bytes (uint8 [rows, row_bytes]) plus a 0-d `m.gguf_qtype`; F32/F16/BF16 tensors appear as ordinary tensors. Each
forward dequantizes the weight with ditq's torch block decoders (CPU and CUDA, bit-exact with ggml) and multiplies
in the compute dtype. diffusers 0.42.1 has no single-file/GGUF loading path for Ideogram 4, so ditq provides this module.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import GGMLQuantizationType as Q

from ditq.errors import CheckpointError
from ditq.formats.base import LinearFormat, QuantizedLinear, register_format

QTYPE_SUFFIX = "gguf_qtype"
_FLOAT_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


def dequantize_rows(raw: torch.Tensor, qtype: GGMLQuantizationType, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [rows, row_bytes] -> [rows, row_len] in `dtype`, on the tensor's device.

    Decoded in float32 in ggml's order of operations (`ditq.formats.gguf_torch`), so the weights equal gguf-py's
    bit for bit, then cast; no constant is copied from the host per call.
    """
    from ditq.formats.gguf_torch import decode_blocks

    block, type_size = GGML_QUANT_SIZES[qtype]
    rows = raw.shape[0]
    out = decode_blocks(raw.reshape(-1, type_size), qtype, block, type_size)
    return out.reshape(rows, -1).to(dtype)


# stable-diffusion.cpp's Ideogram 4 conversion rule: the weights it quantizes (official fused names)
QUANTIZED = re.compile(
    r"^layers\.\d+\.(adaln_modulation|attention\.qkv|attention\.o|feed_forward\.w[123])\.weight$"
)
# the `_m` mixes move these one level up (the fused qkv holds v; w2 is the feed-forward down projection)
MIX_UP = re.compile(r"^layers\.\d+\.(attention\.qkv|feed_forward\.w2)\.weight$")
LEVEL_UP = {
    Q.Q2_K: Q.Q3_K,
    Q.Q3_K: Q.Q4_K,
    Q.Q4_K: Q.Q5_K,
    Q.Q5_K: Q.Q6_K,
    Q.Q6_K: Q.Q8_0,
    Q.Q8_0: Q.Q8_0,
}
BLOCK = {Q.Q8_0: 32, Q.Q2_K: 256, Q.Q3_K: 256, Q.Q4_K: 256, Q.Q5_K: 256, Q.Q6_K: 256}
SMALL_TENSOR = 1024  # ComfyUI-GGUF keeps 1-D tensors and tensors of at most this many elements in F32


def tensor_type(
    name: str, shape: tuple[int, ...], base: Q, *, mix: bool = False, quantize_all: bool = False
) -> tuple[Q, str]:
    """The GGUF type of one tensor (official fused name) and a note when it fell back: the one rule that the GGUF
    writer, `ditq inspect` and `ditq plan` share.

    1-D and small tensors are F32; the weights of sd.cpp's rule (all 2-D weights with `quantize_all`) get `base`
    (one level up under `mix` for qkv and w2), falling back to Q8_0 when the row length is not a multiple of the
    type's block and to BF16 when not even of 32; every other tensor is BF16.
    """
    numel = math.prod(shape) if shape else 1
    if len(shape) <= 1 or numel <= SMALL_TENSOR:
        return Q.F32, ""
    if not (QUANTIZED.match(name) or (quantize_all and len(shape) == 2 and name.endswith(".weight"))):
        return Q.BF16, ""
    wanted = LEVEL_UP[base] if mix and MIX_UP.match(name) else base
    for qtype in (wanted, Q.Q8_0):
        if shape[-1] % BLOCK[qtype] == 0:
            note = "" if qtype == wanted else f"row length {shape[-1]} is not a multiple of {BLOCK[wanted]}"
            return qtype, note
    return Q.BF16, f"row length {shape[-1]} is not a multiple of 32"


def stored_bytes(qtype: Q, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of logical `shape` stored as `qtype`."""
    from ditq.gguf import tensor_bytes

    return tensor_bytes(qtype, tuple(shape) or (1,))


class GGUFLinear(QuantizedLinear):
    """Linear layer whose weight stays in a ggml block format (Q8_0, Q2_K ... Q6_K): storage `weight` uint8
    [rows, row_bytes]; dequantized per forward into the input's dtype."""

    def __init__(
        self, raw: torch.Tensor, qtype: GGMLQuantizationType, bias: torch.Tensor | None, compute_dtype
    ):
        block, type_size = GGML_QUANT_SIZES[qtype]
        super().__init__(raw.shape[1] // type_size * block, raw.shape[0], compute_dtype)
        self.qtype = GGMLQuantizationType(qtype)
        self.store("weight", raw.contiguous())
        self.set_bias(bias)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_rows(self.weight, self.qtype, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias_as(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype.name}"


@register_format
class GGUFBlockFormat(LinearFormat):
    name = "gguf"
    extra_suffixes = (QTYPE_SUFFIX,)
    bits_per_weight = 4.5
    layout = "GGUF (as GGUFSource exposes it)"
    # `GGUFSource`: a block-quantized weight is its raw bytes plus the 0-d type id; the ggml type itself is
    # checked against the loadable types when the file is opened (`ditq.gguf.GGUFFile`)
    stored_dtypes = {"weight": (torch.uint8,), QTYPE_SUFFIX: (torch.int32,)}

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


def _foreign_suffixes() -> tuple[str, ...]:
    """Tensor suffixes of the other formats (FP8 scales, ComfyUI markers, bitsandbytes states)."""
    from ditq.formats import LINEAR_FORMATS, load_all_formats

    load_all_formats()
    return tuple(
        sfx for name in LINEAR_FORMATS if name != "gguf" for sfx in LINEAR_FORMATS.get(name).extra_suffixes
    )


class GGUFSource:
    """A GGUF file seen as named tensors for `ditq.models.weights.load_into`."""

    def __init__(self, path: str | Path) -> None:
        from ditq.gguf import GGUFFile

        self.path = Path(path)
        self.file = GGUFFile(self.path)
        self.metadata = dict(self.file.metadata)
        self._names: dict[str, tuple[str, str]] = {}
        foreign = _foreign_suffixes()
        for name, info in self.file.tensors.items():
            suffix = next((sfx for sfx in foreign if name.endswith("." + sfx)), None)
            if suffix is not None:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} carries another format's suffix {suffix!r}; a GGUF transformer "
                    "holds ggml blocks and float tensors only"
                )
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

    def dtype(self, name: str) -> torch.dtype:
        """The dtype `get(name)` returns, from the file's tensor table (no data read)."""
        try:
            stored, kind = self._names[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None
        if kind == "qtype":
            return torch.int32
        return torch.uint8 if kind == "raw" else _FLOAT_TYPES[self.file.info(stored).qtype]

    @property
    def written_by_ditq(self) -> bool:
        """Whether ditq's GGUF writer wrote the file (it records its recipe under `ditq.recipe`)."""
        return "ditq.recipe" in self.metadata

    def check_float_dtypes(self, names: list[str]) -> None:
        """Refuse a float tensor whose GGUF type breaks the file's float rule, naming the tensor and both types.

        ggml types are explicit, and F16 and BF16 (2 bytes each) decode the same bytes to other numbers. In a file
        ditq wrote, the type is the one `tensor_type` gives: F32 for 1-D tensors and those of at most 1024
        elements, BF16 for every other unquantized tensor. Another tool's file keeps its own 16-bit type (sd.cpp
        keeps the source's BF16, 1-D tensors too; a converter from F16 keeps F16) beside any F32 tensors
        (ComfyUI-GGUF keeps small ones F32): every 16-bit float tensor has the type most of them have. F32 cannot be relabelled
        at the same size (I32 is not a type ditq loads), so it is never the suspect there.
        """
        types = {name: self.file.info(self._names[name][0]).qtype for name in names}
        for name, qtype in types.items():
            if self.written_by_ditq:
                shape = self.file.info(self._names[name][0]).shape
                small = len(shape) <= 1 or math.prod(shape) <= SMALL_TENSOR
                if small:
                    want, what = Q.F32, f"1-D tensors and tensors of at most {SMALL_TENSOR} elements"
                else:
                    want, what = Q.BF16, f"the unquantized tensors of more than {SMALL_TENSOR} elements"
                if qtype != want:
                    raise CheckpointError(
                        f"{self.path}: tensor {name} is GGUF {qtype.name}; ditq's GGUF writer stores {what} as "
                        f"{want.name}"
                    )
        if self.written_by_ditq:
            return
        half = [q for q in types.values() if q != Q.F32]
        want = max((Q.BF16, Q.F16), key=half.count) if half else None
        for name, qtype in types.items():
            if qtype not in (Q.F32, want):
                raise CheckpointError(
                    f"{self.path}: tensor {name} is GGUF {qtype.name}; the other {half.count(want)} 16-bit float "
                    f"tensors of this file are {want.name} (a file keeps one 16-bit float type)"
                )

    def get(self, name: str) -> torch.Tensor:
        try:
            stored, kind = self._names[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None
        info = self.file.info(stored)
        if kind == "qtype":
            return torch.tensor(int(info.qtype), dtype=torch.int32)
        if kind == "raw":
            from ditq.gguf import check_block_scales

            raw = np.array(self.file.raw(stored))
            check_block_scales(raw, info.qtype, f"{self.path}: tensor {stored!r}", info.shape[-1])
            return torch.from_numpy(raw)
        data = np.array(self.file.raw(stored)).reshape(-1)
        dtype = _FLOAT_TYPES[info.qtype]
        return torch.from_numpy(data).view(dtype).reshape(info.shape)
