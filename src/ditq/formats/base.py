"""The storage layer's two contracts: a `LinearFormat` says how one on-disk layout stores a Linear layer, and a
`QuantizedLinear` is the module that computes with it.

On disk a Linear `m` is `m.weight`, `m.bias` and format-specific extras (`m.weight_scale`, `m.weight.absmax`, ...).
A format recognizes its tensors (by suffix and dtype), rebuilds the compute module, dequantizes for reference, slices
and joins rows (the official fused `qkv` <-> diffusers' `to_q/to_k/to_v`), and says how many bytes a weight of a
given shape takes: the one size rule that `inspect`, `plan` and the writers share. It also declares the exact dtype
each of its stored tensors has (`stored_dtypes`), which the loader checks before it converts anything: a header that
says F16 where the layout stores BF16 (or I8 where it stores F8_E4M3) reinterprets the same bytes, so it is refused.

In memory, every quantized tensor is a frozen `nn.Parameter` (`requires_grad=False`) holding the tensor's bytes
under an integer dtype of the same width (E4M3 as uint8, float32 scales as int32): the offload hooks of diffusers and
accelerate move parameters, `.to(dtype)` / `.half()` cast only floating-point tensors so they leave quantized storage
alone, and `ModelMixin.dtype` (the first floating-point parameter, which the pipelines cast their inputs to) stays
the compute dtype. The bias is an ordinary frozen floating-point parameter in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import ClassVar

import torch
from torch import nn

from ditq.errors import CheckpointError
from ditq.registry import Registry

# storage dtype -> the integer dtype of the same width its bytes are kept under
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class QuantizedLinear(nn.Module):
    """Base of ditq's quantized Linear modules: `x [..., in_features] -> [..., out_features]` in `x.dtype`.

    Subclasses register their tensors with `store(name, tensor)` and read them back with `stored(name)`, implement
    `forward` and `dequantized_weight(dtype) -> [out_features, in_features]`.
    """

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compute_dtype = compute_dtype
        self._logical: dict[str, torch.dtype] = {}

    def store(self, name: str, tensor: torch.Tensor | None) -> None:
        """Keep `tensor` as frozen storage: a parameter whose dtype never changes (see the module docstring)."""
        if tensor is None:
            self.register_parameter(name, None)
            return
        tensor = tensor.detach()
        dtype = tensor.dtype
        if tensor.is_floating_point() or tensor.is_complex():
            tensor = tensor.contiguous().view(_BITS_DTYPE[tensor.element_size()])
        self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        self._logical[name] = dtype

    def stored(self, name: str) -> torch.Tensor | None:
        """A tensor registered with `store`, in its own dtype (a view of the parameter, no copy)."""
        p = self._parameters.get(name)
        if p is None:
            return None
        dtype = self._logical[name]
        return p if p.dtype == dtype else p.view(dtype)

    def __getattr__(self, name: str):
        # `layer.weight` of an FP8 layer reads as float8_e4m3fn, not as the uint8 parameter that holds its bytes
        logical = self.__dict__.get("_logical")
        if logical is not None and name in logical and name in self.__dict__["_parameters"]:
            return self.stored(name)
        return super().__getattr__(name)

    def set_bias(self, bias: torch.Tensor | None, dtype: torch.dtype | None = None) -> None:
        """The bias as a frozen floating-point parameter in `dtype` (default: the compute dtype)."""
        if bias is not None and bias.numel() != self.out_features:
            raise CheckpointError(f"bias has {bias.numel()} values, expected {self.out_features}")
        value = None if bias is None else bias.detach().reshape(-1).to(dtype or self.compute_dtype)
        self.register_parameter("bias", None if value is None else nn.Parameter(value, requires_grad=False))

    def bias_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # follow `.to(dtype)` / `.half()` in the default dtype of `dequantized_weight`
        ref = next(iter(self.parameters()), None)
        if ref is not None:
            probe = fn(torch.empty(0, dtype=self.compute_dtype, device=ref.device))
            if probe.is_floating_point():
                self.compute_dtype = probe.dtype
        return self


class LinearFormat:
    """An on-disk layout of a Linear layer; subclasses register themselves in `LINEAR_FORMATS` by `name`."""

    name: ClassVar[str]
    # Suffixes (after the module name) that only this format uses; `weight` and `bias` are shared by all.
    extra_suffixes: ClassVar[tuple[str, ...]] = ()
    # Nominal storage bits per weight element, excluding scales (informational).
    bits_per_weight: ClassVar[float] = 16.0
    # Who writes this layout, for error messages ("the official FP8 layout stores float32").
    layout: ClassVar[str] = ""
    # {suffix: the dtypes a stored tensor with that suffix may have}: the format's own tensors (`weight` and the
    # extras). `bias` is not listed: like every unquantized tensor it is held to the component's float dtype.
    stored_dtypes: ClassVar[Mapping[str, tuple[torch.dtype, ...]]] = {}

    def expected_dtypes(self, suffixes: Collection[str]) -> Mapping[str, tuple[torch.dtype, ...]]:
        """{suffix: allowed dtypes} for a module stored with these suffixes; a format whose dtypes depend on which
        tensors are present (NF4 with double quantization) overrides this."""
        return self.stored_dtypes

    def check_dtypes(self, dtypes: Mapping[str, torch.dtype], keys: Mapping[str, str], where: str) -> None:
        """CheckpointError naming `where` (the file), the stored key and both dtypes when a tensor of this format
        is not stored in a dtype its layout uses. `dtypes` and `keys` are keyed by suffix."""
        expected = self.expected_dtypes(dtypes.keys())
        for suffix, dtype in dtypes.items():
            allowed = expected.get(suffix)
            if allowed is not None and dtype not in allowed:
                raise CheckpointError(
                    f"{where}: tensor {keys[suffix]} is {dtype_name(dtype)}; {self.layout or self.name} stores "
                    f"{' or '.join(dtype_name(d) for d in allowed)}"
                )

    def matches(self, tensors: dict[str, torch.Tensor]) -> bool:
        raise NotImplementedError

    def build(self, tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> nn.Module:
        """A module computing `x @ W.T + b` from this format's tensors (keyed by suffix, `bias` optional)."""
        raise NotImplementedError

    def weight_shape(self, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
        """The logical [out_features, in_features] of the stored weight."""
        return tuple(tensors["weight"].shape)

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight [out_features, in_features] these tensors represent."""
        raise NotImplementedError

    def slice_rows(self, suffix: str, tensor: torch.Tensor, part: int, parts: int) -> torch.Tensor:
        rows = tensor.shape[0]
        step = rows // parts
        return tensor[part * step : (part + 1) * step]

    def join_rows(self, suffix: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors, dim=0)


LINEAR_FORMATS: Registry[LinearFormat] = Registry("linear format")


def kept_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a writer stores a tensor it does not quantize in (norms, biases, embeddings, kept Linears):
    bfloat16 for every float, as the official FP8 layout does and the loader requires beside quantized layers;
    integer and bool tensors keep their own."""
    return torch.bfloat16 if dtype.is_floating_point else dtype


def dtype_name(dtype: torch.dtype) -> str:
    """`float16 (F16)`: the torch name and the safetensors header name of a dtype."""
    from ditq.io.safetensors_header import DTYPE_NAMES

    name = str(dtype).removeprefix("torch.")
    code = DTYPE_NAMES.get(dtype)
    return f"{name} ({code})" if code else name


def register_format(cls: type[LinearFormat]) -> type[LinearFormat]:
    LINEAR_FORMATS.add(cls.name, cls())
    return cls


def detect_format(tensors: dict[str, torch.Tensor]) -> LinearFormat | None:
    """The quantized format these module tensors are stored in, or None for a plain float Linear."""
    for name in LINEAR_FORMATS:
        fmt = LINEAR_FORMATS.get(name)
        if fmt.matches(tensors):
            return fmt
    return None


def all_extra_suffixes() -> set[str]:
    return {s for name in LINEAR_FORMATS for s in LINEAR_FORMATS.get(name).extra_suffixes}
