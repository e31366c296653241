"""Recipes: frozen configs that say how one transformer is quantized, registered by kind.

A recipe is both the config `quantize_(model, recipe)` applies in memory and the one `quantize_pipeline` applies to
a checkpoint. It is serialized with its kind and version into `ditq.json` and into the files it writes, so a file
says how it was made; `recipe_from_dict` reads it back and `parse_recipe("q4_k_m")` builds one from a variant name.

    Int8Recipe(smoothquant=True, alpha=None)      INT8 W8A8, SmoothQuant with a per-group alpha search
    GGUFRecipe(type="q4_k", mix=True)             GGUF Q4_K_M
    NF4Recipe()                                   bitsandbytes NF4, blocksize 64
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ditq.errors import ConfigError
from ditq.registry import Registry

if TYPE_CHECKING:
    from ditq.quant.calibration import CalibrationStats

RECIPE_KINDS: Registry[type[Recipe]] = Registry("recipe kind")


@dataclass(frozen=True, kw_only=True)
class ConvertContext:
    """What one transformer's conversion needs besides the recipe."""

    component: str = (
        "transformer"  # which transformer of the pipeline ("transformer" / "unconditional_transformer")
    )
    stats: CalibrationStats | None = None
    protect: tuple[str, ...] = ()  # layers kept in float beyond the recipe's own rule (INT8 protect budgets)
    threads: int | None = None
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Base class: `kind` names the recipe family, `format` the ditq storage format its weights end up in."""

    kind: ClassVar[str]
    format: ClassVar[str]
    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            RECIPE_KINDS.add(cls.kind, cls)

    @property
    def name(self) -> str:
        """The variant name (`int8`, `q4_k_m`, `nf4`)."""
        return self.kind

    @property
    def uses_stats(self) -> bool:
        """Whether calibration statistics change what this recipe writes."""
        return False

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "version": self.version, "name": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def convert(self, src: Path, dst: Path, ctx: ConvertContext) -> dict:
        """Write component folder `dst` (config.json is already there) from component folder `src`; returns a
        summary for ditq.json."""
        raise NotImplementedError


def recipe_from_dict(data: Mapping[str, Any]) -> Recipe:
    """The recipe a `to_dict()` (from ditq.json or a file's metadata) describes."""
    if not isinstance(data, Mapping) or not isinstance(data.get("kind"), str):
        raise ConfigError(f"a recipe record needs a 'kind' string, got {data!r}")
    cls = RECIPE_KINDS.get(data["kind"])
    version = data.get("version", 1)
    if not isinstance(version, int) or version > cls.version:
        raise ConfigError(
            f"recipe {data['kind']!r} version {version!r} is newer than this ditq reads ({cls.version})"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names - {"kind", "version", "name"})
    if unknown:
        raise ConfigError(f"recipe {data['kind']!r}: unknown field(s) {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
    return cls(**values)


_NAMED: dict[str, Any] = {}


def register_name(name: str, factory) -> None:
    """Make `parse_recipe(name)` build `factory(**options)` (variant names such as `q4_k_m`)."""
    if name in _NAMED:
        raise ValueError(f"recipe name {name!r} is registered twice")
    _NAMED[name] = factory


def recipe_names() -> list[str]:
    return list(_NAMED)


def parse_recipe(name: str, **options) -> Recipe:
    """A recipe from its variant name (`int8`, `q4_k_m`, `nf4`, ...) and options (e.g. `alpha=0.5`)."""
    factory = _NAMED.get(name)
    if factory is None:
        raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(_NAMED)}")
    return factory(**options)
