"""ditq's torch block decoders equal gguf-py's decoder (ggml's arithmetic) bit for bit, for every type it loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from ditq.formats.gguf import dequantize_rows
from ditq.formats.gguf_torch import DECODERS

# types ditq encodes itself, and the legacy types gguf-py encodes (stable-diffusion.cpp writes them)
OWN = (Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
LEGACY = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)


def _weights(rows: int = 24, cols: int = 512) -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols)) * rng.uniform(0.001, 5.0, (rows, 1))
    w[0] = 0.0  # an all-zero row
    w[1, ::7] *= 40  # outliers
    return w.astype(np.float32)


@pytest.mark.parametrize("qtype", OWN + LEGACY, ids=lambda q: q.name)
def test_torch_decoder_equals_gguf_py(qtype):
    from ditq.gguf import quantize

    w = _weights()
    raw = quantize(w, qtype) if qtype in OWN else gguf_quantize(w, qtype)
    want = gguf_dequantize(raw, qtype).reshape(w.shape)
    got = dequantize_rows(torch.from_numpy(np.ascontiguousarray(raw)), qtype, torch.float32).numpy()
    assert got.dtype == np.float32 and np.array_equal(got, want)


def test_random_bytes_decode_like_gguf_py():
    """Every bit pattern of the packed fields, not only what an encoder writes (finite scales)."""
    rng = np.random.default_rng(1)
    for qtype in DECODERS:
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (64, size), dtype=np.uint8)
        raw = raw.reshape(8, -1)
        want = gguf_dequantize(raw, qtype)
        got = dequantize_rows(torch.from_numpy(raw.copy()), qtype, torch.float32).numpy()
        finite = np.isfinite(want)
        assert np.array_equal(got[finite], want[finite]), qtype.name
        assert np.array_equal(np.isnan(got), np.isnan(want)), qtype.name
