"""Where the components of a pipeline live while it generates: the offload policies, through diffusers' own hooks.

| policy       | text encoder                        | transformers                               | moved per step |
|--------------|-------------------------------------|--------------------------------------------|----------------|
| `none`       | on the device with everything else  | resident                                   | nothing        |
| `encoder`    | encodes every prompt first, then is released from the device | resident          | nothing        |
| `group`      | as `encoder`                        | streamed block by block with prefetch (diffusers' group offloading, `use_stream` on CUDA) | both transformers |
| `model`      | diffusers' `enable_model_cpu_offload`: each component moved whole when it runs | moved whole | both, whole |
| `sequential` | as `encoder`                        | diffusers' leaf-level group offloading: every layer moved when it runs, the next one prefetched (`use_stream` on CUDA) | everything |

`auto` (the planner's choice of the fastest policy that fits the card) is resolved above this layer, by
`ditq.quant.plan`. For `encoder`, `group` and `sequential`, generation runs in two phases: the prompts are encoded by a pipeline
holding only the text encoder (`parts="encoder"`), then the transformers are loaded without it
(`parts="denoiser"`), so the two never share the device (nor does the host hold the whole pipeline).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable

import torch

from ditq.errors import ConfigError

log = logging.getLogger(__name__)

POLICIES = ("none", "encoder", "group", "model", "sequential")
# `sequential` is diffusers' leaf-level group offloading rather than `enable_sequential_cpu_offload`: accelerate's
# hooks re-cast the state dict's tensors to the dtype `getattr(module, name)` reads, which for ditq's storage (bytes
# kept under an integer dtype, read as float8 / float32) converts the bytes instead of moving them; and
# Ideogram4Pipeline.encode_prompt sends the token ids to `text_encoder.device`, `meta` under that offloading
TWO_PHASE = ("encoder", "group", "sequential")


def load_parts(policy: str) -> str:
    """Which components the generating pipeline of `policy` loads ("all" or "denoiser")."""
    return "denoiser" if policy in TWO_PHASE else "all"


def load_device(policy: str, device: str) -> str:
    """Where components are loaded: on the device, or on the CPU for the policies whose hooks move them."""
    return "cpu" if policy in ("group", "model", "sequential") else device


def apply_policy(pipe, policy: str, device: str) -> None:
    """Install `policy`'s hooks on a pipeline loaded by `load_pipeline(..., device=load_device(policy, device))`."""
    if policy not in POLICIES:
        raise ConfigError(f"--offload {policy!r}: expected one of {', '.join(POLICIES)} (or auto)")
    dev = torch.device(device)
    if policy in ("none", "encoder"):
        return
    if policy == "model":
        pipe.enable_model_cpu_offload(device=dev)
        return
    from diffusers.hooks import apply_group_offloading

    sequential = policy == "sequential"
    for name in ("transformer", "unconditional_transformer", *(("vae",) if sequential else ())):
        kwargs = (
            {"offload_type": "leaf_level"}
            if sequential
            else {"offload_type": "block_level", "num_blocks_per_group": 1}
        )
        apply_group_offloading(
            getattr(pipe, name),
            onload_device=dev,
            offload_device=torch.device("cpu"),
            use_stream=dev.type == "cuda",
            **kwargs,
        )
    if not sequential:
        module = getattr(pipe, "vae", None)
        if module is not None:
            module.to(dev)


def encode_all(
    source: str, prompts: Iterable[str], settings, device: str, dtype: torch.dtype, **load_args
) -> dict:
    """{prompt: Conditioning on the CPU} for every prompt, from a pipeline holding only the text encoder on
    `device`, released from the device before returning."""
    from ditq.models.denoise import encode
    from ditq.models.loading import load_pipeline
    from ditq.models.sampling import text_tokens

    pipe = load_pipeline(source, device=device, dtype=dtype, parts="encoder", **load_args)
    out = {}
    try:
        for prompt in dict.fromkeys(prompts):
            cond = encode(pipe, prompt, settings.height, settings.width, text_tokens(pipe, prompt, settings))
            out[prompt] = cond.to("cpu")
    finally:
        release(pipe)
    return out


def release(pipe) -> None:
    """Drop a pipeline's components and give their device memory back."""
    for name in list(pipe.components):
        setattr(pipe, name, None)
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
