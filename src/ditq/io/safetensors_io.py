"""Safetensors reading and writing, tensor by tensor.

`TensorSource` opens one file or a sharded set (`*.safetensors.index.json`) lazily: headers are parsed and checked
up front (a truncated or corrupt file is reported with its name before any work starts) and tensors are read one at a
time through a memory map. `StreamingSafetensorsWriter` writes a file whose tensor list is declared first, then
filled one tensor at a time, so converting a 9B-parameter model never holds more than one tensor in memory; it
writes to a temporary name and renames when complete.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ditq.errors import CheckpointError

log = logging.getLogger(__name__)

# safetensors dtype names <-> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class TensorInfo:
    __slots__ = ("name", "dtype", "shape", "file", "begin", "end")

    def __init__(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...], file: Path, begin: int, end: int
    ):
        self.name, self.dtype, self.shape, self.file, self.begin, self.end = (
            name,
            dtype,
            shape,
            file,
            begin,
            end,
        )

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def __repr__(self) -> str:
        return f"TensorInfo({self.name!r}, {self.dtype}, {self.shape})"


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one safetensors header: returns tensor infos and the `__metadata__` dict."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header claims {n} bytes, file has {size})"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (expected a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: tensor {name!r} has a malformed header entry: {entry!r}"
            ) from None
        expected = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} occupies {end - begin} bytes, expected {expected} for {dtype} {list(shape)}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, file has {size} bytes"
            )
        infos[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
    return infos, metadata


class TensorSource:
    """Read-only lazy access to the tensors of a component folder or a single safetensors file."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.path = path
        self.metadata: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        for file in self._files(path):
            infos, metadata = read_header(file)
            for name in infos:
                if name in self._infos:
                    raise CheckpointError(f"{file}: tensor {name!r} also appears in {self._infos[name].file}")
            self._infos.update(infos)
            self.metadata.update(metadata)

    @staticmethod
    def _files(path: Path) -> list[Path]:
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such file or folder")
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{indexes[0]}: corrupt shard index ({exc})") from None
            files = sorted({path / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{indexes[0]}: lists shard {f.name}, which is missing")
            return files
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors file")
        return files

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored, read with positioned reads (no memory map, so reading a whole checkpoint tensor
        by tensor does not grow the process's resident set towards the file size)."""
        info = self.info(name)
        buf = self.read_bytes(name, 0, info.nbytes)
        raw = torch.frombuffer(buf, dtype=torch.uint8) if info.nbytes else torch.empty(0, dtype=torch.uint8)
        if info.dtype == torch.bool:
            return raw.to(torch.bool).reshape(info.shape)
        return raw.view(info.dtype).reshape(info.shape)

    def read_bytes(self, name: str, offset: int, length: int) -> bytearray:
        """`length` stored bytes of tensor `name` starting `offset` bytes into it (e.g. a block of rows)."""
        info = self.info(name)
        if offset < 0 or offset + length > info.nbytes:
            raise CheckpointError(f"{info.file}: byte range {offset}+{length} is outside tensor {name!r}")
        buf = bytearray(length)
        if length:
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
            view = memoryview(buf)
            done = 0
            while done < length:
                n = os.preadv(fd, [view[done:]], info.begin + offset + done)
                if n <= 0:
                    raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
                done += n
        return buf

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())


class StreamingSafetensorsWriter:
    """Write a safetensors file one tensor at a time after declaring every tensor's dtype and shape.

    Use as a context manager; the file appears at `path` only when every declared tensor was written and the
    context exits cleanly, otherwise the temporary file is removed.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self._order = list(specs)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._spans: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        for name in self._order:
            dtype, shape = specs[name]
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._spans[name] = (offset, nbytes, dtype, tuple(shape))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._data_start = 8 + len(blob)
        self._header = struct.pack("<Q", len(blob)) + blob
        self._next = 0
        self._f = None

    def __enter__(self) -> StreamingSafetensorsWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.tmp, "wb")
        self._f.write(self._header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next declared tensor (tensors must come in declaration order)."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing more"
            raise CheckpointError(f"{self.path}: wrote {name!r} out of order; expected {expected}")
        _, nbytes, dtype, shape = self._spans[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, declared {dtype} {list(shape)}"
            )
        t = tensor.detach().cpu().clone(memory_format=torch.contiguous_format).reshape(-1)
        data = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
        self._f.write(data.numpy().tobytes())
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._f.close()
        if exc_type is None and self._next != len(self._order):
            missing = self._order[self._next]
            self.tmp.unlink(missing_ok=True)
            raise CheckpointError(f"{self.path}: closed before tensor {missing!r} was written")
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        os.replace(self.tmp, self.path)


def save_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
):
    """Write a dict of tensors atomically (temporary name, then rename)."""
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    with StreamingSafetensorsWriter(path, specs, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
