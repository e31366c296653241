"""One full-size step of the whole pipeline on fake tensors: the memory each stage allocates, without the memory.

Every component is built at its real shapes in the variant's formats with fake storage
(`torch._subclasses.fake_tensor.FakeTensorMode`: tensors that have a shape, a dtype and a device but no data), then
runs ditq's own stages: the text encoder's `encode` on T tokens, one denoising step (both transformers, through
`ditq.models.denoise.denoise`) and the VAE's decode. `PeakTracker` (a dispatch mode with `MemTracker`'s storage accounting) records
the peak of the tensors each stage allocates. The quantized layers run their real compute paths: ditq's custom ops and
comfy-kitchen's through their fake implementations, GGUF's torch decoders and bitsandbytes' ops as they are.

The CPU build of torch cannot index fake CUDA tensors (its device guard for CUDA is missing), so the fake tensors
live on a fake CPU device; the ops are the GPU's, except that attention runs the CPU's flash kernel where the GPU
runs its memory-efficient one: neither materializes the L x L scores.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ditq.formats.keys import fused_module_name
from ditq.quant.recipes.base import Recipe

DEVICE = "cpu"


@dataclass(frozen=True)
class StagePeaks:
    """Peak bytes each stage allocates on top of the resident weights."""

    encode: int
    denoise: int
    decode: int

    def as_dict(self) -> dict[str, int]:
        return {"encode": self.encode, "denoise": self.denoise, "decode": self.decode}


class _NoAutocast(contextlib.nullcontext):
    """`torch.autocast(device_type=...)` stand-in: diffusers' RoPE disables autocast around a float32 matmul."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()


@contextlib.contextmanager
def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = torch.autocast
    torch.autocast = _NoAutocast
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        torch.autocast = real


class PeakTracker(TorchDispatchMode):
    """The peak bytes of the tensor storages allocated while it is active and still alive: every op's outputs
    are counted once per storage (views and in-place results, which share an input's, are not allocations) and
    dropped when their storage is freed. Sizes round up to
    the CUDA caching allocator's 512-byte blocks. It is `MemTracker`'s accounting of activations without its
    parameter and gradient bookkeeping (which installs gradient hooks, refused on frozen parameters)."""

    BLOCK = 512

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        inputs = {id(t.untyped_storage()) for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in leaves(out):
            # views and in-place results share an input's storage: not an allocation
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in inputs:
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self._live:
            return
        size = -(-storage.nbytes() // self.BLOCK) * self.BLOCK
        self._live[key] = (weakref.ref(storage, lambda _ref, key=key: self._free(key)), size)
        self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[1]


def _peak(fn: Callable[[], object]) -> int:
    tracker = PeakTracker()
    with torch.no_grad(), tracker:
        fn()
    return tracker.peak


# ----------------------------------------------------------------------------------------------- fake modules


def _fake(*shape, dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=DEVICE)


def fake_linear(recipe: Recipe | str, name: str, linear: nn.Linear, dtype: torch.dtype, context: dict) -> nn.Module:
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
        return Int8Linear(_fake(n, k, dtype=torch.int8), _fake(n, dtype=torch.float32), bias, compute_dtype=dtype)
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
        state = encode_state({"quant_type": "nf4", "blocksize": blocksize, "dtype": "bfloat16", "shape": [1, blocksize]})
        stats = {"absmax": torch.ones(1), "quant_map": torch.zeros(16), "quant_state.bitsandbytes__nf4": state}
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
        key = t.untyped_storage()._cdata  # tensors sharing a storage (tied, or shared by fused parts) count once
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# ------------------------------------------------------------------------------------------------------ stages


class _Tokens:
    """A tokenizer stand-in giving every prompt `n` tokens (their values do not change the memory)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def apply_chat_template(self, messages, **kwargs) -> str:
        return "x"

    def __call__(self, text, **kwargs):
        return {"input_ids": torch.zeros(1, self.n, dtype=torch.long)}


def encode_stage(text_encoder: nn.Module, text_tokens: int, prompt_tokens: int, grid: tuple[int, int]) -> int:
    """Peak bytes the pipeline's `encode_prompt` allocates for one prompt."""
    from diffusers import Ideogram4Pipeline

    stub = SimpleNamespace(
        tokenizer=_Tokens(prompt_tokens),
        text_encoder=text_encoder,
        _prepare_ids=Ideogram4Pipeline._prepare_ids,
        _get_text_encoder_hidden_states=Ideogram4Pipeline._get_text_encoder_hidden_states,
    )
    return _peak(
        lambda: Ideogram4Pipeline.encode_prompt(
            stub, prompt="x", grid_h=grid[0], grid_w=grid[1], max_sequence_length=text_tokens, device=DEVICE
        )
    )


class _Scheduler:
    """Flow-matching Euler steps for fake tensors: the same arithmetic and tensors per step as diffusers'
    `FlowMatchEulerDiscreteScheduler` (whose step lookup compares timesteps by value, which fake tensors hold none
    of)."""

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        self.config = SimpleNamespace(num_train_timesteps=num_train_timesteps)
        self.sigmas: list[float] = []

    def set_timesteps(self, sigmas, device=None) -> None:
        self.sigmas = [*sigmas, 0.0]
        self.timesteps = [torch.tensor(s * self.config.num_train_timesteps) for s in sigmas]
        self._index = 0

    def step(self, model_output, timestep, sample, return_dict=False):
        i = self._index
        self._index += 1
        prev = sample + (self.sigmas[i + 1] - self.sigmas[i]) * model_output
        return (prev,)


@contextlib.contextmanager
def _real_sigmas():
    """The pipeline's sigma schedule computed on real tensors (the loop reads it as numbers)."""
    from diffusers.pipelines.ideogram4 import pipeline_ideogram4 as module
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    original = module._logit_normal_sigmas

    def sigmas(*args, **kwargs):
        with unset_fake_temporarily():
            return original(*args, **{**kwargs, "device": "cpu"})

    module._logit_normal_sigmas = sigmas
    try:
        yield
    finally:
        module._logit_normal_sigmas = original


def denoise_stage(cond_model, uncond_model, scheduler, text_tokens, prompt_tokens, grid, llm_dim, in_channels) -> int:
    """Peak bytes one denoising step (both transformers, ditq's loop) allocates."""
    from diffusers import Ideogram4Pipeline

    from ditq.models.denoise import Conditioning, denoise

    dtype = next(p.dtype for p in cond_model.parameters() if p.is_floating_point())
    pipe = SimpleNamespace(
        transformer=cond_model,
        unconditional_transformer=uncond_model,
        scheduler=scheduler,
        _execution_device=torch.device(DEVICE),
        _prepare_ids=Ideogram4Pipeline._prepare_ids,
    )
    cond = Conditioning(_fake(prompt_tokens, llm_dim, dtype=dtype), text_tokens, grid)
    latents = _fake(1, grid[0] * grid[1], in_channels, dtype=torch.float32)
    with _real_sigmas():
        return _peak(lambda: denoise(pipe, cond, latents, 1024, 1024, [7.0], 0.0, 1.75))


def decode_stage(vae: nn.Module, grid: tuple[int, int], in_channels: int, height: int, width: int) -> int:
    """Peak bytes the VAE decode of one image allocates."""
    from ditq.models.denoise import decode_latents

    pipe = SimpleNamespace(vae=vae, patch_size=2, vae_scale_factor=height // (grid[0] * 2))
    latents = _fake(1, grid[0] * grid[1], in_channels, dtype=torch.float32)
    return _peak(lambda: decode_latents(pipe, latents, height, width))


# ------------------------------------------------------------------------------------------- whole pipeline


@dataclass(frozen=True)
class Simulation:
    """What one simulated step of a variant measured: the resident bytes of every component as built (fake
    storage, the variant's formats), the bytes of one transformer block of each transformer and of its layers
    outside the blocks (what group offloading keeps on the device), and the peak each stage allocates."""

    components: dict[str, int]
    block_bytes: dict[str, int]
    stages: StagePeaks

    def as_dict(self) -> dict:
        return {"components": dict(self.components), "block_bytes": dict(self.block_bytes),
                "stages": self.stages.as_dict()}


def simulate(
    components: dict[str, nn.Module],
    recipes: dict[str, Recipe | str],
    height: int,
    width: int,
    text_tokens: int,
    dtype: torch.dtype = torch.bfloat16,
    progress: Callable[[str], None] | None = None,
) -> Simulation:
    """One full step of the pipeline on fake tensors. `components` are built on meta (consumed: their modules are
    replaced); `recipes` maps each transformer to its recipe ("fp8" for the reference). The text encoder runs in
    the reference FP8 on a prompt of `text_tokens` tokens (the longest the padding allows: the worst case), the VAE
    in `dtype`."""
    say = progress or (lambda _msg: None)
    tr_cfg = components["transformer"].config
    vae = components["vae"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    grid = (height // (scale * 2), width // (scale * 2))
    built, blocks = {}, {}
    with fake_mode():
        say("text encoder")
        te = components["text_encoder"]
        if hasattr(te, "visual"):
            del te.visual
        built["text_encoder"] = fake_model(te, "fp8", dtype)
        say("encode")
        enc = encode_stage(built["text_encoder"], text_tokens, text_tokens, grid)
        for name in ("transformer", "unconditional_transformer"):
            say(name)
            built[name] = fake_model(components[name], recipes[name], dtype)
            blocks[name] = fake_bytes(built[name].layers[0])
        say("denoising step")
        den = denoise_stage(
            built["transformer"],
            built["unconditional_transformer"],
            _Scheduler(),
            text_tokens,
            text_tokens,
            grid,
            tr_cfg.llm_features_dim,
            tr_cfg.in_channels,
        )
        say("vae decode")
        built["vae"] = fake_model(vae, "bf16", dtype)
        dec = decode_stage(built["vae"], grid, tr_cfg.in_channels, height, width)
    sizes = {name: fake_bytes(m) for name, m in built.items()}
    return Simulation(sizes, blocks, StagePeaks(enc, den, dec))


__all__ = [
    "FAKE_BUILDERS",
    "Simulation",
    "StagePeaks",
    "decode_stage",
    "denoise_stage",
    "encode_stage",
    "fake_bytes",
    "fake_mode",
    "fake_model",
    "simulate",
]
