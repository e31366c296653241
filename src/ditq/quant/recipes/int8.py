"""The INT8 recipe: W8A8 with SmoothQuant, the one-token conditioning GEMVs kept in bf16, and an optional budget of
the most fragile layers kept in bf16 as well.

The budget (`protect_budget`, `ProtectBudget.parse` syntax: `2`, `bytes=1GB`, `error=1e-3`) is spent on a ranking of
the layers by their W8A8 fragility: a table from `ditq sensitivity`, or measured by `resolve_protected` from the
source model and the calibration statistics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ditq.errors import ConfigError
from ditq.formats.int8 import KERNELS
from ditq.quant.int8.config import DEFAULT_PROTECT, Int8W8A8Config, SmoothQuantConfig
from ditq.quant.recipes.base import ConvertContext, Recipe, register_name

if TYPE_CHECKING:
    from ditq.quant.calibration import CalibrationStats

log = logging.getLogger(__name__)
TRANSFORMERS = ("transformer", "unconditional_transformer")


@dataclass(frozen=True, kw_only=True)
class Int8Recipe(Recipe):
    """INT8 W8A8: int8 per-channel weights, per-token dynamic int8 activations.

    `smoothquant` migrates activation outliers into the weights (needs calibration statistics); `alpha` None
    searches alpha per smoothing group, a number applies it everywhere. `protect` are name patterns kept in
    bf16 (default: the one-token conditioning layers); `protect_budget` adds the most fragile layers.
    """

    kind: ClassVar[str] = "int8"
    format: ClassVar[str] = "int8"

    smoothquant: bool = True
    alpha: float | None = None
    protect: tuple[str, ...] = DEFAULT_PROTECT
    protect_budget: str | None = None
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1] (or None to search), got {self.alpha}")
        if isinstance(self.protect, str) or not all(isinstance(p, str) for p in self.protect):
            raise ConfigError(f"protect must be a sequence of name patterns, got {self.protect!r}")
        object.__setattr__(self, "protect", tuple(self.protect))
        if self.kernel not in KERNELS:
            raise ConfigError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.protect_budget is not None:
            from ditq.quant.int8.sensitivity import ProtectBudget

            ProtectBudget.parse(self.protect_budget)  # refuses a malformed budget now, not after calibration

    @property
    def uses_stats(self) -> bool:
        return self.smoothquant or self.protect_budget is not None

    def config(self) -> Int8W8A8Config | SmoothQuantConfig:
        """The `quantize_` config this recipe applies to one transformer."""
        base = Int8W8A8Config(protect=self.protect, kernel=self.kernel)
        if not self.smoothquant:
            return base
        return SmoothQuantConfig(base=base, alpha=self.alpha)

    def convert(self, src: Path, dst: Path, ctx: ConvertContext) -> dict:
        from ditq.quant.int8.convert import convert_transformer_int8

        if self.smoothquant and ctx.stats is None:
            raise ConfigError(
                "int8 with SmoothQuant needs calibration statistics (ditq calibrate, then --stats)"
            )
        report = convert_transformer_int8(
            src,
            dst,
            ctx.stats,
            self.config(),
            transformer=ctx.component,
            protect=ctx.protect,
            progress=ctx.progress,
            recipe=self.to_dict(),
        )
        if (
            report.smoothing
        ):  # beside the component folders; the writer gathers them into smoothing.safetensors
            from ditq.quant.writer import save_smoothing_part

            save_smoothing_part(dst.parent, ctx.component, report.smoothing)
        return {
            "file": str(report.path),
            "bytes": report.bytes_written,
            "quantized": len(report.quantized),
            "kept_bf16": report.kept_float,
            "seconds": report.seconds,
            "recipe": report.recipe,
        }


def _int8(alpha: float | str | None = None, smoothquant: bool = True, **options) -> Int8Recipe:
    from ditq.quant.int8.config import parse_alpha

    return Int8Recipe(smoothquant=smoothquant, alpha=parse_alpha(alpha), **options)


register_name("int8", _int8)


def resolve_protected(
    recipe: Int8Recipe,
    source: Path,
    stats: CalibrationStats | None,
    fragility: str | Path | None = None,
) -> dict[str, list[str]]:
    """{transformer: layers kept in bf16 beyond `recipe.protect`} that the recipe's budget buys (empty without one).

    The ranking comes from a fragility table (`ditq sensitivity`); without one it is measured here from the source
    pipeline folder and the calibration statistics (each Linear alone in W8A8, whole-transformer output error).
    """
    if recipe.protect_budget is None:
        return {}
    from ditq.quant.int8.sensitivity import ProtectBudget, choose_protected, rank, read_csv

    budget = ProtectBudget.parse(recipe.protect_budget)
    if fragility is not None:
        rows = read_csv(fragility)
    elif stats is not None:
        import torch

        from ditq.models.loading import load_transformer
        from ditq.quant.int8.sensitivity import measure_fragility

        log.info(
            "no fragility table given: measuring per-layer W8A8 fragility (ditq sensitivity does the same)"
        )
        rows = []
        for comp in TRANSFORMERS:
            model, _ = load_transformer(Path(source) / comp, torch.float32)
            rows += measure_fragility(model, stats, comp, recipe.config())
            del model
        rows = rank(rows)
    else:
        raise ConfigError("a protect budget needs calibration statistics (--stats) or a fragility table")
    return choose_protected(rows, budget, recipe.protect)
