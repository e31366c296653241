"""F32, F16 and BF16: one value per block, stored as little-endian floats."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from ditq.gguf.codec import DEFAULT_RULE, BlockCodec, check_finite


class F32(BlockCodec, qtype=GGMLQuantizationType.F32):
    @classmethod
    def quantize_blocks(
        cls, blocks: np.ndarray, weights: np.ndarray | None = None, rule: str = DEFAULT_RULE
    ) -> np.ndarray:
        check_finite(blocks.reshape(-1, 1))
        return np.ascontiguousarray(blocks, dtype="<f4").view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return blocks.view("<f4").astype(np.float32)


class F16(BlockCodec, qtype=GGMLQuantizationType.F16):
    @classmethod
    def quantize_blocks(
        cls, blocks: np.ndarray, weights: np.ndarray | None = None, rule: str = DEFAULT_RULE
    ) -> np.ndarray:
        check_finite(blocks.reshape(-1, 1))
        with np.errstate(over="ignore"):  # beyond +-65504 becomes +-inf, as in ggml
            return blocks.astype("<f2").view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return blocks.view("<f2").astype(np.float32)


class BF16(BlockCodec, qtype=GGMLQuantizationType.BF16):
    """The top 16 bits of the float32, rounded to nearest even (ggml_compute_fp32_to_bf16)."""

    @classmethod
    def quantize_blocks(
        cls, blocks: np.ndarray, weights: np.ndarray | None = None, rule: str = DEFAULT_RULE
    ) -> np.ndarray:
        check_finite(blocks.reshape(-1, 1))
        u = np.ascontiguousarray(blocks, dtype="<f4").view(np.uint32)
        top = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
        return top.astype("<u2").view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        u = blocks.view("<u2").astype(np.uint32) << np.uint32(16)
        return u.view(np.float32)
