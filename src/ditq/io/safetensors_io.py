"""Safetensors reading and writing, tensor by tensor.

`TensorSource` opens one file or a sharded set (`*.safetensors.index.json`) lazily: every header is parsed and
checked up front, at least as strictly as the safetensors library does (`safetensors_header`), so a truncated,
corrupt or inconsistent file is reported with its name before any work starts; a shard index must be valid JSON
whose `weight_map` names, for every tensor, a regular file inside the folder that holds it. Tensors are then read
one at a time with positioned reads. `StreamingSafetensorsWriter` writes a file whose tensor list is declared
first, then filled one tensor at a time, so converting a 9B-parameter model never holds more than one tensor in
memory; it writes to a temporary name and renames when complete.
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
from ditq.io.safetensors_header import (
    DTYPE_NAMES,
    DTYPES,
    TensorInfo,
    load_json,
    open_regular,
    read_header,
)

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "StreamingSafetensorsWriter",
    "TensorInfo",
    "TensorSource",
    "read_header",
    "read_shard_index",
    "save_safetensors",
]

log = logging.getLogger(__name__)
_MAX_INDEX = 100_000_000


def _link_root(folder: Path) -> Path:
    """Where symlinks of `folder` may point: the folder itself, or, in a Hugging Face cache snapshot
    (`models--org--name/snapshots/<rev>/...`, whose files link into `models--org--name/blobs/`), that repository."""
    parts = folder.absolute().parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return Path(*parts[: i + 1]).resolve()
    return folder.resolve()


def read_shard_index(index: Path) -> dict[str, Path]:
    """{tensor name: shard file} from a `*.safetensors.index.json`. Refuses, naming the index and the entry:
    unreadable or corrupt JSON, a `weight_map` that is not an object of strings, and a shard path that is absolute,
    climbs out of the index's folder (`..`), or is a symlink pointing outside it (a Hugging Face cache snapshot's
    links into its own `blobs/` are followed)."""
    index = Path(index)
    folder = index.parent
    root = _link_root(folder)
    fd = open_regular(index)
    try:
        size = os.fstat(fd).st_size
        if size > _MAX_INDEX:
            raise CheckpointError(f"{index}: shard index of {size} bytes is larger than {_MAX_INDEX}")
        raw = os.pread(fd, size, 0)
    except OSError as exc:
        raise CheckpointError(f"{index}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = load_json(index, raw, "shard index")
    if not isinstance(data, dict):
        raise CheckpointError(f"{index}: shard index is a JSON {type(data).__name__}, expected an object")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' is {type(weight_map).__name__}, expected an object")
    files: dict[str, Path] = {}
    shards: dict[str, Path] = {}
    for name, rel in weight_map.items():
        where = f"{index}: weight_map entry {name!r}"
        if not isinstance(rel, str) or not rel:
            raise CheckpointError(f"{where} is {rel!r}, expected a file name")
        if rel not in shards:
            p = Path(rel)
            if p.is_absolute() or ".." in p.parts:
                raise CheckpointError(f"{where}: shard path {rel!r} must be relative and inside {folder}")
            target = (folder / p).resolve()
            if not target.is_relative_to(root):
                raise CheckpointError(f"{where}: shard {rel!r} is a link to {target}, outside {folder}")
            if not target.exists():
                raise CheckpointError(f"{where}: lists shard {rel}, which is missing")
            shards[rel] = folder / p
        files[name] = shards[rel]
    return files


class TensorSource:
    """Read-only lazy access to the tensors of a component folder or a single safetensors file."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.path = path
        self.metadata: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        files, listed = self._files(path)
        for file in files:
            infos, metadata = read_header(file)
            for name in infos:
                if name in self._infos:
                    raise CheckpointError(f"{file}: tensor {name!r} also appears in {self._infos[name].file}")
            self._infos.update(infos)
            self.metadata.update(metadata)
        if listed is not None:
            self._check_index(listed)

    @staticmethod
    def _files(path: Path) -> tuple[list[Path], tuple[Path, dict[str, Path]] | None]:
        """The files to read, and (index, its weight_map) when the folder is sharded."""
        if not path.is_dir():
            if not os.path.lexists(path):
                raise CheckpointError(f"{path}: no such file or folder")
            return [path], None  # read_header refuses anything but a regular file
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(
                f"{path}: {len(indexes)} shard indexes ({', '.join(i.name for i in indexes)}); expected one"
            )
        if indexes:
            weight_map = read_shard_index(indexes[0])
            return sorted(set(weight_map.values())), (indexes[0], weight_map)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors file")
        return files, None

    def _check_index(self, listed: tuple[Path, dict[str, Path]]) -> None:
        """Every tensor sits in the shard the index names for it, and the index names every tensor."""
        index, weight_map = listed
        for name, file in weight_map.items():
            info = self._infos.get(name)
            if info is None:
                raise CheckpointError(f"{index}: weight_map entry {name!r}: {file.name} holds no such tensor")
            if info.file != file:
                raise CheckpointError(
                    f"{index}: weight_map entry {name!r} names {file.name}, but the tensor is in {info.file.name}"
                )
        unlisted = [n for n in self._infos if n not in weight_map]
        if unlisted:
            raise CheckpointError(
                f"{index}: {len(unlisted)} tensors of the shards are not in weight_map, e.g. {unlisted[0]!r} in "
                f"{self._infos[unlisted[0]].file.name}"
            )

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
            if raw.numel() and int(raw.max()) > 1:
                raise CheckpointError(
                    f"{info.file}: BOOL tensor {name!r} holds bytes other than 0 and 1: corrupt, or another dtype"
                )
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
                fd = self._fds[info.file] = open_regular(info.file)
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
