"""GGUFFile refuses at open what ditq cannot load correctly, and check_scales finds non-finite block scales."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

import ditq.gguf as G
from ditq.errors import CheckpointError

Q = GGMLQuantizationType
LEGACY = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
IQ4 = [Q.IQ4_NL, Q.IQ4_XS]  # no encoder here: random blocks with a finite scale
SUPPORTED = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS"


def _weights(rows: int = 64, cols: int = 1024, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)


def _encode(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """uint8 (rows, row_bytes): ditq's encoders, gguf-py's for the legacy types, random blocks with a finite
    half-precision scale d (the first field of both) for IQ4_NL / IQ4_XS."""
    if qtype in IQ4:
        block, type_size = GGML_QUANT_SIZES[qtype]
        rng = np.random.default_rng(int(x.size))
        data = rng.integers(0, 256, (x.shape[0], x.shape[1] // block * type_size), dtype=np.uint8)
        blocks = data.reshape(-1, type_size)
        blocks[:, :2] = (
            (0.01 * rng.standard_normal(blocks.shape[0])).astype("<f2").view(np.uint8).reshape(-1, 2)
        )
        return data
    if qtype in LEGACY:
        return np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8).reshape(x.shape[0], -1)
    return G.quantize(x, qtype.name)


def _gguf_py_file(path: Path, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]]) -> Path:
    """A file written by gguf-py, tensors given as their stored bytes (rows, row_bytes)."""
    w = gguf.GGUFWriter(str(path), arch="ideogram")
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _info(blob: bytes, name: str) -> tuple[int, int]:
    """(position of the type field, position of the offset field) of tensor `name`'s info, for 2-D tensors."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = blob.index(key) + len(key)
    assert struct.unpack("<I", blob[pos : pos + 4])[0] == 2
    type_pos = pos + 4 + 16
    return type_pos, type_pos + 4


def _set_u32(blob: bytes, pos: int, value: int) -> bytes:
    return blob[:pos] + struct.pack("<I", value) + blob[pos + 4 :]


@pytest.fixture
def two_tensors(tmp_path) -> Path:
    """layers.0.w (Q4_K, 64 x 1024) then layers.1.w (Q6_K, 8 x 256), written by ditq."""
    path = tmp_path / "two.gguf"
    a, b = _weights(), _weights(8, 256, 1)
    specs = [G.TensorSpec("layers.0.w", a.shape, "Q4_K"), G.TensorSpec("layers.1.w", b.shape, "Q6_K")]
    with G.GGUFStreamWriter(path, specs) as w:
        w.write_tensor("layers.0.w", a)
        w.write_tensor("layers.1.w", b)
    return path


def _write(tmp_path: Path, blob: bytes, name: str = "bad.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(blob)
    return p


# ---- types -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.IQ2_XS, Q.TQ2_0, Q.IQ3_S, Q.MXFP4])
def test_unsupported_type_is_refused_at_open_naming_tensor_and_types(tmp_path, qtype):
    block, type_size = GGML_QUANT_SIZES[qtype]
    data = np.random.default_rng(0).integers(0, 256, (4, 1024 // block * type_size), dtype=np.uint8)
    path = _gguf_py_file(tmp_path / "iq.gguf", {"layers.0.attention.qkv.weight": (data, qtype)})
    with pytest.raises(CheckpointError) as err:
        G.GGUFFile(path)
    msg = str(err.value)
    assert "iq.gguf: tensor 'layers.0.attention.qkv.weight' is " + qtype.name in msg
    assert "a type ditq does not load; it loads " + SUPPORTED in msg
    with G.GGUFFile(path, supported_only=False) as f:  # inspection tools still see it
        assert f.tensors["layers.0.attention.qkv.weight"].qtype == qtype


def test_loadable_types_are_the_documented_ones():
    assert ", ".join(q.name for q in G.LOADABLE_TYPES) == SUPPORTED


@pytest.mark.parametrize("qtype", LEGACY + IQ4)
def test_legacy_and_iq4_types_decode_bit_exactly_in_the_loader_and_the_reader(tmp_path, qtype):
    # the reason they are loadable: diffusers' torch decoder (the loader's path) and GGUFFile.dequantize give
    # gguf-py's values exactly, which are ggml's
    from diffusers.quantizers.gguf.utils import dequantize_functions

    x = _weights(16, 512, 3) * np.exp(np.random.default_rng(4).standard_normal((16, 1))).astype(np.float32)
    data = _encode(x, qtype)
    reference = gguf.quants.dequantize(data, qtype)
    block, type_size = GGML_QUANT_SIZES[qtype]
    torch_out = dequantize_functions[qtype](
        torch.from_numpy(data.copy()).reshape(-1, type_size), block, type_size, dtype=torch.float32
    )
    assert np.array_equal(torch_out.reshape(x.shape).numpy(), reference)
    path = _gguf_py_file(tmp_path / "legacy.gguf", {"w": (data, qtype)})
    with G.GGUFFile(path) as f:
        assert np.array_equal(f.dequantize("w"), reference)
        f.check_scales("w")


# ---- layout: a type or shape that does not match the bytes ----------------------------------------------------


def test_relabelled_type_of_a_middle_tensor_breaks_the_next_offset(two_tensors, tmp_path):
    blob = two_tensors.read_bytes()
    type_pos, _ = _info(blob, "layers.0.w")
    bad = _write(tmp_path, _set_u32(blob, type_pos, int(Q.Q2_K)))  # 84 bytes per 256 values, not 144
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'layers\.1\.w' starts at data offset 36864; expected 21504 .*type or shape that does not "
        "match",
    ):
        G.GGUFFile(bad)


def test_relabelled_type_of_the_last_tensor_leaves_bytes_over(two_tensors, tmp_path):
    blob = two_tensors.read_bytes()
    type_pos, _ = _info(blob, "layers.1.w")
    bad = _write(tmp_path, _set_u32(blob, type_pos, int(Q.Q2_K)))  # 84 bytes per 256 values, not 210
    with pytest.raises(
        CheckpointError, match=r"bytes after the padded end of the last tensor 'layers\.1\.w'"
    ):
        G.GGUFFile(bad)


def test_shape_that_does_not_match_the_bytes(two_tensors, tmp_path):
    blob = two_tensors.read_bytes()
    type_pos, _ = _info(blob, "layers.1.w")
    rows_pos = type_pos - 8  # ne[1], the row count
    bad = _write(tmp_path, blob[:rows_pos] + struct.pack("<Q", 9) + blob[rows_pos + 8 :])
    with pytest.raises(CheckpointError, match=r"tensor 'layers\.1\.w': data .* past the end of the file"):
        G.GGUFFile(bad)
    cols_pos = type_pos - 16  # ne[0], the row length: not a whole number of Q6_K blocks
    bad = _write(tmp_path, blob[:cols_pos] + struct.pack("<Q", 300) + blob[cols_pos + 8 :])
    with pytest.raises(CheckpointError, match="row length 300 is not a multiple of the Q6_K block 256"):
        G.GGUFFile(bad)


def test_gap_between_tensors_is_refused(two_tensors, tmp_path):
    blob = two_tensors.read_bytes()
    _, off_pos = _info(blob, "layers.1.w")
    offset = struct.unpack("<Q", blob[off_pos : off_pos + 8])[0]
    moved = blob[:off_pos] + struct.pack("<Q", offset + 32) + blob[off_pos + 8 :]
    with pytest.raises(CheckpointError, match=rf"starts at data offset {offset + 32}; expected {offset}"):
        G.GGUFFile(_write(tmp_path, moved + bytes(32)))


# ---- block scales ----------------------------------------------------------------------------------------------


def test_q4_k_relabelled_q4_0_is_caught_by_the_scale_check(two_tensors, tmp_path):
    blob = two_tensors.read_bytes()
    type_pos, _ = _info(blob, "layers.0.w")
    assert GGML_QUANT_SIZES[Q.Q4_K][1] * 8 == GGML_QUANT_SIZES[Q.Q4_0][1] * 64  # the same byte count
    bad = _write(tmp_path, _set_u32(blob, type_pos, int(Q.Q4_0)))
    with G.GGUFFile(bad) as f:  # the layout is consistent, so only the scales can tell
        assert f.tensors["layers.0.w"].qtype == Q.Q4_0
        with pytest.raises(
            CheckpointError, match=r"tensor 'layers\.0\.w': \d+ Q4_0 block\(s\) whose scale 'd'"
        ):
            f.check_scales("layers.0.w")
        f.check_scales("layers.1.w")


@pytest.mark.parametrize(
    ("qtype", "field", "offset"),
    [(Q.Q8_0, "d", 0), (Q.Q4_1, "m", 2), (Q.Q2_K, "dmin", 82), (Q.Q3_K, "d", 108), (Q.Q4_K, "dmin", 2)]
    + [(Q.Q5_K, "d", 0), (Q.Q6_K, "d", 208), (Q.Q5_0, "d", 0), (Q.IQ4_XS, "d", 0), (Q.IQ4_NL, "d", 0)],
)
@pytest.mark.parametrize("bad_half", [0x7E00, 0x7C00, 0xFC00])  # NaN, +Inf, -Inf
def test_non_finite_block_scale_is_found(tmp_path, qtype, field, offset, bad_half):
    x = _weights(4, 512)
    data = _encode(x, qtype).copy()
    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = data.reshape(-1, type_size)
    target = 3 * (512 // block) + 1  # row 3, second block
    blocks[target, offset : offset + 2] = np.frombuffer(struct.pack("<H", bad_half), np.uint8)
    path = _gguf_py_file(tmp_path / "nan.gguf", {"blk.w": (data, qtype)})
    with G.GGUFFile(path) as f:
        with pytest.raises(
            CheckpointError,
            match=rf"nan\.gguf: tensor 'blk\.w': 1 {qtype.name} block\(s\) whose scale '{field}' is NaN or Inf, "
            rf"the first in row 3 at column {block}",
        ):
            f.check_scales("blk.w")
    bad, name = G.nonfinite_blocks(data, qtype)
    assert bad.tolist() == [target] and name == field


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16])
def test_non_finite_float_value_is_found(tmp_path, qtype):
    x = _weights(3, 40)
    x[2, 7] = np.nan if qtype != Q.F16 else np.inf
    data = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8).reshape(3, -1)
    path = _gguf_py_file(tmp_path / "f.gguf", {"norm.weight": (data, qtype)})
    with G.GGUFFile(path) as f:
        with pytest.raises(
            CheckpointError,
            match=rf"1 non-finite \(NaN or Inf\) {qtype.name} value\(s\), the first in row 2 at column 7",
        ):
            f.check_scales("norm.weight")


@pytest.mark.parametrize("qtype", G.LOADABLE_TYPES)
def test_valid_tensors_pass_the_scale_check(tmp_path, qtype):
    x = _weights(8, 512, 5) * np.exp(2 * np.random.default_rng(6).standard_normal((8, 1))).astype(np.float32)
    if qtype in (Q.F32, Q.F16, Q.BF16):
        data = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8).reshape(8, -1)
    else:
        data = _encode(x, qtype)
    assert G.nonfinite_blocks(data, qtype)[0].size == 0
    G.check_block_scales(data, qtype, "w", 512)


# ---- bounds and file kinds -----------------------------------------------------------------------------------


def _one_kv_file(tmp_path: Path, value_bytes: bytes, vtype: GGUFValueType) -> Path:
    """A GGUF with no tensors and one metadata entry "k" whose value bytes are given raw."""
    blob = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", vtype)
    return _write(tmp_path, blob + value_bytes)


def test_huge_array_count_is_refused_before_allocating(tmp_path):
    strings = struct.pack("<IQ", GGUFValueType.STRING, 2**40) + struct.pack("<Q", 1) + b"a"
    with pytest.raises(
        CheckpointError, match=r"metadata 'k': array of 1099511627776 STRING elements needs at least"
    ):
        G.GGUFFile(_one_kv_file(tmp_path, strings, GGUFValueType.ARRAY))
    ints = struct.pack("<IQ", GGUFValueType.UINT64, 2**61) + bytes(8)
    with pytest.raises(CheckpointError, match="array of 2305843009213693952 UINT64 elements"):
        G.GGUFFile(_one_kv_file(tmp_path, ints, GGUFValueType.ARRAY))


def test_huge_string_length_and_deep_nesting_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"truncated: metadata 'k' needs 4294967296 bytes"):
        G.GGUFFile(_one_kv_file(tmp_path, struct.pack("<Q", 2**32) + b"abc", GGUFValueType.STRING))
    nested = b"".join(struct.pack("<IQ", GGUFValueType.ARRAY, 1) for _ in range(12))
    nested += struct.pack("<IQ", GGUFValueType.UINT8, 1) + b"\x01"
    with pytest.raises(CheckpointError, match="arrays nested more than 8 deep"):
        G.GGUFFile(_one_kv_file(tmp_path, nested, GGUFValueType.ARRAY))
    with pytest.raises(CheckpointError, match="unknown array element type 99"):
        G.GGUFFile(_one_kv_file(tmp_path, struct.pack("<IQ", 99, 1) + bytes(8), GGUFValueType.ARRAY))


def test_fifo_and_folder_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"pipe\.gguf: cannot open GGUF file: not a regular file"):
        G.GGUFFile(fifo)
    folder = tmp_path / "dir.gguf"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"dir\.gguf: cannot open GGUF file: a folder"):
        G.GGUFFile(folder)
    with pytest.raises(CheckpointError, match=r"missing\.gguf: cannot open GGUF file: No such file"):
        G.GGUFFile(tmp_path / "missing.gguf")
