"""INT8 W8A8 weights in ComfyUI's `comfy_quant` layout (format `int8_tensorwise`, no rotation).

Per quantized Linear `m` (official fused names: `layers.{i}.attention.qkv`, `attention.o`, ...)::

    m.weight        I8   [N, K]   round(W / weight_scale), symmetric, in [-127, 127]
    m.weight_scale  F32  [N, 1]   one scale per output row: row absmax / 127
    m.comfy_quant   U8   [L]      UTF-8 JSON {"format": "int8_tensorwise"}
    m.bias          BF16 [N]      when the layer has one

ComfyUI (`comfy/ops.py`, mixed-precision ops) reads `comfy_quant` per layer and treats a `[N, 1]` scale as per-row;
stable-diffusion.cpp reads the same layers from the file-level metadata key `_quantization_metadata`
(`{"format_version": "1.0", "layers": {m: {"format": "int8_tensorwise"}}}`), which ComfyUI also understands; ditq
writes both. Activations are quantized per token at run time (no `input_scale`). ditq also reads a scalar
(tensor-wise) scale and a flat `[N]` scale. ConvRot files (`"convrot": true`, `"convrot_groupsize": G`) store the
weight in a block-Hadamard-rotated basis; they run as ComfyUI runs them, rotating each token's input first
(`ditq.formats.convrot`).

In memory a layer is an `Int8Linear`: the transposed int8 weight and the scales as frozen storage (see
`ditq.formats.base`), activations quantized per token in `forward` (the arithmetic is in `ditq.formats.int8_ops`).
"""

from __future__ import annotations

import json

import torch

from ditq.errors import CheckpointError, ConfigError
from ditq.formats.base import LinearFormat, QuantizedLinear, register_format
from ditq.formats.int8_ops import KERNELS, int8_linear, quantize_weight_per_channel

COMFY_FORMAT = "int8_tensorwise"
MARKER = {"format": COMFY_FORMAT}
QUANT_METADATA_KEY = "_quantization_metadata"


def marker_bytes(marker: dict | None = None) -> bytes:
    """The `comfy_quant` payload, serialized as ComfyUI itself does (`json.dumps` defaults)."""
    return json.dumps(marker or MARKER).encode("utf-8")


def marker_tensor(marker: dict | None = None) -> torch.Tensor:
    return torch.tensor(list(marker_bytes(marker)), dtype=torch.uint8)


def parse_marker(tensor: torch.Tensor, where: str = "comfy_quant") -> dict:
    try:
        conf = json.loads(bytes(tensor.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: not a UTF-8 JSON marker ({exc})") from None
    if not isinstance(conf, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(conf).__name__}")
    return conf


def quantization_metadata(layers: list[str]) -> str:
    """The file-level `_quantization_metadata` JSON for these (fused) module names."""
    return json.dumps({"format_version": "1.0", "layers": {name: dict(MARKER) for name in layers}})


def weight_bytes(out_features: int, in_features: int) -> int:
    """Stored bytes of one INT8 Linear weight: int8 [N, K] + fp32 scale [N, 1] + the comfy_quant marker."""
    return out_features * in_features + 4 * out_features + len(marker_bytes())


class Int8Linear(QuantizedLinear):
    """A Linear computing `x @ W.T + b` in W8A8 (`ditq::int8_linear`: comfy-kitchen on CUDA, ditq's kernels on CPU).

    Storage: `weight` int8 [N, K] (the file's and comfy-kitchen's layout), `weight_scale` fp32 [N], `inv_smooth`
    fp32 [K] or None (1 / a smoothing vector applied to the input); the bias is a parameter in the compute dtype.
    `convrot_group` > 0 marks a ConvRot weight stored in the block-Hadamard-rotated basis: each token's input is
    rotated before it is quantized (ComfyUI's and stable-diffusion.cpp's `int8_convrot`).
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        smooth: torch.Tensor | None = None,
        kernel: str = "auto",
        compute_dtype: torch.dtype | None = None,
        convrot_group: int = 0,
    ) -> None:
        if qweight.dtype != torch.int8 or qweight.ndim != 2:
            raise CheckpointError(
                f"INT8 weight must be int8 [N, K], got {qweight.dtype} {list(qweight.shape)}"
            )
        if kernel not in KERNELS:
            raise ConfigError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        n, k = qweight.shape
        scale = weight_scale.float().reshape(-1)
        if scale.numel() == 1 and n != 1:
            scale = scale.expand(n).clone()
        if scale.numel() != n:
            raise CheckpointError(
                f"weight_scale has {scale.numel()} values, expected one per output row ({n})"
            )
        if smooth is not None and smooth.numel() != k:
            raise ConfigError(f"smoothing vector has {smooth.numel()} values, expected in_features={k}")
        if convrot_group:
            from ditq.formats.convrot import check_group

            check_group(convrot_group, k)
        default = bias.dtype if bias is not None and bias.is_floating_point() else torch.bfloat16
        super().__init__(k, n, compute_dtype or default)
        self.kernel = kernel
        self.convrot_group = int(convrot_group)
        self.store("weight", qweight.contiguous())
        self.store("weight_scale", scale.contiguous())
        self.set_bias(bias)
        inv = None if smooth is None else (1.0 / smooth.float().reshape(-1)).contiguous()
        self.store("inv_smooth", inv)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        smooth: torch.Tensor | None = None,
        kernel: str = "auto",
        compute_dtype: torch.dtype | None = None,
    ) -> Int8Linear:
        """Quantize a float weight [N, K]; with `smooth` [K], the stored weight is `weight * smooth`."""
        q, scale = quantize_weight_per_channel(weight.float(), None if smooth is None else smooth.float())
        return cls(q, scale, bias, smooth, kernel, compute_dtype)

    @property
    def qweight_t(self) -> torch.Tensor:
        """The int8 weight transposed, [K, N] (a view)."""
        return self.weight.t()

    @property
    def scales(self) -> torch.Tensor:
        """fp32 [N]: one scale per output row."""
        return self.weight_scale

    @property
    def smoothing(self) -> torch.Tensor | None:
        """fp32 [K]: 1 / the smoothing vector applied to the input, or None."""
        return self.inv_smooth

    def dequantized_weight(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The weight [N, K] this layer applies to its (unsmoothed, unrotated) input."""
        w = self.weight.float() * self.scales[:, None]
        if self.convrot_group:
            from ditq.formats.convrot import rotate

            w = rotate(w, self.convrot_group)
        if self.smoothing is not None:
            w = w * self.smoothing[None, :]
        return w.to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(
            x, self.weight, self.scales, self.bias, self.smoothing, self.convrot_group, self.kernel
        )

    def extra_repr(self) -> str:
        extra = ", smoothed" if self.inv_smooth is not None else ""
        extra += f", convrot_groupsize={self.convrot_group}" if self.convrot_group else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8{extra}, kernel={self.kernel}"


def _check_marker(tensors: dict[str, torch.Tensor]) -> int | None:
    """The ConvRot group size the marker declares (ComfyUI reads it flat or under "params"), None if unrotated."""
    if "comfy_quant" not in tensors:
        return None
    conf = parse_marker(tensors["comfy_quant"])
    fmt = conf.get("format")
    if fmt != COMFY_FORMAT:
        raise CheckpointError(f"comfy_quant format is {fmt!r}; the int8 reader handles {COMFY_FORMAT!r} only")
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    if not conf.get("convrot", params.get("convrot", False)):
        return None
    size = conf.get("convrot_groupsize", params.get("convrot_groupsize", 256))
    if not isinstance(size, int) or isinstance(size, bool):
        raise CheckpointError(f"comfy_quant convrot_groupsize is {size!r}; expected an integer power of 4")
    return size


@register_format
class Int8TensorwiseFormat(LinearFormat):
    name = "int8"
    extra_suffixes = ("weight_scale", "comfy_quant")
    bits_per_weight = 8.0
    layout = "ComfyUI's INT8 layout (comfy_quant int8_tensorwise)"
    # comfy-kitchen serializes the row scales in float32 and stable-diffusion.cpp reads only an F32 [N, 1] scale
    # (docs/LAYOUTS.md, the `scale` rule); the marker is UTF-8 bytes in a U8 tensor.
    stored_dtypes = {"weight": (torch.int8,), "weight_scale": (torch.float32,), "comfy_quant": (torch.uint8,)}

    def check_dtypes(self, dtypes, keys, where: str) -> None:
        super().check_dtypes(dtypes, keys, where)
        if "comfy_quant" not in dtypes:
            # ComfyUI, stable-diffusion.cpp and ditq's writer and importer mark every int8 layer; an unmarked one
            # is most likely an FP8 weight whose header was changed to I8 (the same bytes, other numbers)
            raise CheckpointError(
                f"{where}: tensor {keys['weight']} is int8 without a comfy_quant marker; every INT8 layout ditq "
                "reads marks its int8 layers (an F8_E4M3 weight relabelled I8 looks like this)"
            )

    def matches(self, tensors: dict[str, torch.Tensor]) -> bool:
        w = tensors.get("weight")
        return w is not None and w.dtype == torch.int8 and "weight_scale" in tensors

    @staticmethod
    def _row_scale(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        w, scale = tensors["weight"], tensors["weight_scale"].float()
        rows = w.shape[0]
        if scale.numel() == 1:
            return scale.reshape(1).expand(rows).contiguous()
        if scale.numel() != rows or (scale.ndim == 2 and scale.shape[1] != 1) or scale.ndim > 2:
            raise CheckpointError(
                f"int8 weight_scale has shape {list(scale.shape)}; expected [{rows}, 1], [{rows}] or a scalar"
            )
        return scale.reshape(rows)

    def build(
        self, tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype, kernel: str = "auto"
    ) -> Int8Linear:
        group = _check_marker(tensors)
        w, scale, bias = tensors["weight"], self._row_scale(tensors), tensors.get("bias")
        if group is None:
            return Int8Linear(w, scale, bias, kernel=kernel, compute_dtype=compute_dtype)
        from ditq.formats.convrot import ConvRotInt8Linear

        return ConvRotInt8Linear(w, scale, bias, group, kernel, compute_dtype)

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        group = _check_marker(tensors)
        w = tensors["weight"].float() * self._row_scale(tensors)[:, None]
        if group is None:
            return w
        from ditq.formats.convrot import rotate

        return rotate(w, group)

    def slice_rows(self, suffix: str, tensor: torch.Tensor, part: int, parts: int) -> torch.Tensor:
        if suffix == "comfy_quant" or tensor.numel() == 1:
            return tensor
        return super().slice_rows(suffix, tensor, part, parts)

    def join_rows(self, suffix: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if suffix == "comfy_quant":
            return tensors[0]
        if all(t.ndim == 0 for t in tensors):
            if any(not torch.equal(t, tensors[0]) for t in tensors):
                raise CheckpointError(
                    "cannot join int8 parts with different tensor-wise scales into one tensor"
                )
            return tensors[0]
        return torch.cat(tensors, dim=0)
