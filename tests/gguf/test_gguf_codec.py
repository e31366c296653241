"""The GGUF codecs against llama.cpp's own bytes and against gguf-py's decoder."""

from __future__ import annotations

from pathlib import Path

import gguf.quants
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

import ditq.gguf as G
from ditq.errors import CheckpointError, ConfigError

DATA = Path(__file__).parent.parent / "data" / "kquants"
REFERENCE_TYPES = ["Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def ref_input() -> np.ndarray:
    return np.load(DATA / "input.npy")


@pytest.fixture(scope="module")
def ref_imatrix() -> np.ndarray:
    return np.load(DATA / "imatrix.npy")


def _reference(qtype: str, mode: str, rows: int) -> np.ndarray:
    name = qtype.lower() if qtype == "Q8_0" else qtype[:-1].lower() + "K"
    return np.fromfile(DATA / f"{name}.{mode}.bin", np.uint8).reshape(rows, -1)


def _differing_rows(ours: np.ndarray, ref: np.ndarray) -> str:
    rows = np.flatnonzero((ours != ref).any(axis=1))
    detail = []
    for r in rows[:8]:
        cols = np.flatnonzero(ours[r] != ref[r])
        detail.append(f"row {r}: {cols.size} bytes differ, first at byte {cols[0]}")
    return f"{rows.size} of {ref.shape[0]} rows differ: {rows.tolist()}\n" + "\n".join(detail)


@pytest.mark.parametrize("qtype", REFERENCE_TYPES)
@pytest.mark.parametrize("mode", ["chunk", "imat"])
def test_quantize_matches_llama_cpp_bytes(qtype, mode, ref_input, ref_imatrix):
    imatrix = ref_imatrix if mode == "imat" else None
    ours = G.quantize(ref_input, qtype, imatrix)
    ref = _reference(qtype, mode, ref_input.shape[0])
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref), _differing_rows(ours, ref)


@pytest.mark.parametrize("qtype", REFERENCE_TYPES)
@pytest.mark.parametrize("mode", ["chunk", "imat"])
def test_quantize_column_slices_and_partial_tiles_match(qtype, mode, ref_input, ref_imatrix):
    # blocks are independent (the imatrix is per column), so the first 768 columns must give the reference
    # rows' first bytes; 5 rows x 3 super-blocks and single rows leave the encoder's tiles partly filled
    cols = 768
    imatrix = ref_imatrix[:cols] if mode == "imat" else None
    ref = _reference(qtype, mode, ref_input.shape[0])[:, : G.row_bytes(qtype, cols)]
    ours = G.quantize(ref_input[:5, :cols], qtype, imatrix)
    assert np.array_equal(ours, ref[:5]), _differing_rows(ours, ref[:5])
    for r in (20, 23, 26):
        assert np.array_equal(G.quantize(ref_input[r, :cols], qtype, imatrix), ref[r : r + 1]), f"row {r}"


@pytest.mark.parametrize("qtype", REFERENCE_TYPES)
def test_dequantize_matches_gguf_py(qtype, ref_input, ref_imatrix):
    for imatrix in (None, ref_imatrix):
        q = G.quantize(ref_input, qtype, imatrix)
        ours = G.dequantize(q, qtype)
        theirs = gguf.quants.dequantize(q, GGMLQuantizationType[qtype])
        assert ours.dtype == np.float32 and ours.shape == ref_input.shape
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_float_types_match_gguf_py(qtype, ref_input):
    x = ref_input[:8]
    ours = G.quantize(x, qtype)
    theirs = gguf.quants.quantize(x, GGMLQuantizationType[qtype])
    assert np.array_equal(ours, np.ascontiguousarray(theirs).view(np.uint8))
    assert np.array_equal(
        G.dequantize(ours, qtype), gguf.quants.dequantize(ours, GGMLQuantizationType[qtype])
    )


def test_layout_table_matches_gguf_constants():
    for name in G.codec_names():
        q = GGMLQuantizationType[name]
        assert G.BLOCK_LAYOUT[q] == GGML_QUANT_SIZES[q], name


@pytest.mark.parametrize("qtype", REFERENCE_TYPES)
def test_quantize_any_leading_shape_and_thread_count(qtype, ref_input):
    x = ref_input[:8]
    flat = G.quantize(x, qtype)
    assert np.array_equal(G.quantize(x.reshape(2, 4, -1), qtype, threads=1), flat)
    assert np.array_equal(G.quantize(x.astype(np.float64), qtype), flat)
    assert np.array_equal(G.quantize(x[3], qtype), flat[3:4])
    assert G.dequantize(flat.reshape(2, 4, -1), qtype).shape == (2, 4, x.shape[1])


@pytest.mark.parametrize("qtype", [*REFERENCE_TYPES, "F16"])
def test_zero_rows(qtype):
    block = G.codec(qtype).block_size
    q = G.quantize(np.zeros((0, 2 * block), np.float32), qtype)
    assert q.shape == (0, G.row_bytes(qtype, 2 * block)) and q.dtype == np.uint8
    assert G.dequantize(q, qtype).shape == (0, 2 * block)


@pytest.mark.parametrize("qtype", REFERENCE_TYPES)
def test_row_length_not_multiple_of_block_raises_config_error(qtype):
    block = G.codec(qtype).block_size
    with pytest.raises(ConfigError, match=rf"\(3, {block + 16}\).*block size {block}"):
        G.quantize(np.zeros((3, block + 16), np.float32), qtype)


@pytest.mark.parametrize("qtype", [*REFERENCE_TYPES, "F16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises_checkpoint_error(qtype, bad):
    x = np.ones((4, 512), np.float32)
    x[2, 300] = bad
    with pytest.raises(CheckpointError, match="row 2"):
        G.quantize(x, qtype)


def test_unknown_qtype_and_bad_imatrix_raise_config_error(ref_input):
    with pytest.raises(ConfigError, match="Q7_K"):
        G.quantize(ref_input, "Q7_K")
    with pytest.raises(ConfigError, match="imatrix shape"):
        G.quantize(ref_input, "Q8_0", np.ones(17, np.float32))
