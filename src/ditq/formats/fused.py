"""INT8 projections that share their input run as one: one activation quantization, one GEMM.

Ideogram 4's q, k and v projections read the same normalized tokens, and so do the feed-forward's w1 and w3. Run
as separate W8A8 layers, each quantizes that input again. `fuse_int8_projections_(model)` concatenates their rows
into one `FusedInt8Linear` (registered beside them as `to_qkv` / `w13`, the names diffusers gives fused
projections) and puts an `Int8Part` in each original place: the part holds no storage, reads its rows of the fused
weight, and returns its slice of the fused output, computed once per input. diffusers' modules keep calling
`to_q(x)`, `to_k(x)`, `to_v(x)`; hooks, offloading and `named_modules()` see the usual names.

The fused output is computed on the first part's call and handed to the others (it is the very tensor their slices
view, so it costs no memory of its own), then released; the hand-over compiles under `torch.compile`.
"""

from __future__ import annotations

import torch
from torch import nn

from ditq.formats.base import QuantizedLinear
from ditq.formats.int8 import Int8Linear

GROUPS = (("to_q", "to_k", "to_v"), ("w1", "w3"))
FUSED_NAMES = {("to_q", "to_k", "to_v"): "to_qkv", ("w1", "w3"): "w13"}


class FusedInt8Linear(Int8Linear):
    """An `Int8Linear` over the concatenated rows of layers that share their input; `splits` are their widths."""

    def __init__(self, layers: list[Int8Linear]) -> None:
        first = layers[0]
        bias = None
        if any(m.bias is not None for m in layers):
            bias = torch.cat(
                [
                    m.bias
                    if m.bias is not None
                    else m.weight.new_zeros(m.out_features, dtype=first.bias.dtype)
                    for m in layers
                ]
            )
        smooth = None if first.smoothing is None else 1.0 / first.smoothing
        super().__init__(
            torch.cat([m.weight for m in layers]),
            torch.cat([m.scales for m in layers]),
            bias,
            smooth,
            kernel=first.kernel,
            compute_dtype=first.compute_dtype,
            convrot_group=first.convrot_group,
        )
        if smooth is not None:  # keep the exact stored reciprocal, not 1 / (1 / s)
            self._parameters["inv_smooth"].data.copy_(first._parameters["inv_smooth"].data)
        self.splits = tuple(m.out_features for m in layers)
        self._handover: tuple | None = None

    def output_for(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Part `index`'s slice of the fused output for input `x`, computing it once for all parts."""
        held = self._handover
        # an input changed in place between the parts is a new input (traced graphs never do that: no version)
        version = 0 if torch.compiler.is_compiling() else x._version
        if held is not None and held[0] is x and held[1] == version:
            y, left = held[2], held[3] - 1
            self._handover = None if left == 0 else (x, version, y, left)
        else:
            y = self(x)
            left = len(self.splits) - 1
            self._handover = (x, version, y, left) if left else None
        lo = sum(self.splits[:index])
        return y[..., lo : lo + self.splits[index]]


class Int8Part(Int8Linear):
    """One projection of a `FusedInt8Linear`: its rows of the fused weight, its slice of the fused output."""

    def __init__(self, fused: FusedInt8Linear, index: int) -> None:
        QuantizedLinear.__init__(self, fused.in_features, fused.splits[index], fused.compute_dtype)
        self.__dict__["_fused"] = (
            fused  # not a submodule: the fused layer is registered once, beside the parts
        )
        self.index = index
        self.kernel, self.convrot_group = fused.kernel, fused.convrot_group
        lo = sum(fused.splits[:index])
        self._rows = slice(lo, lo + fused.splits[index])

    @property
    def fused(self) -> FusedInt8Linear:
        return self.__dict__["_fused"]

    @property
    def weight(self) -> torch.Tensor:
        return self.fused.weight[self._rows]

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.fused.scales[self._rows]

    @property
    def inv_smooth(self) -> torch.Tensor | None:
        return self.fused.smoothing

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.fused.bias
        return None if b is None else b[self._rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.output_for(x, self.index)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, part {self.index} of {type(self.fused).__name__}"


def _fusable(layers: list[nn.Module]) -> bool:
    if not all(type(m) in _FUSABLE for m in layers):
        return False
    first = layers[0]
    same = all(
        m.in_features == first.in_features
        and m.kernel == first.kernel
        and m.convrot_group == first.convrot_group
        and m.compute_dtype == first.compute_dtype
        and (m.smoothing is None) == (first.smoothing is None)
        and (m.smoothing is None or torch.equal(m.smoothing, first.smoothing))
        and m.weight.device == first.weight.device
        for m in layers
    )
    return same


def fuse_int8_projections_(model: nn.Module) -> int:
    """Fuse every q/k/v and w1/w3 group of INT8 layers of `model` in place; returns how many groups were fused."""
    count = 0
    for owner in list(model.modules()):
        for names in GROUPS:
            layers = [getattr(owner, n, None) for n in names]
            if any(m is None for m in layers) or not _fusable(layers):
                continue
            fused = FusedInt8Linear(layers)
            setattr(owner, FUSED_NAMES[names], fused)
            for i, name in enumerate(names):
                setattr(owner, name, Int8Part(fused, i))
            count += 1
    return count


def _fusable_types() -> tuple[type, ...]:
    from ditq.formats.convrot import ConvRotInt8Linear

    return (Int8Linear, ConvRotInt8Linear)


_FUSABLE = _fusable_types()
