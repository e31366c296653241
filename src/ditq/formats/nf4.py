"""NF4 weights in the bitsandbytes serialization (the official `ideogram-ai/ideogram-4-nf4` layout).

On disk, per Linear `m`: `m.weight` uint8 [N*K/2, 1] (two 4-bit codes per byte), `m.weight.absmax` fp32 [N*K/64],
`m.weight.quant_map` fp32 [16] (the NF4 code book), `m.weight.quant_state.bitsandbytes__nf4` uint8 bytes of a JSON
object {"quant_type", "blocksize", "dtype", "shape"}; blocksize 64, no double quantization. Blocks run over the
row-major flattened weight, so a range of whole rows is a contiguous range of bytes and absmax entries: that is how
the fused qkv projection is split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import torch

from ditq.errors import CheckpointError
from ditq.formats.base import LinearFormat, QuantizedLinear, register_format

STATE_SUFFIXES = ("weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4")
CHUNK_VALUES = 1 << 24  # values quantized per bitsandbytes call
NESTED = ("weight.nested_absmax", "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nested")


def state_json(tensors: dict[str, torch.Tensor]) -> tuple[str, dict]:
    for suffix in STATE_SUFFIXES:
        if suffix in tensors:
            try:
                return suffix, json.loads(bytes(tensors[suffix].tolist()).decode())
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise CheckpointError(f"{suffix} does not hold a JSON quantization state") from None
    raise CheckpointError("NF4 weight without a bitsandbytes quantization state")


def encode_state(state: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = 64, dtype: str = "bfloat16"
) -> dict[str, torch.Tensor]:
    """float [N, K] -> the serialized tensors (suffix -> tensor) of an NF4 Linear weight."""
    flat = weight.reshape(-1)
    step = max(blocksize, CHUNK_VALUES // blocksize * blocksize)
    pieces = (flat[i : i + step] for i in range(0, flat.numel(), step))
    return quantize_nf4_pieces(pieces, tuple(weight.shape), blocksize, dtype)


def quantize_nf4_pieces(
    pieces: Iterable[torch.Tensor], shape: tuple[int, ...], blocksize: int = 64, dtype: str = "bfloat16"
) -> dict[str, torch.Tensor]:
    """`quantize_nf4` of a weight of `shape` handed over as consecutive pieces of its row-major values (e.g. blocks
    of rows). Blocks are independent, so the bytes are those of one call over the whole weight, while bitsandbytes'
    float32 temporaries (~20 bytes per value) only ever cover one piece. Every piece but the last must hold whole
    blocks."""
    from bitsandbytes.functional import quantize_4bit

    packed, absmax, code, done = [], [], None, 0
    for piece in pieces:
        if done % blocksize:
            raise ValueError(f"NF4 piece after {done} values: only the last piece may end inside a block")
        p, qs = quantize_4bit(piece.reshape(-1).to(torch.bfloat16), blocksize=blocksize, quant_type="nf4")
        packed.append(p)
        absmax.append(qs.absmax.float())
        code = qs.code
        done += piece.numel()
    if done != math.prod(shape) or code is None:
        raise ValueError(
            f"NF4 pieces hold {done} values, expected {math.prod(shape)} for shape {list(shape)}"
        )
    state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
    return {
        "weight": packed[0] if len(packed) == 1 else torch.cat(packed),
        "weight.absmax": absmax[0] if len(absmax) == 1 else torch.cat(absmax),
        "weight.quant_map": code.float(),
        "weight.quant_state.bitsandbytes__nf4": encode_state(state),
    }


def weight_bytes(out_features: int, in_features: int, blocksize: int = 64) -> int:
    """Stored bytes of one NF4 Linear weight: packed codes (N·K/2) + one fp32 absmax per block (no double
    quantization). The 64-byte code book and the JSON state count as file overhead, like the header."""
    n = out_features * in_features
    return n // 2 + 4 * -(-n // blocksize)


class NF4Linear(QuantizedLinear):
    """Linear layer with a resident NF4 weight: bitsandbytes' 4-bit matmul on CUDA, dequantize + matmul elsewhere.

    (bitsandbytes' CPU kernel repacks weights and requires output widths divisible by its tile size; dequantizing
    per forward works for every shape.) Storage: the packed codes `weight`, `absmax` and the code book `quant_map`
    (plus the nested absmax and code book of double-quantized files); bitsandbytes' `QuantState` is rebuilt from
    them at each call, so that offloading, which moves parameters, moves all of it.
    """

    def __init__(self, packed: torch.Tensor, stats: dict[str, torch.Tensor], bias, compute_dtype) -> None:
        from bitsandbytes.functional import QuantState

        qs = QuantState.from_dict(dict(stats), device=packed.device)
        out_features, in_features = qs.shape
        super().__init__(in_features, out_features, compute_dtype)
        self.store("weight", packed)
        self.store("absmax", qs.absmax)
        self.store("quant_map", qs.code)
        self.shape, self.blocksize, self.quant_type, self.state_dtype = (
            qs.shape,
            qs.blocksize,
            qs.quant_type,
            qs.dtype,
        )
        self.offset = None if qs.offset is None else float(qs.offset)
        nested = qs.state2
        self.store("nested_absmax", None if nested is None else nested.absmax)
        self.store("nested_quant_map", None if nested is None else nested.code)
        self.nested_blocksize = None if nested is None else nested.blocksize
        self.nested_dtype = None if nested is None else nested.dtype
        self.set_bias(bias)

    def quant_state(self, dtype: torch.dtype | None = None):
        """bitsandbytes' `QuantState` over this layer's storage (on its device)."""
        from bitsandbytes.functional import QuantState

        state2, offset = None, None
        if self.nested_absmax is not None:
            state2 = QuantState(
                absmax=self.stored("nested_absmax"),
                blocksize=self.nested_blocksize,
                code=self.stored("nested_quant_map"),
                dtype=self.nested_dtype,
            )
            offset = torch.tensor(self.offset, device=self.weight.device)
        return QuantState(
            absmax=self.stored("absmax"),
            shape=self.shape,
            code=self.stored("quant_map"),
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=dtype or self.state_dtype,
            offset=offset,
            state2=state2,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.weight, self.quant_state()).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias_as(x.dtype)
        if x.is_cuda:
            import bitsandbytes as bnb

            out = bnb.matmul_4bit(x, self.weight.t(), quant_state=self.quant_state(x.dtype))
            return out if bias is None else out + bias
        return torch.nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}"


@register_format
class NF4Format(LinearFormat):
    name = "nf4"
    extra_suffixes = ("weight.absmax", "weight.quant_map", *STATE_SUFFIXES, *NESTED)
    bits_per_weight = 4.5
    layout = "the bitsandbytes NF4 layout"
    # bitsandbytes 0.50.2 `QuantState.as_dict(packed=True)` and `Params4bit` with its default uint8 quant_storage:
    # packed codes U8, absmax and the code book F32, the JSON state U8 (`pack_dict_to_tensor`). With double
    # quantization the absmax is itself blockwise-quantized to U8 and its own absmax and code book are F32.
    stored_dtypes = {
        "weight": (torch.uint8,),
        "weight.absmax": (torch.float32,),
        "weight.quant_map": (torch.float32,),
        **{s: (torch.uint8,) for s in STATE_SUFFIXES},
        "weight.nested_absmax": (torch.float32,),
        "weight.nested_quant_map": (torch.float32,),
        "weight.quant_state.bitsandbytes__nested": (torch.uint8,),
    }

    def expected_dtypes(self, suffixes):
        if "weight.nested_absmax" in suffixes:
            return {**self.stored_dtypes, "weight.absmax": (torch.uint8,)}
        return self.stored_dtypes

    def matches(self, tensors) -> bool:
        return any(s in tensors for s in STATE_SUFFIXES)

    def weight_shape(self, tensors) -> tuple[int, int]:
        return tuple(state_json(tensors)[1]["shape"])

    def _stats(self, tensors) -> dict[str, torch.Tensor]:
        return {k[len("weight.") :]: v for k, v in tensors.items() if k.startswith("weight.")}

    def build(self, tensors, compute_dtype, **_):
        return NF4Linear(tensors["weight"], self._stats(tensors), tensors.get("bias"), compute_dtype)

    def dequantize(self, tensors) -> torch.Tensor:
        from bitsandbytes.functional import QuantState, dequantize_4bit

        qs = QuantState.from_dict(self._stats(tensors), device=torch.device("cpu"))
        return dequantize_4bit(tensors["weight"], qs).float()

    def slice_rows(self, suffix, tensor, part, parts):
        if any(s in suffix for s in ("nested",)):
            raise CheckpointError("double-quantized NF4 cannot be split into q/k/v; store it unfused")
        if suffix == "weight.quant_map":
            return tensor
        if suffix in STATE_SUFFIXES:
            state = json.loads(bytes(tensor.tolist()).decode())
            state["shape"] = [state["shape"][0] // parts, state["shape"][1]]
            return encode_state(state)
        n = tensor.shape[0]
        if n % parts:
            raise CheckpointError(f"NF4 tensor {suffix} with {n} entries cannot be split into {parts} parts")
        step = n // parts
        return tensor[part * step : (part + 1) * step]

    def join_rows(self, suffix, tensors):
        if suffix == "weight.quant_map":
            return tensors[0]
        if suffix in STATE_SUFFIXES:
            states = [json.loads(bytes(t.tolist()).decode()) for t in tensors]
            merged = dict(states[0], shape=[sum(s["shape"][0] for s in states), states[0]["shape"][1]])
            return encode_state(merged)
        return torch.cat(tensors, dim=0)
