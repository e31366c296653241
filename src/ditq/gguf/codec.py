"""The GGUF block codec: one class per quant type, registered by qtype, and the public quantize/dequantize.

A tensor is quantized row by row: each row of `row_len` values is cut into blocks of `block_size` values and
each block is written as `type_size` bytes, so a row takes `row_len // block_size * type_size` bytes. Every
byte is what llama.cpp's reference quantizer (the path `llama-quantize` takes) writes for the same input.

Rules: llama.cpp 01243c58 changed how `make_qkx3_quants` (Q2_K, Q4_K and Q5_K with an importance matrix) rounds a
trial level whose grid origin has moved next to the block's max: it clamps before rounding instead of rounding a
value that may be out of range, inf or nan. The bytes differ only in such corners (an importance matrix with
zeros over all-negative or zero-max blocks of a wide range). `quantize(..., rule=...)` picks the rule: the
current one by default, "ggml-d99724f" for files that must match older builds byte for byte.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType

from ditq.errors import CheckpointError, ConfigError
from ditq.gguf._jit import first_nonfinite_block
from ditq.gguf._jit import threads as _threads

QK_K = 256

# Bytes per block, written as the sum of the block's fields in storage order (fields are little-endian;
# `f16` is an IEEE half). The per-type modules draw each layout in full.
BLOCK_LAYOUT: dict[GGMLQuantizationType, tuple[int, int]] = {
    GGMLQuantizationType.F32: (1, 4),
    GGMLQuantizationType.F16: (1, 2),
    GGMLQuantizationType.BF16: (1, 2),
    # d:f16 | qs:32 x int8
    GGMLQuantizationType.Q8_0: (32, 2 + 32),
    # scales:16 x (4-bit scale | 4-bit min) | qs:256 x 2 bit | d:f16 | dmin:f16
    GGMLQuantizationType.Q2_K: (QK_K, 16 + 64 + 2 + 2),
    # hmask:256 x 1 bit | qs:256 x 2 bit | scales:16 x 6 bit | d:f16
    GGMLQuantizationType.Q3_K: (QK_K, 32 + 64 + 12 + 2),
    # d:f16 | dmin:f16 | scales:8 x (6-bit scale, 6-bit min) | qs:256 x 4 bit
    GGMLQuantizationType.Q4_K: (QK_K, 2 + 2 + 12 + 128),
    # d:f16 | dmin:f16 | scales:8 x (6-bit scale, 6-bit min) | qh:256 x 1 bit | qs:256 x 4 bit
    GGMLQuantizationType.Q5_K: (QK_K, 2 + 2 + 12 + 32 + 128),
    # ql:256 x 4 bit | qh:256 x 2 bit | scales:16 x int8 | d:f16
    GGMLQuantizationType.Q6_K: (QK_K, 128 + 64 + 16 + 2),
}

_CODECS: dict[GGMLQuantizationType, type[BlockCodec]] = {}

# make_qkx3_quants rounding rules: name -> whether a trial level is clamped before it is rounded.
KQUANT_RULES: dict[str, bool] = {"llama.cpp-01243c58": True, "ggml-d99724f": False}
DEFAULT_RULE = "llama.cpp-01243c58"
# The types whose bytes depend on the rule (only when an importance matrix is given).
RULE_TYPES = frozenset({GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K})


def resolve_rule(rule: str) -> str:
    """`rule` if it names a known make_qkx3_quants rule, else ConfigError listing them."""
    if rule not in KQUANT_RULES:
        raise ConfigError(f"unknown k-quant rule {rule!r}; known: {', '.join(KQUANT_RULES)}")
    return rule


def clamps_first(rule: str) -> bool:
    """Whether `rule` clamps a make_qkx3_quants trial level before rounding it."""
    return KQUANT_RULES[resolve_rule(rule)]


class BlockCodec:
    """Encoder and decoder of one quant type over (n_blocks, block_size) arrays.

    Subclasses register themselves with `class Q4K(BlockCodec, qtype=GGMLQuantizationType.Q4_K)` and implement
    `quantize_blocks` and `dequantize_blocks`. `uses_imatrix` says whether the encoder reads importance weights.
    """

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    uses_imatrix: ClassVar[bool] = False

    def __init_subclass__(cls, qtype: GGMLQuantizationType, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if qtype in _CODECS:
            raise ValueError(f"codec for {qtype.name} is registered twice")
        cls.qtype = qtype
        cls.block_size, cls.type_size = BLOCK_LAYOUT[qtype]
        _CODECS[qtype] = cls

    @classmethod
    def quantize_blocks(
        cls, blocks: np.ndarray, weights: np.ndarray | None = None, rule: str = DEFAULT_RULE
    ) -> np.ndarray:
        """blocks: float32 (n_blocks, block_size), finite. weights: float32 (k, block_size) importance, block b
        using weights[b % k] (k = blocks per row broadcasts one imatrix row to every row). rule: a KQUANT_RULES
        name (read by the RULE_TYPES codecs). Returns uint8 (n_blocks, type_size)."""
        raise NotImplementedError

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """blocks: uint8 (n_blocks, type_size). Returns float32 (n_blocks, block_size)."""
        raise NotImplementedError


def resolve_qtype(qtype: GGMLQuantizationType | str) -> GGMLQuantizationType:
    """A `GGMLQuantizationType` or its name ("Q4_K", case-insensitive) -> the enum member with a codec here."""
    if isinstance(qtype, str):
        try:
            qtype = GGMLQuantizationType[qtype.upper()]
        except KeyError:
            raise ConfigError(
                f"unknown GGUF quant type {qtype!r}; known: {', '.join(codec_names())}"
            ) from None
    if qtype not in _CODECS:
        name = getattr(qtype, "name", qtype)
        raise ConfigError(f"no codec for GGUF quant type {name}; known: {', '.join(codec_names())}")
    return qtype


def codec_names() -> list[str]:
    return [q.name for q in _CODECS]


def codec(qtype: GGMLQuantizationType | str) -> type[BlockCodec]:
    return _CODECS[resolve_qtype(qtype)]


def row_bytes(qtype: GGMLQuantizationType | str, row_len: int) -> int:
    """Bytes one row of `row_len` values takes; ConfigError if row_len is not a multiple of the block size."""
    c = codec(qtype)
    if row_len % c.block_size:
        raise ConfigError(
            f"row length {row_len} is not a multiple of the {c.qtype.name} block size {c.block_size}"
        )
    return row_len // c.block_size * c.type_size


def tensor_bytes(qtype: GGMLQuantizationType | str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of logical `shape` (numpy order, rows last) takes in `qtype`."""
    if not shape:
        raise ConfigError("a GGUF tensor needs at least one dimension")
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    return rows * row_bytes(qtype, int(shape[-1]))


def quantize(
    array: np.ndarray,
    qtype: GGMLQuantizationType | str,
    imatrix: np.ndarray | None = None,
    *,
    threads: int | None = None,
    rule: str = DEFAULT_RULE,
) -> np.ndarray:
    """Encode `array` (..., row_len), any real dtype, as `qtype`, bit-exact with llama.cpp's reference.

    imatrix: float32 (row_len,) per-input-column importance (llama.cpp's imatrix for this weight), applied to every
    row; used by the k-quants, ignored by Q8_0 and the float types. threads: worker threads for this call
    (default: the enclosing `ditq.gguf.threads(n)` setting, else every core the process may use). rule: the
    make_qkx3_quants rule (KQUANT_RULES) Q2_K / Q4_K / Q5_K follow with an imatrix; the default is current
    llama.cpp's, "ggml-d99724f" the older one.
    Returns uint8 (rows, row_bytes), rows = prod(shape[:-1]). Raises ConfigError if row_len is not a multiple of
    the block size (callers fall back to a wider type) and CheckpointError on NaN or Inf input.
    """
    c = codec(qtype)
    resolve_rule(rule)
    x = np.asarray(array)
    if x.ndim == 0:
        raise ConfigError("cannot quantize a 0-d array: GGUF tensors have at least one dimension")
    if x.dtype.kind not in "fiub":
        raise ConfigError(f"cannot quantize dtype {x.dtype}: expected a real-valued array")
    shape = x.shape
    row_len = shape[-1]
    if row_len == 0 or row_len % c.block_size:
        raise ConfigError(
            f"cannot quantize shape {shape} as {c.qtype.name}: row length {row_len} is not a multiple of the "
            f"block size {c.block_size}"
        )
    x = np.ascontiguousarray(x.reshape(-1, row_len), dtype=np.float32)
    weights = None
    if imatrix is not None:
        w = np.asarray(imatrix, dtype=np.float32)
        if w.shape != (row_len,):
            raise ConfigError(f"imatrix shape {w.shape} does not match row length {row_len} of shape {shape}")
        if not np.isfinite(w).all() or (w < 0).any():
            raise ConfigError("imatrix must hold finite, non-negative values")
        if c.uses_imatrix:
            weights = np.ascontiguousarray(w.reshape(-1, c.block_size))
    rows = x.shape[0]
    blocks = x.reshape(-1, c.block_size)
    with _threads(threads):
        try:
            out = c.quantize_blocks(blocks, weights, rule)
        except NonFiniteInput as err:
            r, col = divmod(err.block * c.block_size, row_len)
            raise CheckpointError(
                f"cannot quantize shape {shape} as {c.qtype.name}: non-finite value (NaN or Inf) in row {r} "
                f"near column {col}"
            ) from None
    return out.reshape(rows, row_len // c.block_size * c.type_size)


def dequantize(
    data: np.ndarray, qtype: GGMLQuantizationType | str, *, threads: int | None = None
) -> np.ndarray:
    """Decode bytes (..., row_bytes) of `qtype` into float32 (..., row_len), exactly as ggml does."""
    c = codec(qtype)
    b = np.asarray(data)
    if b.dtype != np.uint8:
        raise ConfigError(f"dequantize expects uint8 bytes, got {b.dtype}")
    if b.ndim == 0 or b.shape[-1] % c.type_size:
        raise ConfigError(
            f"cannot decode shape {b.shape} as {c.qtype.name}: bytes per row are not a multiple of the block "
            f"size of {c.type_size} bytes"
        )
    lead = b.shape[:-1]
    n_row_blocks = b.shape[-1] // c.type_size
    blocks = np.ascontiguousarray(b).reshape(-1, c.type_size)
    with _threads(threads):
        out = c.dequantize_blocks(blocks)
    return out.reshape(*lead, n_row_blocks * c.block_size)


class NonFiniteInput(Exception):
    """Raised by an encoder that met NaN or Inf; `block` is the index of a block holding one."""

    def __init__(self, block: int) -> None:
        super().__init__(block)
        self.block = block


def check_finite(blocks: np.ndarray) -> None:
    """Raise NonFiniteInput naming the first block with a NaN or Inf."""
    b = first_nonfinite_block(blocks)
    if b >= 0:
        raise NonFiniteInput(int(b))
