"""What ditq loads from GGUF files, and a cheap check of a tensor's block scales.

LOADABLE_TYPES are the ggml types whose decoding ditq's loader (diffusers' torch decoders, in float32) and
`GGUFFile.dequantize` (ditq's codecs, else gguf-py) do bit for bit as ggml does: the float types, Q8_0, the legacy
Q4_0 / Q4_1 / Q5_0 / Q5_1 that stable-diffusion.cpp writes, Q2_K .. Q6_K, and IQ4_NL / IQ4_XS (both decoders have
them; the tests check each against gguf-py). Other types (IQ1-IQ3, TQ1_0 / TQ2_0, MXFP4, ...) have no torch
decoder in diffusers and are refused when a file is opened, not at the first forward.

`check_block_scales` reads only the half-precision scale fields of each block (d, and dmin or m where the type has
one) and refuses a tensor where any is NaN or Inf: such a block decodes to NaN, and so does the image. It costs a
strided pass over those fields: 10 ms for a 4608 x 12288 Q4_K weight (32 MB), 22 ms for it in Q8_0 (60 MB), on a
2-core AMD EPYC (AVX2). Bytes of
another type read under a wrong label (a Q4_K tensor relabelled Q4_0, same byte count) put quantized levels where
the scales should be, which makes some of them non-finite on any real-sized tensor.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ditq.errors import CheckpointError

Q = GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
LOADABLE_TYPES: tuple[GGMLQuantizationType, ...] = (
    *FLOAT_TYPES,
    Q.Q8_0,
    Q.Q4_0,
    Q.Q4_1,
    Q.Q5_0,
    Q.Q5_1,
    Q.Q2_K,
    Q.Q3_K,
    Q.Q4_K,
    Q.Q5_K,
    Q.Q6_K,
    Q.IQ4_NL,
    Q.IQ4_XS,
)

# Byte offsets of the f16 scale fields inside one block (ggml-common.h's block structs).
SCALE_FIELDS: dict[GGMLQuantizationType, tuple[tuple[str, int], ...]] = {
    Q.Q8_0: (("d", 0),),  # d | qs[32]
    Q.Q4_0: (("d", 0),),  # d | qs[16]
    Q.Q4_1: (("d", 0), ("m", 2)),  # d | m | qs[16]
    Q.Q5_0: (("d", 0),),  # d | qh[4] | qs[16]
    Q.Q5_1: (("d", 0), ("m", 2)),  # d | m | qh[4] | qs[16]
    Q.Q2_K: (("d", 80), ("dmin", 82)),  # scales[16] | qs[64] | d | dmin
    Q.Q3_K: (("d", 108),),  # hmask[32] | qs[64] | scales[12] | d
    Q.Q4_K: (("d", 0), ("dmin", 2)),  # d | dmin | scales[12] | qs[128]
    Q.Q5_K: (("d", 0), ("dmin", 2)),  # d | dmin | scales[12] | qh[32] | qs[128]
    Q.Q6_K: (("d", 208),),  # ql[128] | qh[64] | scales[16] | d
    Q.IQ4_NL: (("d", 0),),  # d | qs[16]
    Q.IQ4_XS: (("d", 0),),  # d | scales_h:u16 | scales_l[4] | qs[128]
}
# Bits of a non-finite value (exponent all ones) for the float types, as (item dtype, exponent mask).
_FLOAT_MASKS = {Q.F32: ("<u4", 0x7F800000), Q.F16: ("<u2", 0x7C00), Q.BF16: ("<u2", 0x7F80)}


def loadable_names() -> str:
    return ", ".join(q.name for q in LOADABLE_TYPES)


def nonfinite_blocks(data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, str]:
    """Indices (flat, in storage order) of the blocks of `data` (uint8, any shape, whole blocks) whose scale is
    NaN or Inf, and the name of the first bad field. For F32 / F16 / BF16 every value is its own block."""
    raw = np.ascontiguousarray(data).reshape(-1)
    if qtype in _FLOAT_MASKS:
        item, mask = _FLOAT_MASKS[qtype]
        bits = raw.view(item)
        return np.flatnonzero((bits & mask) == mask), "value"
    try:
        fields = SCALE_FIELDS[qtype]
    except KeyError:
        raise CheckpointError(f"no block-scale check for ggml type {qtype.name}") from None
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    bad = np.zeros(blocks.shape[0], np.bool_)
    first_field = ""
    for name, off in fields:
        half = blocks[:, off : off + 2].view("<u2")[:, 0]  # a strided view of the field, no copy
        hit = (half & 0x7C00) == 0x7C00
        if hit.any() and not first_field:
            first_field = name
        bad |= hit
    return np.flatnonzero(bad), first_field


def check_block_scales(data: np.ndarray, qtype: GGMLQuantizationType, what: str, row_len: int) -> None:
    """Raise CheckpointError naming `what` (e.g. "model.gguf: tensor 'x'") if any block scale of `data` is NaN or
    Inf. row_len: values per row of the tensor, to name the row of the first bad block."""
    bad, field = nonfinite_blocks(data, qtype)
    if bad.size:
        block = GGML_QUANT_SIZES[qtype][0]
        row, col = divmod(int(bad[0]) * block, row_len)
        if qtype in _FLOAT_MASKS:
            found = f"{bad.size} non-finite (NaN or Inf) {qtype.name} value(s)"
        else:
            found = f"{bad.size} {qtype.name} block(s) whose scale {field!r} is NaN or Inf"
        raise CheckpointError(
            f"{what}: {found}, the first in row {row} at column {col}: corrupt data, or bytes of another type"
        )
