"""Fixtures for the LoRA tests: the tiny pipeline in every format, transformer inputs, and float references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

VARIANTS = ("fp8", "int8", "q4_k", "nf4")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine spinning threads cost 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def variant_dirs(tiny_fp8_dir, tmp_path_factory):
    """{variant: pipeline folder}: the official FP8 tiny model and ditq's INT8 (no SmoothQuant), Q4_K and NF4
    folders written from it, each built on first use."""
    from ditq.quant.recipes import Int8Recipe
    from ditq.quant.writer import quantize_pipeline

    recipes = {"int8": Int8Recipe(smoothquant=False), "q4_k": "q4_k", "nf4": "nf4"}
    root = tmp_path_factory.mktemp("lora-variants")
    built = {"fp8": tiny_fp8_dir}

    def get(name: str):
        if name not in built:
            built[name] = quantize_pipeline(str(tiny_fp8_dir), recipes[name], root / name, progress=False)
        return built[name]

    return get


@pytest.fixture(scope="session")
def load_variant(variant_dirs):
    """A freshly loaded pipeline of a variant (each test may apply LoRAs to its own)."""
    from ditq.models.loading import load_pipeline

    return lambda name: load_pipeline(variant_dirs(name))


@pytest.fixture(scope="session")
def transformer_inputs(tiny_fp8_dir):
    """{transformer: keyword arguments of one call} recorded from one denoising step of the tiny pipeline (64 text
    tokens, 256 image tokens), in bf16 as the pipeline calls them."""
    from ditq.models.loading import load_pipeline

    pipe = load_pipeline(tiny_fp8_dir)
    got: dict[str, dict] = {}
    hooks = []
    for name in ("transformer", "unconditional_transformer"):

        def pre(module, args, kwargs, name=name):
            got.setdefault(name, {k: v for k, v in kwargs.items() if k != "return_dict"})

        hooks.append(getattr(pipe, name).register_forward_pre_hook(pre, with_kwargs=True))
    pipe(
        prompt="a red fox in the snow",
        height=64,
        width=64,
        num_inference_steps=1,
        guidance_schedule=[7.0],
        max_sequence_length=64,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    for h in hooks:
        h.remove()
    return got


def run(model: nn.Module, inputs: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The transformer's output for recorded inputs (float inputs cast to `dtype` when given)."""
    cast = dtype is not None
    kw = {
        k: v.to(dtype) if cast and torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in inputs.items()
    }
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


def float_reference(model: nn.Module, updates: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A float64 copy of `model` where every Linear-like layer is an nn.Linear holding its dequantized weight plus
    `updates[name]` (a float64 [out, in] LoRA update): the float reference of W + s·BA through the same model."""
    from ditq.lora.targets import is_linear

    ref = copy.deepcopy(model)
    for name, layer in list(ref.named_modules()):
        if not name or not is_linear(layer):
            continue
        if isinstance(layer, nn.Linear):
            w = layer.weight.detach().double()
        else:
            w = layer.dequantized_weight(torch.float32).double()
        if updates and name in updates:
            w = w + updates[name]
        lin = nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=torch.float64
        )
        with torch.no_grad():
            lin.weight.copy_(w)
            if layer.bias is not None:
                lin.bias.copy_(layer.bias.detach().double())
        parent, _, leaf = name.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, leaf, lin)
    return ref.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())
