"""GGUF for ditq: llama.cpp-exact block codecs (Q8_0, Q2_K..Q6_K, F32/F16/BF16) and GGUF file read/write.

quantize(array, qtype, imatrix=None, rule=DEFAULT_RULE) -> uint8 (rows, row_bytes)
dequantize(data, qtype) -> float32 (rows, row_len)
GGUFStreamWriter(path, [TensorSpec(name, shape, qtype), ...], metadata)   streaming, atomic write
GGUFFile(path)                                                           checked, memory-mapped read
GGUFFile(path).check_scales(name)                                        NaN / Inf block scales, per tensor
"""

from __future__ import annotations

from ditq.gguf import floats, q2_k, q3_k, q4_k, q6_k, q8_0  # noqa: F401  (registers the codecs)
from ditq.gguf._jit import thread_count, threads
from ditq.gguf.checks import LOADABLE_TYPES, check_block_scales, nonfinite_blocks
from ditq.gguf.codec import (
    BLOCK_LAYOUT,
    DEFAULT_RULE,
    KQUANT_RULES,
    RULE_TYPES,
    BlockCodec,
    codec,
    codec_names,
    dequantize,
    quantize,
    resolve_qtype,
    row_bytes,
    tensor_bytes,
)
from ditq.gguf.reader import GGUFFile, TensorInfo
from ditq.gguf.writer import RULE_KEY, GGUFStreamWriter, TensorSpec

__all__ = [
    "BLOCK_LAYOUT",
    "DEFAULT_RULE",
    "KQUANT_RULES",
    "LOADABLE_TYPES",
    "RULE_KEY",
    "RULE_TYPES",
    "BlockCodec",
    "GGUFFile",
    "GGUFStreamWriter",
    "TensorInfo",
    "TensorSpec",
    "check_block_scales",
    "codec",
    "codec_names",
    "dequantize",
    "nonfinite_blocks",
    "quantize",
    "resolve_qtype",
    "row_bytes",
    "tensor_bytes",
    "thread_count",
    "threads",
]
