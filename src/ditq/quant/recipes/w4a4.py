"""W4A4 recipes: 4-bit weights and 4-bit activations on INT4 tensor cores, half the bytes of INT8.

    SVDQuantRecipe(rank=32)        svdq_w4a4      SmoothQuant, then the migrated weight's rank-32 SVD kept in bf16
                                                  and the residual in int4 (groups of 64, activations too)
    ConvRotW4A4Recipe()            convrot_w4a4   SmoothQuant folded into neighbours, a block-Hadamard rotation,
                                                  int4 weights per row and int4 activations per token

Both go through the same calibration as INT8 (`ditq calibrate`; the statistics' sample tokens choose α per
smoothing group, here by the W4A4 output error of the format itself, with "no smoothing" a candidate), keep the
same layers in bf16 (the protected one-token conditioning GEMVs, `Int8Recipe.protect`'s default) and also keep the
layers the int4 kernels cannot take (in_features not a multiple of 64). SVDQuant stores its smoothing vector beside
the weight (the kernel divides the input by it), so every layer is smoothed; ConvRot's ComfyUI layout has no input
scale, so only groups with a neighbour to fold 1/s into are. Files are in comfy-kitchen's / ComfyUI's layouts
(`ditq.formats.svdquant`, `ditq.formats.convrot_w4a4`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ditq.errors import ConfigError
from ditq.formats.convrot import is_power_of_four
from ditq.formats.keys import split_module_name
from ditq.quant.int8.config import ALPHA_GRID, DEFAULT_PROTECT, is_protected, parse_alpha
from ditq.quant.recipes.base import ConvertContext, Recipe, register_name

NOT_LINEAR = ("embed_image_indicator.weight",)


@dataclass(frozen=True, kw_only=True)
class W4A4Recipe(Recipe):
    """What both W4A4 recipes share: SmoothQuant (`alpha` None searches per group over `alpha_grid`), the protected
    layers (`protect`, fnmatch patterns on diffusers or official names) and the streaming writer."""

    smoothquant: bool = True
    alpha: float | None = None
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    protect: tuple[str, ...] = DEFAULT_PROTECT

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1] (or None to search), got {self.alpha}")
        grid = tuple(float(a) for a in self.alpha_grid)
        if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
            raise ConfigError(f"alpha_grid must be values in [0, 1], got {list(self.alpha_grid)}")
        object.__setattr__(self, "alpha_grid", grid)
        if isinstance(self.protect, str) or not all(isinstance(p, str) for p in self.protect):
            raise ConfigError(f"protect must be a sequence of name patterns, got {self.protect!r}")
        object.__setattr__(self, "protect", tuple(self.protect))

    @property
    def uses_stats(self) -> bool:
        return self.smoothquant

    def fits(self, in_features: int) -> str | None:
        """None when a Linear with this many inputs can be stored; else why not."""
        raise NotImplementedError

    def unit_specs(self, out_features: int, in_features: int) -> dict:
        """{suffix: (dtype, shape)} of the tensors one quantized (fused) Linear weight of this shape is stored as."""
        raise NotImplementedError

    def unit_marker(self, out_features: int, in_features: int) -> dict:
        """The `comfy_quant` marker of a quantized (fused) Linear of this shape."""
        raise NotImplementedError

    def unit_bytes(self, out_features: int, in_features: int) -> int:
        """Stored bytes of one quantized (fused) Linear weight of this shape (every tensor but the bias)."""
        return sum(
            math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            for dtype, shape in self.unit_specs(out_features, in_features).values()
        )

    def quantizes(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether the tensor `name` (official fused name) of `shape` is stored in 4 bits."""
        if not name.endswith(".weight") or len(shape) != 2 or name in NOT_LINEAR:
            return False
        module = name[: -len(".weight")]
        names = (module, *split_module_name(module))  # a split-name pattern protects the whole fused qkv
        return not any(is_protected(n, self.protect) for n in names) and self.fits(shape[1]) is None

    def tensor_bytes(self, name: str, shape: tuple[int, ...]) -> int:
        """The size rule of `ditq inspect`: bytes of a Linear weight (official fused name) under this recipe."""
        if self.quantizes(name, shape):
            return self.unit_bytes(shape[0], shape[1])
        return 2 * shape[0] * shape[1]

    def convert(self, src: Path, dst: Path, ctx: ConvertContext) -> dict:
        from ditq.quant.recipes.w4a4_convert import convert_transformer_w4a4

        if self.smoothquant and ctx.stats is None:
            raise ConfigError(
                f"{self.kind} with SmoothQuant needs calibration statistics (ditq calibrate, then --stats), "
                "or smoothquant=False"
            )
        return convert_transformer_w4a4(src, dst, self, ctx)


@dataclass(frozen=True, kw_only=True)
class SVDQuantRecipe(W4A4Recipe):
    """SVDQuant W4A4: the smoothed weight's best rank-`rank` approximation in bf16 (the low-rank branch, computed
    on the unsmoothed input) plus the int4 residual; rank 0 is plain smoothed W4A4."""

    kind: ClassVar[str] = "svdq_w4a4"
    format: ClassVar[str] = "int4_svdquant"

    rank: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ConfigError(f"rank must be an integer >= 0, got {self.rank!r}")

    def fits(self, in_features: int) -> str | None:
        from ditq.formats.svdquant import GROUP, quantizable

        return None if quantizable(in_features) else f"in_features {in_features} is not a multiple of {GROUP}"

    def unit_specs(self, out_features: int, in_features: int) -> dict:
        from ditq.formats.svdquant import tensor_specs

        return tensor_specs(out_features, in_features, self.rank)

    def unit_marker(self, out_features: int, in_features: int) -> dict:
        from ditq.formats.svdquant import effective_rank, marker

        return marker(effective_rank(self.rank, out_features, in_features))


@dataclass(frozen=True, kw_only=True)
class ConvRotW4A4Recipe(W4A4Recipe):
    """ConvRot W4A4: the block-Hadamard rotation of `group_size` (smaller powers of 4, down to 64, where a layer's
    in_features is not a multiple of it), int4 weights per row, int4 activations per token."""

    kind: ClassVar[str] = "convrot_w4a4"
    format: ClassVar[str] = "int4_convrot"

    group_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            not isinstance(self.group_size, int)
            or not is_power_of_four(self.group_size)
            or self.group_size < 64
        ):
            raise ConfigError(f"group_size must be a power of 4 of at least 64, got {self.group_size!r}")

    def group_for(self, in_features: int) -> int | None:
        from ditq.formats.convrot_w4a4 import group_for

        return group_for(in_features, self.group_size)

    def fits(self, in_features: int) -> str | None:
        return None if self.group_for(in_features) else f"in_features {in_features} is not a multiple of 64"

    def unit_specs(self, out_features: int, in_features: int) -> dict:
        from ditq.formats.convrot_w4a4 import tensor_specs

        return tensor_specs(out_features, in_features, self.group_for(in_features))

    def unit_marker(self, out_features: int, in_features: int) -> dict:
        from ditq.formats.convrot_w4a4 import marker

        return marker(self.group_for(in_features))


def _options(alpha: float | str | None = None, **options) -> dict:
    return {"alpha": parse_alpha(alpha), **options}


register_name("svdq_w4a4", lambda **options: SVDQuantRecipe(**_options(**options)))
register_name("convrot_w4a4", lambda **options: ConvRotW4A4Recipe(**_options(**options)))
