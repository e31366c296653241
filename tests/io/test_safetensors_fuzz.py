"""Seeded fuzz of the safetensors reader: every mutant of a valid file either reads exactly as the safetensors
library reads it, or is refused with ditq's own error; no other exception escapes."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

from ditq.errors import DitqError
from ditq.io.safetensors_io import TensorSource, save_safetensors

SEED = 14
N_MUTANTS = 2000
DTYPES = [
    "F64",
    "F32",
    "F16",
    "BF16",
    "F8_E4M3",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "BOOL",
    "U16",
    "F4",
    "X9",
    "",
]


def _base(path: Path) -> bytes:
    tensors = {
        "layers.0.attention.qkv.weight": torch.randn(6, 4).to(torch.float8_e4m3fn),
        "layers.0.attention.qkv.weight_scale": torch.rand(6),
        "layers.0.attention_norm1.weight": torch.randn(4).to(torch.bfloat16),
        "empty": torch.zeros(0, 2),
        "mask": torch.tensor([True, False]),
        "step": torch.tensor(7, dtype=torch.int64),
    }
    save_safetensors(path, tensors, {"format": "pt", "ditq.recipe": '{"name": "int8"}'})
    return path.read_bytes()


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header_text: str, data: bytes) -> bytes:
    raw = header_text.encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _mutate_field(rng: random.Random, header: dict, data: bytes) -> bytes:
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    choice = rng.randrange(12)
    if choice == 0:
        entry["dtype"] = rng.choice(DTYPES)
    elif choice == 1:
        entry["shape"] = [rng.choice([0, 1, 2, 3, 6, -1, 2**33, 2**64]) for _ in range(rng.randrange(4))]
    elif choice == 2:
        i = rng.randrange(2)
        entry["data_offsets"][i] += rng.choice([-9, -1, 1, 2, 8, 1000, -(2**40)])
    elif choice == 3:
        entry["data_offsets"] = rng.choice([[0], [0, 0, 0], "0-8", None, [True, 8], [0.0, 8.0]])
    elif choice == 4:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif choice == 5:
        header["__metadata__"] = rng.choice([{"k": 1}, ["pt"], None, {"k": None}, {"k": {"x": "y"}}, "pt"])
    elif choice == 6:
        header[name] = rng.choice([[], "x", 3, None, {"nested": entry}])
    elif choice == 7:  # swap two tensors' offsets (sizes then disagree unless equal)
        other = header[rng.choice(names)]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif choice == 8:  # duplicate a key in the JSON text
        text = json.dumps(header)
        dup = json.dumps({name: entry})[1:-1]
        return _join(text[:-1] + ", " + dup + "}", data)
    elif choice == 9:  # deep nesting in an extra field
        depth = rng.choice([3, 60, 70, 3000])
        text = json.dumps(header)
        return _join(text[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}", data)
    elif choice == 10:
        header[name + "_copy"] = dict(entry)
    else:
        data = (
            data + bytes(rng.randrange(1, 20)) if rng.random() < 0.5 else data[: rng.randrange(len(data) + 1)]
        )
    return _join(json.dumps(header), data)


def _mutate_bytes(rng: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    choice = rng.randrange(4)
    if choice == 0:  # flip bytes, mostly in the length prefix and the header
        for _ in range(rng.randrange(1, 6)):
            i = rng.randrange(min(len(b), 8 + 400)) if rng.random() < 0.8 else rng.randrange(len(b))
            b[i] = rng.randrange(256)
    elif choice == 1:
        b = b[: rng.randrange(len(b))]
    elif choice == 2:
        b[0:8] = struct.pack("<Q", rng.choice([0, 1, 7, 2**31, 2**63, 100_000_001, len(b)]))
    else:
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    return bytes(b)


def _same_as_library(path: Path, source: TensorSource) -> None:
    reference = load_file(path)  # ditq accepted it, so the library must read it, and to the same tensors
    assert set(source.keys()) == set(reference)
    for key, ref in reference.items():
        got = source.get(key)
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), key


def test_mutants_read_as_the_library_reads_them_or_raise_ditq_errors(tmp_path):
    rng = random.Random(SEED)
    base = _base(tmp_path / "base.safetensors")
    outcomes = {"accepted": 0, "refused": 0}
    for i in range(N_MUTANTS):
        if rng.random() < 0.6:
            header, data = _split(base)
            blob = _mutate_field(rng, header, data)
        else:
            blob = _mutate_bytes(rng, base)
        path = tmp_path / f"m{i % 8}.safetensors"
        path.write_bytes(blob)
        try:
            source = TensorSource(path)
            for key in source.keys():
                source.get(key)
        except DitqError:
            outcomes["refused"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"mutant {i}: {type(exc).__name__}: {exc}") from exc
        outcomes["accepted"] += 1
        _same_as_library(path, source)
        source.close()
    # the fuzz exercises both sides
    assert outcomes["refused"] > N_MUTANTS // 2 and outcomes["accepted"] > 10, outcomes
