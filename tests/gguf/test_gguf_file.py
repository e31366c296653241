"""GGUF file writing and checked reading, checked against gguf-py's reader."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType

import ditq.gguf as G
from ditq.errors import CheckpointError, ConfigError

IMATRIX = {
    "layers.0.feed_forward.w1.weight": np.exp(np.random.default_rng(5).standard_normal(512)).astype(
        np.float32
    )
}


def _tensors(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, str]]:
    return {
        "layers.0.attention.qkv.weight": (rng.standard_normal((6, 512), dtype=np.float32), "Q8_0"),
        "layers.0.attention.qkv.bias": (rng.standard_normal(6, dtype=np.float32), "F32"),
        "layers.0.feed_forward.w1.weight": (rng.standard_normal((8, 512), dtype=np.float32) * 0.02, "Q4_K"),
        "layers.0.attention.o.weight": (rng.standard_normal((3, 256), dtype=np.float32), "Q6_K"),
        "t_embedding.mlp_in.weight": (rng.standard_normal((2, 3, 64), dtype=np.float32), "F16"),
        "final_layer.linear.weight": (rng.standard_normal((4, 32), dtype=np.float32), "BF16"),
    }


METADATA = {
    "general.architecture": "ideogram",
    "general.quantization_version": np.uint32(2),
    "ditq.format_version": 1,
    "ditq.ratio": 0.25,
    "ditq.flag": True,
    "ditq.big": 2**40,
    "ditq.names": ["a", "bé"],
    "ditq.sizes": np.array([1, 2, 3], dtype=np.uint64),
}


def _write(path: Path, tensors, metadata=METADATA, order=None) -> None:
    specs = [G.TensorSpec(name, a.shape, q) for name, (a, q) in tensors.items()]
    with G.GGUFStreamWriter(path, specs, metadata) as w:
        for name in order or tensors:
            w.write_tensor(name, tensors[name][0], imatrix=IMATRIX.get(name))


@pytest.fixture
def written(tmp_path):
    tensors = _tensors(np.random.default_rng(0))
    path = tmp_path / "model.gguf"
    _write(path, tensors, order=list(reversed(tensors)))  # any write order
    return path, tensors


def test_writer_output_reads_back_in_gguf_py(written):
    path, tensors = written
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "ideogram"
    assert r.fields["general.quantization_version"].types == [GGUFValueType.UINT32]
    assert r.fields["ditq.format_version"].contents() == 1
    assert r.fields["ditq.ratio"].contents() == pytest.approx(0.25)
    assert r.fields["ditq.flag"].contents() is True
    assert r.fields["ditq.big"].types == [GGUFValueType.INT64] and r.fields["ditq.big"].contents() == 2**40
    assert r.fields["ditq.names"].contents() == ["a", "bé"]
    assert r.fields["ditq.sizes"].contents() == [1, 2, 3]
    by_name = {t.name: t for t in r.tensors}
    assert list(by_name) == list(tensors)
    for name, (a, q) in tensors.items():
        t = by_name[name]
        assert t.tensor_type == GGMLQuantizationType[q]
        assert tuple(reversed(t.shape.tolist())) == a.shape
        assert t.data_offset % 32 == 0
        stored = np.asarray(t.data).view(np.uint8).reshape(-1)
        assert np.array_equal(stored, G.quantize(a, q, IMATRIX.get(name)).reshape(-1))
        decoded = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(a.shape)
        assert np.array_equal(decoded, G.GGUFFile(path).dequantize(name))


def test_reader_gives_names_shapes_types_metadata_and_data(written):
    path, tensors = written
    with G.GGUFFile(path) as f:
        assert f.version == 3 and f.alignment == 32
        assert f.metadata["general.architecture"] == "ideogram"
        assert f.metadata["ditq.names"] == ["a", "bé"]
        assert f.metadata_types["ditq.sizes"] == GGUFValueType.ARRAY
        assert list(f.tensors) == list(tensors)
        for name, (a, q) in tensors.items():
            info = f.tensors[name]
            assert info.shape == a.shape and info.qtype == GGMLQuantizationType[q]
            raw = f.raw(name)
            assert np.shares_memory(raw, f.raw(name))  # a view of the mapping, not a copy
            assert np.array_equal(raw.reshape(-1), G.quantize(a, q, IMATRIX.get(name)).reshape(-1))
            expected = G.dequantize(G.quantize(a, q, IMATRIX.get(name)), q).reshape(a.shape)
            assert np.array_equal(f.dequantize(name), expected)


def test_alignment_from_metadata(tmp_path):
    tensors = _tensors(np.random.default_rng(1))
    path = tmp_path / "a64.gguf"
    _write(path, tensors, {"general.alignment": 64})
    r = gguf.GGUFReader(path)
    assert r.alignment == 64 and all(t.data_offset % 64 == 0 for t in r.tensors)
    assert G.GGUFFile(path).alignment == 64


def test_failed_write_leaves_no_file(tmp_path):
    tensors = _tensors(np.random.default_rng(2))
    path = tmp_path / "out.gguf"
    specs = [G.TensorSpec(name, a.shape, q) for name, (a, q) in tensors.items()]
    with pytest.raises(RuntimeError, match="boom"):
        with G.GGUFStreamWriter(path, specs, METADATA) as w:
            w.write_tensor("layers.0.attention.qkv.weight", tensors["layers.0.attention.qkv.weight"][0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    bad = np.ones((6, 512), np.float32)
    bad[1, 7] = np.nan
    with pytest.raises(CheckpointError):
        with G.GGUFStreamWriter(path, specs, METADATA) as w:
            w.write_tensor("layers.0.attention.qkv.weight", bad)
    assert list(tmp_path.iterdir()) == []

    w = G.GGUFStreamWriter(path, specs, METADATA)
    with pytest.raises(ConfigError, match="never written"):
        w.close()
    assert list(tmp_path.iterdir()) == []

    w = G.GGUFStreamWriter(path, specs, METADATA)  # abandoned without close
    del w
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_undeclared_wrong_shape_and_wrong_size(tmp_path):
    specs = [G.TensorSpec("w", (4, 64), "Q8_0")]
    with G.GGUFStreamWriter(tmp_path / "x.gguf", specs) as w:
        with pytest.raises(ConfigError, match="not declared"):
            w.write_tensor("v", np.zeros((4, 64), np.float32))
        with pytest.raises(ConfigError, match="declared"):
            w.write_tensor("w", np.zeros((4, 32), np.float32))
        with pytest.raises(ConfigError, match="expected 272 bytes"):
            w.write_raw("w", np.zeros(10, np.uint8))
        w.write_raw("w", G.quantize(np.zeros((4, 64), np.float32), "Q8_0"))
    with pytest.raises(ConfigError, match="block size 32"):
        _ = G.TensorSpec("odd", (4, 48), "Q8_0").nbytes


# ---- bad files -------------------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path) -> tuple[Path, bytes]:
    path = tmp_path / "small.gguf"
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    with G.GGUFStreamWriter(path, [G.TensorSpec("w", x.shape, "Q8_0")], {"k": "v"}) as w:
        w.write_tensor("w", x)
    return path, path.read_bytes()


def _tensor_info_pos(blob: bytes) -> int:
    """Byte offset of the first tensor info in a file written with one metadata entry {"k": "v"}."""
    return 24 + (8 + 1) + 4 + (8 + 1)


def _bad(tmp_path: Path, blob: bytes) -> Path:
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    return p


def test_bad_magic(tmp_path, small):
    _, blob = small
    with pytest.raises(CheckpointError, match=r"bad\.gguf: bad magic b'GGUG'"):
        G.GGUFFile(_bad(tmp_path, b"GGUG" + blob[4:]))


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_unsupported_version(tmp_path, small, version):
    _, blob = small
    with pytest.raises(CheckpointError, match=f"unsupported GGUF version {version}"):
        G.GGUFFile(_bad(tmp_path, blob[:4] + struct.pack("<I", version) + blob[8:]))


def test_truncated_file_and_offset_past_end(tmp_path, small):
    _, blob = small
    data_end = len(blob) - (96 - 2 * 34)  # the last tensor is padded to the 32-byte alignment
    G.GGUFFile(_bad(tmp_path, blob[:data_end]))  # padding after the last tensor is optional
    with pytest.raises(CheckpointError, match="tensor 'w': data .* past the end of the file"):
        G.GGUFFile(_bad(tmp_path, blob[: data_end - 1]))
    with pytest.raises(CheckpointError, match="truncated"):
        G.GGUFFile(_bad(tmp_path, blob[:30]))
    with pytest.raises(CheckpointError, match="shorter than a GGUF header"):
        G.GGUFFile(_bad(tmp_path, blob[:10]))
    pos = _tensor_info_pos(blob) + 8 + 1 + 4 + 16 + 4  # name, n_dims, 2 dims, type -> offset
    far = blob[:pos] + struct.pack("<Q", 1 << 20) + blob[pos + 8 :]
    with pytest.raises(CheckpointError, match="tensor 'w': data .* past the end"):
        G.GGUFFile(_bad(tmp_path, far))


def test_unknown_tensor_type(tmp_path, small):
    _, blob = small
    pos = _tensor_info_pos(blob) + 8 + 1 + 4 + 16
    assert struct.unpack("<I", blob[pos : pos + 4])[0] == GGMLQuantizationType.Q8_0
    with pytest.raises(CheckpointError, match="tensor 'w': unknown ggml type id 99"):
        G.GGUFFile(_bad(tmp_path, blob[:pos] + struct.pack("<I", 99) + blob[pos + 4 :]))


def test_tensor_count_larger_than_file(tmp_path, small):
    _, blob = small
    with pytest.raises(CheckpointError, match="tensor-info count"):
        G.GGUFFile(_bad(tmp_path, blob[:8] + struct.pack("<Q", 2**40) + blob[16:]))


def test_unknown_metadata_value_type(tmp_path, small):
    _, blob = small
    pos = 24 + 8 + 1
    with pytest.raises(CheckpointError, match="metadata 'k': unknown value type 77"):
        G.GGUFFile(_bad(tmp_path, blob[:pos] + struct.pack("<I", 77) + blob[pos + 4 :]))


def test_overlapping_tensors(tmp_path):
    path = tmp_path / "two.gguf"
    x = np.ones((2, 32), np.float32)
    with G.GGUFStreamWriter(
        path, [G.TensorSpec("a", x.shape, "Q8_0"), G.TensorSpec("b", x.shape, "Q8_0")]
    ) as w:
        w.write_tensor("a", x)
        w.write_tensor("b", x)
    blob = path.read_bytes()
    pos = 24 + (8 + 1 + 4 + 16 + 4 + 8) + (8 + 1 + 4 + 16 + 4)  # tensor b's offset field
    assert struct.unpack("<Q", blob[pos : pos + 8])[0] == 96
    with pytest.raises(
        CheckpointError, match=r"tensor 'b' starts at data offset 32, inside tensor 'a' .*expected 96"
    ):
        G.GGUFFile(_bad(tmp_path, blob[:pos] + struct.pack("<Q", 32) + blob[pos + 8 :]))
