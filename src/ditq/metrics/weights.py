"""Pinning metric weights: the sha256 of every weight file a metric loads, and the check against expected hashes.

A benchmark number is only comparable with another one if both came from the same metric weights. `ditq eval`
records, for each metric that reads weight files (CLIP score, PickScore, HPSv2, LPIPS), every file's name, path,
size and sha256 in metrics.json (the report shows them), and `ditq eval --expect-hash METRIC=SHA256` refuses to
score with any other file. A metric with several files (LPIPS: the AlexNet backbone and the lin layers; sharded
checkpoints) takes one `--expect-hash` per file: the files' hashes must be exactly the expected set.

Hashes are computed in 8 MiB chunks and reused from an earlier metrics.json entry when the file's path, size
and modification time are unchanged, so a resumed evaluation does not hash gigabytes again.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ditq.errors import ConfigError

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8 << 20


@dataclass(frozen=True)
class WeightFile:
    """One weight file a metric read: file name, absolute path, size, modification time and sha256."""

    file: str
    path: str
    bytes: int
    mtime_ns: int
    sha256: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_weights(paths: Sequence[Path], previous: Iterable[Mapping[str, object]] = ()) -> list[WeightFile]:
    """WeightFile records for `paths`; a previous record with the same path, size and mtime is reused."""
    known = {}
    for entry in previous:
        try:
            known[(str(entry["path"]), int(entry["bytes"]), int(entry["mtime_ns"]))] = str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            continue
    out = []
    for path in paths:
        resolved = Path(path).resolve()
        try:
            stat = resolved.stat()
        except OSError as exc:
            raise ConfigError(f"cannot read weight file {resolved}: {exc.strerror or exc}") from None
        key = (str(resolved), stat.st_size, stat.st_mtime_ns)
        digest = known.get(key) or sha256_file(resolved)
        out.append(WeightFile(resolved.name, str(resolved), stat.st_size, stat.st_mtime_ns, digest))
    return out


def parse_expected_hashes(specs: Iterable[str]) -> dict[str, set[str]]:
    """`["lpips=ab12...", "clip_score=cd34..."]` -> {metric: {sha256, ...}}; bad entries raise ConfigError."""
    expected: dict[str, set[str]] = {}
    for spec in specs:
        name, sep, digest = spec.partition("=")
        name, digest = name.strip(), digest.strip().lower()
        if not sep or not name or not _SHA256.fullmatch(digest):
            raise ConfigError(
                f"--expect-hash {spec!r}: expected METRIC=SHA256 with 64 hexadecimal digits (e.g. as printed by "
                "sha256sum)"
            )
        expected.setdefault(name, set()).add(digest)
    return expected


def check_expected(metric: str, files: Sequence[WeightFile], expected: set[str]) -> None:
    """Raise ConfigError unless the sha256 values of `files` are exactly `expected`."""
    if not files:
        raise ConfigError(f"--expect-hash {metric}=...: {metric} found no weight files to check")
    found = {f.sha256 for f in files}
    unexpected = [f for f in files if f.sha256 not in expected]
    if unexpected:
        shown = "; ".join(f"{f.path} has sha256 {f.sha256}" for f in unexpected)
        raise ConfigError(
            f"{metric}: refusing weights that were not pinned: {shown}; expected sha256 "
            f"{', '.join(sorted(expected))} (--expect-hash {metric}=...)"
        )
    missing = sorted(expected - found)
    if missing:
        loaded = ", ".join(f"{f.file} ({f.sha256})" for f in files)
        raise ConfigError(
            f"{metric}: no loaded weight file has the expected sha256 {', '.join(missing)}; it loads {loaded}"
        )
