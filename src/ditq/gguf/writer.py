"""Streaming GGUF writer: declare every tensor and the metadata first, then hand over tensor data one at a time.

The header (metadata and tensor infos, with every offset) is written when the writer opens, so only one tensor's
bytes are in memory at a time. A file that declares a Q2_K, Q4_K or Q5_K tensor records the make_qkx3_quants rule
its encoder follows (`ditq.kquant_rule`, see `codec.KQUANT_RULES`), so it says which llama.cpp it matches. The file is written under a temporary name in the destination folder and renamed
into place by `close()`; if the writer is left by an exception, aborted, or dropped unclosed, the temporary file
is removed and no file appears at `path`.

    specs = [TensorSpec("layers.0.attention.qkv.weight", (9216, 3072), "Q4_K"), ...]
    with GGUFStreamWriter(path, specs, {"general.architecture": "ideogram"}) as w:
        for spec in specs:
            w.write_tensor(spec.name, weights[spec.name], imatrix=imatrices.get(spec.name))
"""

from __future__ import annotations

import os
import struct
import tempfile
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ditq.errors import ConfigError
from ditq.gguf import _format as fmt
from ditq.gguf.codec import DEFAULT_RULE, RULE_TYPES, quantize, resolve_qtype, resolve_rule, tensor_bytes

RULE_KEY = "ditq.kquant_rule"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, logical shape in numpy order (rows last), and storage type."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType | str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "qtype", resolve_qtype(self.qtype))
        if not self.name or len(self.name.encode("utf-8")) >= 64:
            raise ConfigError(f"tensor name {self.name!r} must be 1..63 bytes (GGML_MAX_NAME)")
        if not 1 <= len(self.shape) <= fmt.MAX_DIMS or any(d < 1 for d in self.shape):
            raise ConfigError(f"tensor {self.name!r}: shape {self.shape} must have 1..4 positive dimensions")

    @property
    def nbytes(self) -> int:
        try:
            return tensor_bytes(self.qtype, self.shape)
        except ConfigError as err:
            raise ConfigError(f"tensor {self.name!r}: {err}") from None


class _State(Enum):
    OPEN = "open"
    CLOSED = "closed"
    ABORTED = "aborted"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class GGUFStreamWriter:
    """Writes one GGUF file (version 3). States: open -> closed (renamed into place) or aborted (removed).

    rule: the make_qkx3_quants rule `write_tensor` encodes with; by default the one the metadata's
    `ditq.kquant_rule` names, else `DEFAULT_RULE`. It is recorded as `ditq.kquant_rule` when a Q2_K, Q4_K or Q5_K
    tensor is declared, unless record_rule is False (a copy of another tool's bytes through `write_raw`, which no
    rule of ditq's produced).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        tensors: Iterable[TensorSpec],
        metadata: Mapping[str, Any] | None = None,
        *,
        rule: str | None = None,
        record_rule: bool = True,
    ) -> None:
        self.path = Path(path)
        self.specs: dict[str, TensorSpec] = {}
        for spec in tensors:
            if spec.name in self.specs:
                raise ConfigError(f"tensor {spec.name!r} is declared twice")
            self.specs[spec.name] = spec
        metadata = dict(metadata or {})
        recorded = metadata.get(RULE_KEY)
        if recorded is not None and (not isinstance(recorded, str) or recorded != resolve_rule(recorded)):
            raise ConfigError(f"metadata {RULE_KEY!r} = {recorded!r}: expected a k-quant rule name")
        if rule is not None and recorded is not None and resolve_rule(rule) != recorded:
            raise ConfigError(f"rule {rule!r} contradicts metadata {RULE_KEY!r} = {recorded!r}")
        self.rule = resolve_rule(rule or recorded or DEFAULT_RULE)
        if record_rule and recorded is None and any(spec.qtype in RULE_TYPES for spec in self.specs.values()):
            metadata[RULE_KEY] = self.rule
        self.alignment = int(metadata.get(fmt.ALIGNMENT_KEY, fmt.DEFAULT_ALIGNMENT))
        if self.alignment < 1 or self.alignment & (self.alignment - 1):
            raise ConfigError(f"metadata {fmt.ALIGNMENT_KEY!r} = {self.alignment}: must be a power of two")
        if fmt.ALIGNMENT_KEY in metadata:
            metadata[fmt.ALIGNMENT_KEY] = np.uint32(self.alignment)

        header = bytearray(fmt.MAGIC + struct.pack("<IQQ", fmt.VERSION, len(self.specs), len(metadata)))
        for key, value in metadata.items():
            vtype = fmt.value_type(key, value)
            header += (
                fmt.encode_string(key) + struct.pack("<I", int(vtype)) + fmt.encode_value(key, value, vtype)
            )
        self.offsets: dict[str, int] = {}
        offset = 0
        for spec in self.specs.values():
            nbytes = spec.nbytes
            header += fmt.encode_string(spec.name) + struct.pack("<I", len(spec.shape))
            header += struct.pack(f"<{len(spec.shape)}Q", *reversed(spec.shape))
            header += struct.pack("<IQ", int(spec.qtype), offset)
            self.offsets[spec.name] = offset
            offset = fmt.align(offset + nbytes, self.alignment)
        self.data_start = fmt.align(len(header), self.alignment)
        self.file_size = self.data_start + offset
        header += bytes(self.data_start - len(header))

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".part")
        self._cleanup = weakref.finalize(self, _remove, self._tmp)
        self._file = os.fdopen(fd, "wb")
        self._written: set[str] = set()
        self._state = _State.OPEN
        try:
            self._file.write(header)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> GGUFStreamWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def pending(self) -> list[str]:
        """Declared tensors not written yet, in declaration order."""
        return [n for n in self.specs if n not in self._written]

    def write_tensor(self, name: str, array: np.ndarray, imatrix: np.ndarray | None = None) -> None:
        """Encode `array` (the declared logical shape, any real dtype) as the declared type and write it."""
        spec = self._spec(name)
        a = np.asarray(array)
        if tuple(a.shape) != spec.shape:
            raise ConfigError(f"tensor {name!r}: got shape {tuple(a.shape)}, declared {spec.shape}")
        self._write(spec, quantize(a, spec.qtype, imatrix, rule=self.rule))

    def write_raw(self, name: str, data: np.ndarray | bytes) -> None:
        """Write already-encoded bytes of tensor `name` (e.g. from `quantize`); their size must match."""
        spec = self._spec(name)
        self._write(spec, np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else data)

    def close(self) -> None:
        """Check every tensor was written, then move the file into place. Idempotent once closed."""
        if self._state is _State.CLOSED:
            return
        self._require_open()
        missing = self.pending
        if missing:
            self.abort()
            raise ConfigError(
                f"{self.path}: {len(missing)} declared tensors were never written: {missing[:5]}"
            )
        try:
            self._file.truncate(self.file_size)  # zero padding after the last tensor
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.chmod(self._tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._cleanup.detach()
        self._state = _State.CLOSED

    def abort(self) -> None:
        """Drop the partial file. Safe to call in any state; a closed file stays."""
        if self._state is not _State.OPEN:
            return
        self._state = _State.ABORTED
        self._file.close()
        self._cleanup()

    def _spec(self, name: str) -> TensorSpec:
        self._require_open()
        try:
            spec = self.specs[name]
        except KeyError:
            raise ConfigError(f"tensor {name!r} was not declared") from None
        if name in self._written:
            raise ConfigError(f"tensor {name!r} is written twice")
        return spec

    def _write(self, spec: TensorSpec, data: np.ndarray) -> None:
        if data.dtype != np.uint8 or data.nbytes != spec.nbytes:
            raise ConfigError(
                f"tensor {spec.name!r}: expected {spec.nbytes} bytes of {spec.qtype.name}, got {data.nbytes} "
                f"bytes of {data.dtype}"
            )
        try:
            self._file.seek(self.data_start + self.offsets[spec.name])
            self._file.write(np.ascontiguousarray(data).data)
        except BaseException:
            self.abort()
            raise
        self._written.add(spec.name)

    def _require_open(self) -> None:
        if self._state is not _State.OPEN:
            raise ConfigError(f"{self.path}: writer is {self._state.value}")
