"""The modules a variant's loader would build, over fake storage (`FakeTensorMode`: shapes and dtypes, no data) or,
under `on_device`, over real uninitialized storage: every Linear in its format with the shapes its recipe writes,
every other tensor materialized from the meta model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ditq.formats.keys import fused_module_name
from ditq.quant.recipes.base import Recipe

DEVICE = "cpu"


def _fake(*shape, dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=DEVICE)


@contextlib.contextmanager
def on_device(device: str):
    """Build with real, uninitialized storage on `device` instead of fake storage (call outside `fake_mode`):
    full-size synthetic models whose speed and memory are real and whose outputs are meaningless."""
    global DEVICE
    previous, DEVICE = DEVICE, str(device)
    try:
        yield
    finally:
        DEVICE = previous


def fake_linear(
    recipe: Recipe | str, name: str, linear: nn.Linear, dtype: torch.dtype, context: dict
) -> nn.Module:
    """The module a variant's loader would put at Linear `name` (diffusers' name), with fake storage."""
    from ditq.formats.fp8 import Fp8Linear
    from ditq.quant.recipes import FP8Recipe, GGUFRecipe, Int8Recipe, NF4Recipe

    n, k = linear.out_features, linear.in_features
    bias = None if linear.bias is None else _fake(n, dtype=dtype)
    if recipe == "bf16":
        return _dense(n, k, bias, dtype)
    if recipe == "fp8" or isinstance(recipe, FP8Recipe):
        return Fp8Linear(_fake(n, k, dtype=torch.float8_e4m3fn), _fake(n, dtype=torch.float32), bias, dtype)
    if isinstance(recipe, Int8Recipe):
        from ditq.formats.int8 import Int8Linear

        if fused_module_name(name) not in context["int8"]:
            return _dense(n, k, bias, dtype)
        return Int8Linear(
            _fake(n, k, dtype=torch.int8), _fake(n, dtype=torch.float32), bias, compute_dtype=dtype
        )
    if isinstance(recipe, GGUFRecipe):
        return _fake_gguf(recipe, name, linear, bias, dtype)
    if isinstance(recipe, NF4Recipe):
        if not recipe.quantizes(f"{fused_module_name(name)}.weight", context["fused_shape"](name, linear)):
            return _dense(n, k, bias, dtype)
        return _fake_nf4(n, k, recipe.blocksize, bias, dtype)
    if not FAKE_BUILDERS:
        _register_w4a4()
    builder = FAKE_BUILDERS.get(type(recipe))
    if builder is None:
        raise ValueError(f"no fake builder for {type(recipe).__name__}")
    return builder(recipe, name, linear, dtype, context)


# recipe type -> builder(recipe, name, linear, dtype, context) -> module; formats added later register here
FAKE_BUILDERS: dict[type, Callable] = {}


def _fake_w4a4(recipe, name: str, linear: nn.Linear, dtype: torch.dtype, context: dict) -> nn.Module:
    """An SVDQuant or ConvRot W4A4 Linear over fake storage of the shapes its recipe writes (bf16 where the recipe
    keeps the layer)."""
    from ditq.formats.convrot_w4a4 import ConvRotW4A4Linear
    from ditq.formats.svdquant import SHARED, SVDQuantLinear
    from ditq.quant.recipes.w4a4 import SVDQuantRecipe

    n, k = linear.out_features, linear.in_features
    bias = None if linear.bias is None else _fake(n, dtype=dtype)
    if not recipe.quantizes(f"{fused_module_name(name)}.weight", context["fused_shape"](name, linear)):
        return _dense(n, k, bias, dtype)
    # the parts of a fused projection share their input-side tensors, as the loader gives them
    shared = context.setdefault("w4a4_shared", {}).setdefault(fused_module_name(name), {})
    t = {}
    for suffix, (dt, shape) in recipe.unit_specs(n, k).items():
        if suffix in SHARED and suffix in shared:
            t[suffix] = shared[suffix]
        else:
            t[suffix] = shared[suffix] = _fake(*shape, dtype=dt)
    if isinstance(recipe, SVDQuantRecipe):
        parts = ("weight", "weight_scale", "weight_proj_down", "weight_proj_up", "weight_smooth_factor")
        return SVDQuantLinear(*(t[p] for p in parts), bias, dtype)
    return ConvRotW4A4Linear(t["weight"], t["weight_scale"], bias, recipe.group_for(k), dtype)


def _register_w4a4() -> None:
    from ditq.quant.recipes.w4a4 import ConvRotW4A4Recipe, SVDQuantRecipe

    FAKE_BUILDERS[SVDQuantRecipe] = FAKE_BUILDERS[ConvRotW4A4Recipe] = _fake_w4a4


def _dense(n: int, k: int, bias, dtype) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(_fake(n, k, dtype=dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def _fake_gguf(recipe, name: str, linear: nn.Linear, bias, dtype) -> nn.Module:
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    from ditq.formats.gguf import GGUFLinear
    from ditq.quant.handlers import fused_shape

    n, k = linear.out_features, linear.in_features
    qtype, _ = recipe.tensor_type(f"{fused_module_name(name)}.weight", fused_shape(name, linear))
    if qtype in (Q.F32, Q.F16, Q.BF16):
        return _dense(n, k, bias, dtype)
    block, size = GGML_QUANT_SIZES[qtype]
    return GGUFLinear(_fake(n, k // block * size, dtype=torch.uint8), qtype, bias, dtype)


def _fake_nf4(n: int, k: int, blocksize: int, bias, dtype) -> nn.Module:
    """An NF4Linear of [n, k] over fake storage. bitsandbytes reads the layer's JSON state when it is built, which
    fake tensors cannot give, so the layer is built over a real one-block weight and then given its shape and
    fake storage."""
    import torch._subclasses.fake_tensor as fake_tensor

    from ditq.formats.nf4 import NF4Linear, encode_state

    with fake_tensor.unset_fake_temporarily():
        state = encode_state(
            {"quant_type": "nf4", "blocksize": blocksize, "dtype": "bfloat16", "shape": [1, blocksize]}
        )
        stats = {
            "absmax": torch.ones(1),
            "quant_map": torch.zeros(16),
            "quant_state.bitsandbytes__nf4": state,
        }
        layer = NF4Linear(torch.zeros(blocksize // 2, 1, dtype=torch.uint8), stats, None, dtype)
    layer.in_features, layer.out_features, layer.shape = k, n, torch.Size([n, k])
    layer.store("weight", _fake(n * k // 2, 1, dtype=torch.uint8))
    layer.store("absmax", _fake(n * k // blocksize, dtype=torch.float32))
    layer.store("quant_map", _fake(16, dtype=torch.float32))
    layer.set_bias(bias)
    return layer


def fake_model(meta_model: nn.Module, recipe: Recipe | str, dtype: torch.dtype) -> nn.Module:
    """`meta_model` (built on meta) with every Linear replaced as the variant's loader would, all storage fake."""
    from ditq.formats.fused import fuse_int8_projections_
    from ditq.quant.handlers import fused_shape
    from ditq.quant.modules import set_module
    from ditq.quant.recipes import Int8Recipe

    meta_model.to(dtype)  # on meta, before any fake storage joins it
    context: dict = {"fused_shape": fused_shape}
    if isinstance(recipe, Int8Recipe):
        from ditq.quant.sizes import int8_modules

        context["int8"] = int8_modules(recipe, meta_model)
    linears = [(n, m) for n, m in meta_model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in linears:
        set_module(meta_model, name, fake_linear(recipe, name, linear, dtype, context))
    model = _materialize(meta_model)
    fuse_int8_projections_(model)
    return model.eval()


def _materialize(model: nn.Module) -> nn.Module:
    """Every tensor still on meta replaced by a fake one of its shape and dtype (tied tensors stay tied). Done
    in place of `to_empty`, whose parameter swap refuses some modules' parameters under fake tensors."""
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, wrap in ((module._parameters, True), (module._buffers, False)):
            for name, t in table.items():
                if t is None or t.device.type != "meta":
                    continue
                if id(t) not in memo:
                    new = _fake(*t.shape, dtype=t.dtype)
                    memo[id(t)] = nn.Parameter(new, requires_grad=False) if wrap else new
                table[name] = memo[id(t)]
    return model


def fake_bytes(model: nn.Module) -> int:
    """Bytes of a fake model's parameters and buffers (its resident weights)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        key = (
            t.untyped_storage()._cdata
        )  # tensors sharing a storage (tied, or shared by fused parts) count once
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


__all__ = ["FAKE_BUILDERS", "fake_bytes", "fake_linear", "fake_model", "on_device"]
