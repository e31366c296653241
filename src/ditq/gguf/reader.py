"""Checked GGUF reader: every count, type, length and offset is validated before anything is allocated or used.

The file is memory-mapped; `raw(name)` is a zero-copy view of a tensor's bytes and `dequantize(name)` decodes
it to float32. Opening raises `CheckpointError` naming the file, the field or tensor, and what was expected, for a
path that is not a regular file, a file that is not GGUF or of an unsupported version, a count, string or array
that does not fit in the file, an unknown value type, a duplicate key or tensor name, a tensor of a type ditq does
not load (`checks.LOADABLE_TYPES`; `supported_only=False` lists any type gguf-py knows, for inspection), a row
length that is not a whole number of blocks, or data offsets that break ggml's layout: tensors follow one another
in file order, each padded to the alignment, and the file ends with the last one's padding. The last rule is what
catches a type or shape that does not match a tensor's bytes. Block scales are checked per tensor on demand
(`check_scales`), since that reads the data. See `_format.py` for the layout.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ditq.errors import CheckpointError
from ditq.gguf import _format as fmt
from ditq.gguf.checks import LOADABLE_TYPES, check_block_scales, loadable_names
from ditq.gguf.codec import _CODECS, dequantize

MAX_NESTING = 8  # arrays of arrays


@dataclass(frozen=True)
class TensorInfo:
    """name; shape in numpy order (rows last); qtype; offset of its bytes from the start of the file; nbytes."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int
    nbytes: int


class _Cursor:
    """Reads little-endian fields from a byte buffer, raising CheckpointError at the end of the file."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, but the file ends at {len(self.buf)}"
            )
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def unpack(self, code: str, what: str) -> Any:
        (value,) = struct.unpack(code, self.take(struct.calcsize(code), what))
        return value

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"length of {what}")
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            etype = self.unpack("<I", f"element type of {what}")
            count = self.unpack("<Q", f"length of {what}")
            et = _value_type(etype)
            if et is None:
                raise self.fail(f"{what}: unknown array element type {etype}, expected 0..12 (GGUFValueType)")
            code = fmt.SCALAR_CODES.get(et)
            # the least an element takes: its fixed size, a string's length, an array's type and length
            least = struct.calcsize(code) if code else 8 if et == GGUFValueType.STRING else 12
            if count * least > len(self.buf) - self.pos:
                raise self.fail(
                    f"{what}: array of {count} {et.name} elements needs at least {count * least} bytes, but "
                    f"{len(self.buf) - self.pos} are left in the file"
                )
            if code is not None:  # fixed-size elements: one bounds check and one numpy read
                raw = self.take(count * struct.calcsize(code), what)
                return np.frombuffer(raw, np.dtype(code)).tolist()
            if et == GGUFValueType.ARRAY and depth >= MAX_NESTING:
                raise self.fail(f"{what}: arrays nested more than {MAX_NESTING} deep")
            return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]
        code = fmt.SCALAR_CODES.get(_value_type(vtype))
        if code is None:
            raise self.fail(f"{what}: unknown value type {vtype}, expected 0..12 (GGUFValueType)")
        return self.unpack(code, what)


def _value_type(v: int) -> GGUFValueType | None:
    try:
        return GGUFValueType(v)
    except ValueError:
        return None


class GGUFFile:
    """A validated, memory-mapped GGUF file.

    Attributes: path, version, alignment, metadata {key: value} (arrays as lists), metadata_types {key:
    GGUFValueType}, tensors {name: TensorInfo} in file order, data_start (byte offset of the data section).
    supported_only: refuse tensors of types ditq does not load (the default); False accepts any type gguf-py
    knows, for tools that only inspect or copy files.
    """

    def __init__(self, path: str | os.PathLike[str], *, supported_only: bool = True) -> None:
        self.path = Path(path)
        self.supported_only = supported_only
        try:
            st = os.stat(self.path)
        except OSError as err:
            raise CheckpointError(f"{self.path}: cannot open GGUF file: {err.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise CheckpointError(f"{self.path}: cannot open GGUF file: {kind}")
        size = st.st_size
        if size < 4 + 4 + 8 + 8:
            raise CheckpointError(
                f"{self.path}: truncated: {size} bytes is shorter than a GGUF header (24 bytes)"
            )
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{self.path}: cannot open GGUF file: {err}") from None
        cur = _Cursor(memoryview(self._map), self.path)

        magic = bytes(cur.take(4, "magic"))
        if magic != fmt.MAGIC:
            raise cur.fail(f"bad magic {magic!r}, expected {fmt.MAGIC!r}: not a GGUF file")
        self.version = cur.unpack("<I", "version")
        if self.version not in fmt.READABLE_VERSIONS:
            hint = " (a big-endian file?)" if self.version & 0xFFFF == 0 else ""
            raise cur.fail(
                f"unsupported GGUF version {self.version}{hint}, expected one of {fmt.READABLE_VERSIONS}"
            )
        n_tensors = cur.unpack("<Q", "tensor count")
        n_kv = cur.unpack("<Q", "metadata count")
        # every tensor info takes at least 8 + 4 + 8 + 4 + 8 bytes and every key/value at least 8 + 4 + 1
        if n_tensors * 32 > size:
            raise cur.fail(f"tensor-info count {n_tensors} is larger than a {size}-byte file can hold")
        if n_kv * 13 > size:
            raise cur.fail(f"metadata count {n_kv} is larger than a {size}-byte file can hold")

        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, GGUFValueType] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.unpack("<I", f"value type of metadata {key!r}")
            if _value_type(vtype) is None:
                raise cur.fail(
                    f"metadata {key!r}: unknown value type {vtype}, expected 0..12 (GGUFValueType)"
                )
            if key in self.metadata:
                raise cur.fail(f"metadata {key!r} appears twice")
            self.metadata[key] = cur.value(vtype, f"metadata {key!r}")
            self.metadata_types[key] = GGUFValueType(vtype)

        self.alignment = fmt.DEFAULT_ALIGNMENT
        if fmt.ALIGNMENT_KEY in self.metadata:
            a = self.metadata[fmt.ALIGNMENT_KEY]
            if self.metadata_types[fmt.ALIGNMENT_KEY] != GGUFValueType.UINT32 or a < 1 or a & (a - 1):
                raise cur.fail(f"metadata {fmt.ALIGNMENT_KEY!r} = {a!r}: expected a UINT32 power of two")
            self.alignment = int(a)

        infos = []
        for i in range(n_tensors):
            name = cur.string(f"name of tensor #{i}")
            n_dims = cur.unpack("<I", f"tensor {name!r} dimension count")
            if not 1 <= n_dims <= fmt.MAX_DIMS:
                raise cur.fail(f"tensor {name!r}: {n_dims} dimensions, expected 1..{fmt.MAX_DIMS}")
            ne = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims, f"tensor {name!r} dimensions"))
            type_id = cur.unpack("<I", f"tensor {name!r} type")
            offset = cur.unpack("<Q", f"tensor {name!r} offset")
            infos.append((name, ne, type_id, offset))
        self.data_start = fmt.align(cur.pos, self.alignment)

        self.tensors: dict[str, TensorInfo] = {}
        expected = 0  # ggml's rule: each tensor starts where the previous one's padding ends
        previous: TensorInfo | None = None
        for name, ne, type_id, offset in infos:
            info = self._check_tensor(name, ne, type_id, offset, size)
            if offset != expected:
                where = (
                    f", inside tensor {previous.name!r} (data offsets [{previous.offset - self.data_start}, "
                    f"{previous.offset - self.data_start + previous.nbytes}))"
                    if previous is not None and offset < expected
                    else ""
                )
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} starts at data offset {offset}{where}; expected {expected} "
                    f"(tensors follow one another in file order, each padded to {self.alignment} bytes): corrupt "
                    "offsets, or a type or shape that does not match the data"
                )
            self.tensors[name] = info
            previous = info
            expected = fmt.align(offset + info.nbytes, self.alignment)
        if infos and size > self.data_start + expected:
            raise CheckpointError(
                f"{self.path}: {size - self.data_start - expected} bytes after the padded end of the last tensor "
                f"{previous.name!r}: its type or shape does not match the data, or the file is corrupt"
            )

    def _check_tensor(
        self, name: str, ne: tuple[int, ...], type_id: int, offset: int, size: int
    ) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if name in self.tensors:
            raise CheckpointError(f"{where} appears twice")
        known = fmt.qtype_sizes(type_id)
        if known is None:
            raise CheckpointError(
                f"{where}: unknown ggml type id {type_id}, expected a GGMLQuantizationType; ditq loads "
                f"{loadable_names()}"
            )
        qtype, block, type_size = known
        if self.supported_only and qtype not in LOADABLE_TYPES:
            raise CheckpointError(
                f"{where} is {qtype.name}, a type ditq does not load; it loads {loadable_names()}"
            )
        if any(d < 1 or d >= 2**40 for d in ne):
            raise CheckpointError(f"{where}: dimensions {list(ne)} must be positive and < 2**40")
        if ne[0] % block:
            raise CheckpointError(
                f"{where}: row length {ne[0]} is not a multiple of the {qtype.name} block {block}"
            )
        if offset % self.alignment:
            raise CheckpointError(
                f"{where}: data offset {offset} is not a multiple of the alignment {self.alignment}"
            )
        nbytes = int(np.prod(ne[1:], dtype=object)) * (ne[0] // block) * type_size
        start = self.data_start + offset
        if start + nbytes > size:
            raise CheckpointError(
                f"{where}: data [{start}, {start + nbytes}) lies past the end of the file ({size} bytes): "
                "truncated or corrupt offset"
            )
        return TensorInfo(name, tuple(reversed(ne)), qtype, start, nbytes)

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the reader's mapping (views handed out keep theirs alive)."""
        self._map = None  # type: ignore[assignment]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy uint8 view (rows, row_bytes) of the tensor's stored bytes; rows = prod(shape[:-1])."""
        t = self.info(name)
        if self._map is None:
            raise CheckpointError(f"{self.path}: reader is closed")
        rows = int(np.prod(t.shape[:-1], dtype=np.int64))
        return self._map[t.offset : t.offset + t.nbytes].reshape(rows, -1)

    def check_scales(self, name: str) -> None:
        """Raise CheckpointError if a block scale (or, for F32 / F16 / BF16, a value) of tensor `name` is NaN or
        Inf. Reads only the scale fields: vectorised numpy over a strided view of the mapping."""
        t = self.info(name)
        check_block_scales(self.raw(name), t.qtype, f"{self.path}: tensor {name!r}", t.shape[-1])

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor decoded to float32, in its logical shape."""
        t = self.info(name)
        data = self.raw(name)
        if t.qtype in _CODECS:
            out = dequantize(data, t.qtype)
        else:  # a type ditq does not encode (IQ*, ...): gguf-py decodes it like ggml
            out = np.asarray(gguf.quants.dequantize(np.asarray(data), t.qtype), dtype=np.float32)
        return out.reshape(t.shape)
