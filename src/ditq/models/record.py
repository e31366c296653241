"""`ditq.json`: what a pipeline folder written by ditq holds, as one typed record.

    {"schema": 2, "variant": "int8+q4_k", "formats": {"transformer": "int8", "unconditional_transformer": "gguf"},
     "recipes": {component: recipe.to_dict()}, "source", "source_folder", "key", "stats_sha256", "summary",
     "imported": {component: {"source", "layout", "files"}}, "ditq_version", "created"}

`key` is a hash of everything the folder's bytes depend on (the recipes, the source's weight files, the calibration
statistics): a folder is reused only when a new request has the same key. Folders written by ditq 0.1's first
release (schema 1: `{"format", "recipe": {"name", ...}}`) are read too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ditq.errors import CheckpointError

RECORD_FILE = "ditq.json"
RECORD_SCHEMA = 2
TRANSFORMERS = ("transformer", "unconditional_transformer")


@dataclass(frozen=True, kw_only=True)
class VariantRecord:
    """The content of a folder's `ditq.json` (see the module docstring)."""

    variant: str
    formats: dict[str, str]
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""
    source_folder: str = ""
    key: str = ""
    stats_sha256: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    imported: dict[str, Any] = field(default_factory=dict)
    ditq_version: str = ""
    created: str = ""
    schema: int = RECORD_SCHEMA

    @property
    def is_quantized(self) -> bool:
        """Whether some transformer is stored in a format other than the FP8 / bf16 reference."""
        return any(f not in ("fp8", "bf16") for f in self.formats.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str = RECORD_FILE) -> VariantRecord:
        """Parse a `ditq.json` object; a wrong shape is a CheckpointError naming `where` and the field."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("schema") is None and "format" in data:
            data = _from_schema_1(data, where)
        out: dict[str, Any] = {}
        for f in cls.__dataclass_fields__.values():
            if f.name not in data:
                continue
            value = data[f.name]
            want = {"variant": str, "source": str, "source_folder": str, "key": str, "ditq_version": str}
            want.update(created=str, formats=dict, recipes=dict, summary=dict, imported=dict, schema=int)
            if f.name in want and not isinstance(value, want[f.name]):
                raise CheckpointError(
                    f"{where}: field {f.name!r} is {type(value).__name__}, expected {want[f.name].__name__}"
                )
            out[f.name] = value
        for name in ("variant", "formats"):
            if name not in out:
                raise CheckpointError(f"{where}: field {name!r} is missing")
        if out.get("schema", RECORD_SCHEMA) > RECORD_SCHEMA:
            raise CheckpointError(
                f"{where}: schema {out['schema']} is newer than this ditq reads ({RECORD_SCHEMA}); upgrade ditq"
            )
        bad = {c: f for c, f in out["formats"].items() if not isinstance(f, str)}
        if bad:
            raise CheckpointError(f"{where}: field 'formats' must map components to format names, got {bad}")
        return cls(**out)

    @classmethod
    def load(cls, folder: str | Path) -> VariantRecord | None:
        """The record of a pipeline folder, None when it has no `ditq.json`."""
        path = Path(folder) / RECORD_FILE
        if not path.is_file():
            return None
        from ditq.io.jsonfile import read_json

        return cls.from_json(read_json(path, "a ditq variant record (ditq.json)"), str(path))


def _from_schema_1(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    fmt = data.get("format")
    recipe = data.get("recipe") if isinstance(data.get("recipe"), Mapping) else {}
    if not isinstance(fmt, str):
        raise CheckpointError(f"{where}: field 'format' is {type(fmt).__name__}, expected str")
    name = recipe.get("name") or data.get("name") or fmt
    return {
        "schema": 1,
        "variant": str(name),
        "formats": dict.fromkeys(TRANSFORMERS, fmt),
        "source": str(data.get("source", "")),
        "source_folder": str(data.get("source_folder", "")),
        "summary": data.get("summary") if isinstance(data.get("summary"), dict) else {},
        "imported": data.get("imported") if isinstance(data.get("imported"), dict) else {},
        "ditq_version": str(data.get("ditq_version", "")),
    }
