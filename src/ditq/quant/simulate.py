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

from ditq.quant import fakes
from ditq.quant.fakes import FAKE_BUILDERS, _fake, fake_bytes, fake_linear, fake_model, on_device
from ditq.quant.recipes.base import Recipe


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
            stub,
            prompt="x",
            grid_h=grid[0],
            grid_w=grid[1],
            max_sequence_length=text_tokens,
            device=fakes.DEVICE,
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


def denoise_inputs(
    cond_model, uncond_model, scheduler, text_tokens, prompt_tokens, grid, llm_dim, in_channels
):
    """(pipeline stand-in, conditioning, initial latents) for `ditq.models.denoise.denoise` over two transformers,
    on `DEVICE` (fake tensors in fake mode; uninitialized real ones outside it, for timing and memory)."""
    from diffusers import Ideogram4Pipeline

    from ditq.models.denoise import Conditioning

    dtype = next(p.dtype for p in cond_model.parameters() if p.is_floating_point())
    pipe = SimpleNamespace(
        transformer=cond_model,
        unconditional_transformer=uncond_model,
        scheduler=scheduler,
        _execution_device=torch.device(fakes.DEVICE),
        _prepare_ids=Ideogram4Pipeline._prepare_ids,
    )
    cond = Conditioning(_fake(prompt_tokens, llm_dim, dtype=dtype), text_tokens, grid)
    latents = _fake(1, grid[0] * grid[1], in_channels, dtype=torch.float32)
    return pipe, cond, latents


def denoise_stage(
    cond_model, uncond_model, scheduler, text_tokens, prompt_tokens, grid, llm_dim, in_channels
) -> int:
    """Peak bytes one denoising step (both transformers, ditq's loop) allocates."""
    from ditq.models.denoise import denoise

    pipe, cond, latents = denoise_inputs(
        cond_model, uncond_model, scheduler, text_tokens, prompt_tokens, grid, llm_dim, in_channels
    )
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
        return {
            "components": dict(self.components),
            "block_bytes": dict(self.block_bytes),
            "stages": self.stages.as_dict(),
        }


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
    "denoise_inputs",
    "denoise_stage",
    "encode_stage",
    "fake_bytes",
    "fake_linear",
    "fake_mode",
    "fake_model",
    "on_device",
    "simulate",
]
