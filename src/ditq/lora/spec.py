"""`LoraSpec`: one LoRA to apply (file, strength, name), and the `PATH[:STRENGTH]` form the CLI takes."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ditq.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """A LoRA file and its strength (any finite number; negative strengths subtract the update, 0 leaves the
    model as it is). `name` (default: the file's stem) is how the LoRA is addressed once applied;
    `unprefixed` says where keys without a transformer prefix go ("transformer" or "both")."""

    path: str
    strength: float = 1.0
    name: str | None = None
    unprefixed: str = "transformer"

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"LoraSpec.path must be a file path, got {self.path!r}")
        try:
            strength = float(self.strength)
        except (TypeError, ValueError):
            raise ConfigError(f"LoraSpec.strength must be a number, got {self.strength!r}") from None
        if not math.isfinite(strength):
            raise ConfigError(f"LoraSpec.strength must be finite, got {self.strength!r}")
        object.__setattr__(self, "strength", strength)
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ConfigError(f"LoraSpec.name must be a non-empty string, got {self.name!r}")
        if self.unprefixed not in ("transformer", "both"):
            raise ConfigError(f"LoraSpec.unprefixed must be 'transformer' or 'both', got {self.unprefixed!r}")

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "strength": self.strength,
            "name": self.label,
            "unprefixed": self.unprefixed,
        }


def parse_lora_spec(text: str) -> LoraSpec:
    """`PATH` or `PATH:STRENGTH` (e.g. `style.safetensors:0.8`); a colon followed by something that is not a
    number is part of the path."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"--lora expects PATH[:STRENGTH], got {text!r}")
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            strength = float(tail)
        except ValueError:
            return LoraSpec(path=text)
        if not math.isfinite(strength):
            raise ConfigError(f"--lora {text}: strength {tail!r} is not a finite number")
        return LoraSpec(path=path, strength=strength)
    return LoraSpec(path=text)


def parse_lora_arg(text: str) -> LoraSpec:
    """`--lora PATH[:STRENGTH]` checked for the command line: the file must exist, and a `:` after an existing
    file must be followed by a number (`style.safetensors:strong` is refused, not read as a file name)."""
    spec = parse_lora_spec(text)
    if Path(spec.path).is_file():
        return spec
    head, sep, tail = text.rpartition(":")
    if sep and head and Path(head).is_file():
        raise ConfigError(f"--lora {text}: strength {tail!r} is not a number (expected PATH[:STRENGTH])")
    raise ConfigError(f"--lora {text}: no such LoRA file {spec.path}")


def lora_records(specs: Sequence[LoraSpec]) -> list[dict]:
    """What a run or an image records of its LoRAs: file, name, sha256 of the file, strength, unprefixed rule."""
    from ditq.io.files import file_sha256

    return [{**s.to_dict(), "sha256": file_sha256(s.path)} for s in specs]


def lora_key(records: Sequence[dict]) -> list[tuple]:
    """The part of `lora_records` that changes the images (not where the file lies): (sha256, strength,
    unprefixed) in order."""
    return [
        (r.get("sha256"), float(r.get("strength", 1.0)), r.get("unprefixed", "transformer")) for r in records
    ]
