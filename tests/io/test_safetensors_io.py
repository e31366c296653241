"""The safetensors reader: every header mutation the library refuses is refused with a message naming the file and
the tensor or field; valid files read exactly as the safetensors library reads them."""

from __future__ import annotations

import json
import os
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ditq.errors import CheckpointError
from ditq.io.safetensors_io import TensorSource, read_header, read_shard_index, save_safetensors

A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
B = {"dtype": "F16", "shape": [2, 1], "data_offsets": [8, 12]}


def _file(path: Path, header: dict | str, data: int | bytes, pad: bytes = b" ") -> Path:
    """A safetensors file with the given header (a dict, or raw JSON text) and data (bytes, or a count of zeros)."""
    text = header if isinstance(header, str) else json.dumps(header)
    blob = text.encode()
    blob += pad * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + (bytes(data) if isinstance(data, int) else data))
    return path


def _library_refuses(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="numpy"):
            return False
    except Exception:  # noqa: BLE001 - any refusal
        return True


@pytest.fixture
def bad(tmp_path) -> Path:
    return tmp_path / "bad.safetensors"


# ---- each mutation of the header ---------------------------------------------------------------------------

MUTATIONS = {  # header, data length, expected phrase (after "<file>: ")
    "negative offset": (
        {"a": {**A, "data_offsets": [-8, 0]}},
        8,
        r"tensor 'a': data_offsets \[-8, 0\] is not two non-negative integers",
    ),
    "begin after end": (
        {"a": {**A, "data_offsets": [8, 0]}},
        8,
        r"tensor 'a': data_offsets \[8, 0\] begin after",
    ),
    "overlap": (
        {"a": A, "b": {**A, "data_offsets": [4, 12]}},
        12,
        r"tensor 'b' at data_offsets \[4, 12\] overlaps tensor 'a' \(which ends at 8\)",
    ),
    "gap": (
        {"a": A, "b": {**B, "data_offsets": [12, 16]}},
        16,
        r"tensor 'b' at data_offsets \[12, 16\] leaves a gap of 4 bytes after tensor 'a'",
    ),
    "first not at 0": ({"a": {**A, "data_offsets": [4, 12]}}, 12, r"tensor 'a' .* leaves a gap of 4 bytes;"),
    "data longer": ({"a": A, "b": B}, 20, r"8 bytes after the last tensor's data: the header describes 12"),
    "data shorter": (
        {"a": A, "b": B},
        10,
        r"truncated: the header describes 12 bytes of data, the file holds 10",
    ),
    "unknown dtype": (
        {"a": {**A, "dtype": "F99"}},
        8,
        r"tensor 'a': unknown dtype 'F99'; expected one of F64, F32",
    ),
    "sub-byte dtype": ({"a": {**A, "dtype": "F4"}}, 8, r"tensor 'a': dtype F4 packs values below one byte"),
    "dtype not a string": ({"a": {**A, "dtype": 7}}, 8, r"tensor 'a': dtype 7 is not a string"),
    "size does not match dtype": (
        {"a": {**A, "dtype": "F16"}},
        8,
        r"tensor 'a' occupies 8 bytes, expected 4 for F16 \[2\]",
    ),
    "duplicate name": (
        '{"a": ' + json.dumps(A) + ', "a": ' + json.dumps({**A, "data_offsets": [8, 16]}) + "}",
        16,
        r"key 'a' appears twice in the safetensors header",
    ),
    "duplicate metadata key": (
        '{"__metadata__": {"k": "1", "k": "2"}, "a": ' + json.dumps(A) + "}",
        8,
        r"key 'k' appears twice in the safetensors header",
    ),
    "non-string metadata": (
        {"__metadata__": {"format": "pt", "step": 3}, "a": A},
        8,
        r"__metadata__ 'step' is a int \(3\), expected a string",
    ),
    "metadata not an object": (
        {"__metadata__": ["pt"], "a": A},
        8,
        r"__metadata__ is a list, expected an object",
    ),
    "deep nesting": (
        '{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": %s}}' % ("[" * 5000 + "]" * 5000),
        8,
        r"safetensors header nests 5002 levels deep \(at most 64 are read\)",
    ),
    "negative shape": (
        {"a": {**A, "shape": [-2]}},
        8,
        r"tensor 'a': shape \[-2\] is not a list of non-negative",
    ),
    "overflowing shape": (
        {"a": {**A, "shape": [2**32, 2**32, 4], "data_offsets": [0, 0]}},
        0,
        r"tensor 'a': shape \[4294967296, 4294967296, 4\] overflows 64 bits",
    ),
    "float shape": ({"a": {**A, "shape": [2.0]}}, 8, r"tensor 'a': shape \[2\.0\] is not a list"),
    "bool shape": ({"a": {**A, "shape": [True, True]}}, 8, r"tensor 'a': shape \[True, True\] is not a list"),
    "three offsets": (
        {"a": {**A, "data_offsets": [0, 8, 8]}},
        8,
        r"tensor 'a': data_offsets \[0, 8, 8\] is not two",
    ),
    "missing field": (
        {"a": {"dtype": "F32", "shape": [2]}},
        8,
        r"tensor 'a': header entry has no 'data_offsets'",
    ),
    "entry not an object": ({"a": [1, 2]}, 8, r"tensor 'a': header entry is a list, expected an object"),
    "header a list": ("[1, 2]", 0, r"corrupt safetensors header \(a JSON list, expected an object\)"),
    "not JSON": ('{"a": ', 8, r"corrupt safetensors header \(not JSON"),
    "NaN literal": (
        '{"__metadata__": {"k": NaN}, "a": ' + json.dumps(A) + "}",
        8,
        r"corrupt safetensors header \(not JSON: NaN is not JSON\)",
    ),
}


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_header_mutation_is_refused_with_its_reason(bad, case):
    header, data_len, phrase = MUTATIONS[case]
    path = _file(bad, header, data_len)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: " + phrase):
        read_header(path)
    with pytest.raises(CheckpointError, match=phrase):
        TensorSource(path)
    # every refusal here is one the library makes too, except the two it lets through silently
    assert _library_refuses(path) or case in ("duplicate metadata key", "sub-byte dtype")


def test_header_not_utf8(bad):
    blob = b'{"\xff": 1}      '
    bad.write_bytes(struct.pack("<Q", len(blob)) + blob)
    path = bad
    with pytest.raises(
        CheckpointError, match=r"bad\.safetensors: corrupt safetensors header: not UTF-8 at byte"
    ):
        read_header(path)


def test_what_only_the_library_refuses_is_refused_through_it(bad):
    path = _file(bad, '{"\\ud800": ' + json.dumps(A) + "}", 8)  # a lone surrogate: Python's json accepts it
    with pytest.raises(
        CheckpointError, match=r"bad\.safetensors: the safetensors library refuses it: .*hex escape"
    ):
        read_header(path)


@pytest.mark.parametrize(
    ("cut", "phrase"),
    [
        (5, r"truncated safetensors file \(5 bytes, no header\)"),
        (20, r"corrupt or truncated safetensors file \(header claims \d+ bytes, file has 20;"),
        (-3, r"truncated: the header describes 12 bytes of data, the file holds 9"),
    ],
)
def test_truncated_file(bad, cut, phrase):
    full = _file(bad, {"a": A, "b": B}, 12).read_bytes()
    bad.write_bytes(full[:cut])
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: " + phrase):
        TensorSource(bad)


def test_header_size_above_the_library_limit(bad):
    bad.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    with pytest.raises(CheckpointError, match="header claims 100000001 bytes.*at most 100000000"):
        read_header(bad)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading a FIFO blocked"))
    signal.alarm(10)
    try:
        for source in (fifo, tmp_path):  # the file itself, and a folder whose *.safetensors is the FIFO
            with pytest.raises(
                CheckpointError, match=r"weights\.safetensors: cannot read it as a safetensors file: a FIFO"
            ):
                TensorSource(source)
    finally:
        signal.alarm(0)


def test_folder_given_as_a_file_and_missing_path(tmp_path):
    folder = tmp_path / "model.safetensors"
    folder.mkdir()
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: cannot read it as a safetensors file: a folder"
    ):
        read_header(folder)
    with pytest.raises(CheckpointError, match=r"nothing\.safetensors: no such file or folder"):
        TensorSource(tmp_path / "nothing.safetensors")


# ---- what is valid reads as the library reads it ----------------------------------------------------------------


def test_reads_files_written_by_the_library_and_by_ditq_identically(tmp_path):
    tensors = {
        "w": torch.randn(3, 5),
        "w8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "bias": torch.randn(5).to(torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "mask": torch.tensor([True, False, True]),
        "idx": torch.tensor([1, 2, 65535], dtype=torch.int32).to(torch.uint16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    save_file(tensors, tmp_path / "lib.safetensors", metadata={"format": "pt"})
    save_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    for name in ("lib", "ours"):
        path = tmp_path / f"{name}.safetensors"
        reference = load_file(path)
        source = TensorSource(path)
        assert source.metadata == {"format": "pt"}
        assert list(source.keys()) == list(reference) or set(source.keys()) == set(reference)
        for key, ref in reference.items():
            got = source.get(key)
            assert got.dtype == ref.dtype and got.shape == ref.shape, key
            assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), key


def test_bool_tensor_with_other_bytes_is_refused_when_read(bad):
    header = {"mask": {"dtype": "BOOL", "shape": [2, 2], "data_offsets": [0, 4]}}
    path = _file(bad, header, bytes([0, 1, 2, 1]))
    source = TensorSource(path)
    with pytest.raises(
        CheckpointError, match=r"bad\.safetensors: BOOL tensor 'mask' holds bytes other than 0 and 1"
    ):
        source.get("mask")


def test_accepts_what_the_library_accepts(tmp_path):
    cases = {
        "extra field": {"a": {**A, "comment": "x"}},
        "null metadata": {"__metadata__": None, "a": A},
        "empty": {},
        "zero-size first": {"z": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": A},
    }
    for name, header in cases.items():
        path = _file(tmp_path / f"{name}.safetensors", header, 8 if header else 0)
        assert not _library_refuses(path), name
        infos, _ = read_header(path)
        assert set(infos) == set(header) - {"__metadata__"}, name


# ---- shard indexes ------------------------------------------------------------------------------------------------


def _sharded(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / "m-1.safetensors", {"a": torch.ones(2), "b": torch.zeros(3)})
    save_safetensors(folder / "m-2.safetensors", {"c": torch.arange(4.0)})
    index = folder / "m.safetensors.index.json"
    index.write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {"a": "m-1.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"},
            }
        )
    )
    return index


def _set_map(index: Path, **entries) -> None:
    data = json.loads(index.read_text())
    data["weight_map"].update(entries)
    index.write_text(json.dumps(data))


def test_sharded_folder_reads(tmp_path):
    index = _sharded(tmp_path / "m")
    source = TensorSource(index.parent)
    assert sorted(source.keys()) == ["a", "b", "c"] and torch.equal(source.get("c"), torch.arange(4.0))


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        ('{"weight_map": {"a": "m-1.safetensors"', r"corrupt shard index \(not JSON"),
        ('["m-1.safetensors"]', r"shard index is a JSON list, expected an object"),
        ('{"weight_map": ["m-1.safetensors"]}', r"'weight_map' is list, expected an object"),
        ('{"metadata": {}}', r"'weight_map' is NoneType, expected an object"),
        ('{"weight_map": {"a": 3}}', r"weight_map entry 'a' is 3, expected a file name"),
        ('{"weight_map": {"a": "m-1.safetensors", "a": "m-2.safetensors"}}', r"key 'a' appears twice"),
    ],
)
def test_corrupt_or_wrongly_typed_index(tmp_path, content, phrase):
    index = _sharded(tmp_path / "m")
    index.write_text(content)
    with pytest.raises(CheckpointError, match=r"m\.safetensors\.index\.json: " + phrase):
        TensorSource(index.parent)


def test_index_paths_must_stay_in_the_folder(tmp_path):
    index = _sharded(tmp_path / "m")
    outside = tmp_path / "elsewhere.safetensors"
    save_safetensors(outside, {"a": torch.ones(2)})
    cases = {
        str(
            outside
        ): r"weight_map entry 'a': shard path '.*elsewhere\.safetensors' must be relative and inside",
        "../elsewhere.safetensors": r"weight_map entry 'a': shard path '\.\./elsewhere\.safetensors' must be relative",
    }
    for target, phrase in cases.items():
        _sharded(tmp_path / "m")
        _set_map(index, a=target)
        with pytest.raises(CheckpointError, match=r"m\.safetensors\.index\.json: " + phrase):
            TensorSource(index.parent)
    _sharded(tmp_path / "m")
    (index.parent / "link.safetensors").symlink_to(outside)
    _set_map(index, a="link.safetensors")
    with pytest.raises(
        CheckpointError, match=r"weight_map entry 'a': shard 'link\.safetensors' is a link to .*outside"
    ):
        read_shard_index(index)


def test_hugging_face_cache_links_into_blobs_are_followed(tmp_path):
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / "abc123" / "transformer"
    index = _sharded(snapshot)
    (repo / "blobs").mkdir(parents=True)
    for shard in ("m-1.safetensors", "m-2.safetensors"):
        blob = repo / "blobs" / shard.replace(".safetensors", "")
        (snapshot / shard).rename(blob)
        (snapshot / shard).symlink_to(os.path.relpath(blob, snapshot))
    assert sorted(TensorSource(index.parent).keys()) == ["a", "b", "c"]


def test_index_must_agree_with_the_shards(tmp_path):
    index = _sharded(tmp_path / "m")
    _set_map(index, d="m-2.safetensors")
    with pytest.raises(CheckpointError, match=r"weight_map entry 'd': m-2\.safetensors holds no such tensor"):
        TensorSource(index.parent)
    index = _sharded(tmp_path / "m")
    _set_map(index, b="m-2.safetensors")
    with pytest.raises(
        CheckpointError, match=r"weight_map entry 'b' names m-2\.safetensors, but the tensor is in m-1"
    ):
        TensorSource(index.parent)
    index = _sharded(tmp_path / "m")
    data = json.loads(index.read_text())
    del data["weight_map"]["b"]
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"1 tensors of the shards are not in weight_map, e\.g\. 'b'"):
        TensorSource(index.parent)
    index = _sharded(tmp_path / "m")
    _set_map(index, a="m-3.safetensors")
    with pytest.raises(
        CheckpointError, match=r"weight_map entry 'a': lists shard m-3\.safetensors, which is missing"
    ):
        TensorSource(index.parent)


def test_two_indexes_are_refused(tmp_path):
    index = _sharded(tmp_path / "m")
    (index.parent / "other.safetensors.index.json").write_text(index.read_text())
    with pytest.raises(CheckpointError, match=r"2 shard indexes \(m\.safetensors\.index\.json, other"):
        TensorSource(index.parent)
