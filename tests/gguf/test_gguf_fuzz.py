"""Seeded fuzz of GGUFFile: every mutant of a valid file (counts, lengths, types, dims, offsets, bytes) either
opens and decodes exactly as gguf-py decodes it, or is refused with ditq's own error; no other exception escapes."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

import ditq.gguf as G
from ditq.errors import DitqError

SEED = 2024
N_MUTANTS = 1500
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes


def _base(path: Path) -> bytes:
    rng = np.random.default_rng(0)
    tensors = {
        "layers.0.attention.qkv.weight": (rng.standard_normal((4, 64), dtype=np.float32), "Q8_0"),
        "layers.0.feed_forward.w1.weight": (rng.standard_normal((2, 256), dtype=np.float32), "Q4_K"),
        "layers.0.attention.o.weight": (rng.standard_normal((1, 256), dtype=np.float32), "Q6_K"),
        "t_embedding.mlp_in.weight": (rng.standard_normal((3, 5), dtype=np.float32), "F16"),
        "layers.0.ffn_norm1.weight": (rng.standard_normal(7, dtype=np.float32), "F32"),
        "final_layer.linear.weight": (rng.standard_normal((2, 2), dtype=np.float32), "BF16"),
    }
    metadata = {
        "general.architecture": "ideogram",
        "general.quantization_version": np.uint32(2),
        "ditq.ratio": 0.5,
        "ditq.flag": True,
        "ditq.big": 2**40,
        "ditq.names": ["a", "bé", ""],
        "ditq.sizes": np.array([1, 2, 3], dtype=np.uint64),
    }
    specs = [G.TensorSpec(n, a.shape, q) for n, (a, q) in tensors.items()]
    with G.GGUFStreamWriter(path, specs, metadata) as w:
        for n, (a, _) in tensors.items():
            w.write_tensor(n, a)
    return path.read_bytes()


def _fields(blob: bytes) -> list[tuple[int, int, str]]:
    """(position, size, kind) of every integer field of a well-formed GGUF header: counts, string and array
    lengths, value and element types, dimension counts, dimensions, tensor types and offsets."""
    out: list[tuple[int, int, str]] = [(8, 8, "n_tensors"), (16, 8, "n_kv")]
    n_tensors, n_kv = struct.unpack("<QQ", blob[8:24])
    pos = 24

    def string(kind: str) -> None:
        nonlocal pos
        out.append((pos, 8, kind))
        pos += 8 + struct.unpack("<Q", blob[pos : pos + 8])[0]

    def value(vtype: int) -> None:
        nonlocal pos
        if vtype == GGUFValueType.STRING:
            string("string length")
        elif vtype == GGUFValueType.ARRAY:
            etype, count = struct.unpack("<IQ", blob[pos : pos + 12])
            out.extend([(pos, 4, "element type"), (pos + 4, 8, "array length")])
            pos += 12
            for _ in range(count):
                value(etype)
        else:
            pos += _FIXED[vtype]

    for _ in range(n_kv):
        string("key length")
        out.append((pos, 4, "value type"))
        vtype = struct.unpack("<I", blob[pos : pos + 4])[0]
        pos += 4
        value(vtype)
    for _ in range(n_tensors):
        string("name length")
        n_dims = struct.unpack("<I", blob[pos : pos + 4])[0]
        out.append((pos, 4, "n_dims"))
        out.extend((pos + 4 + 8 * d, 8, "dim") for d in range(n_dims))
        pos += 4 + 8 * n_dims
        out.extend([(pos, 4, "tensor type"), (pos + 4, 8, "offset")])
        pos += 12
    return out


def _interesting(rng: random.Random, old: int, size: int, kind: str) -> int:
    top = 2 ** (8 * size)
    if kind == "tensor type" and rng.random() < 0.7:
        return int(rng.choice(list(GGMLQuantizationType)))
    if kind in ("value type", "element type") and rng.random() < 0.7:
        return rng.randrange(14)
    choices = [0, 1, old + 1, old - 1, old * 2, old + 32, old - 32, top - 1, top // 2, 2**31, 2**40, 3, 256]
    return rng.choice(choices) % top


def _mutate(rng: random.Random, blob: bytes, fields: list[tuple[int, int, str]]) -> bytes:
    b = bytearray(blob)
    choice = rng.randrange(10)
    if choice < 6:  # one or two header fields
        for _ in range(1 + (rng.random() < 0.3)):
            pos, size, kind = rng.choice(fields)
            old = int.from_bytes(b[pos : pos + size], "little")
            b[pos : pos + size] = _interesting(rng, old, size, kind).to_bytes(size, "little")
    elif choice == 6:
        for _ in range(rng.randrange(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif choice == 7:
        b = b[: rng.randrange(len(b))]
    elif choice == 8:
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 8, 32])))
    else:  # a block scale to NaN / Inf in the data section
        i = rng.randrange(len(b) // 2, len(b) - 1)
        b[i : i + 2] = struct.pack("<H", rng.choice([0x7E00, 0x7C00, 0xFC00]))
    return bytes(b)


def _same_as_gguf_py(path: Path, f: G.GGUFFile) -> None:
    reader = gguf.GGUFReader(path)  # ditq accepted it: gguf-py must read it, to the same tensors
    theirs = {t.name: t for t in reader.tensors}
    assert list(theirs) == list(f.tensors)
    for name, info in f.tensors.items():
        t = theirs[name]
        assert t.tensor_type == info.qtype and tuple(reversed(t.shape.tolist())) == info.shape, name
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), f.raw(name).reshape(-1)), name
        try:
            f.check_scales(name)
        except DitqError:
            continue
        ours = f.dequantize(name)
        ref = np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), np.float32)
        assert np.array_equal(ours.reshape(-1), ref.reshape(-1)), name


def test_mutants_decode_as_gguf_py_decodes_them_or_raise_ditq_errors(tmp_path):
    rng = random.Random(SEED)
    base = _base(tmp_path / "base.gguf")
    fields = _fields(base)
    assert {k for _, _, k in fields} >= {"n_tensors", "n_kv", "array length", "dim", "tensor type", "offset"}
    outcomes = {"accepted": 0, "refused": 0}
    for i in range(N_MUTANTS):
        path = tmp_path / f"m{i % 8}.gguf"
        path.write_bytes(_mutate(rng, base, fields))
        try:
            f = G.GGUFFile(path)
        except DitqError:
            outcomes["refused"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"mutant {i}: {type(exc).__name__}: {exc}") from exc
        outcomes["accepted"] += 1
        with f:
            _same_as_gguf_py(path, f)
    assert outcomes["refused"] > N_MUTANTS // 2 and outcomes["accepted"] > 50, outcomes
