"""Ideogram 4's sampler in three stages ditq can separate: `encode` (text encoder), `denoise` (both transformers),
`decode` (VAE).

`Ideogram4Pipeline.__call__` runs all three in one call; ditq runs them apart so that every prompt of a run can be
encoded before the transformers are loaded onto the device (and the embeddings cached), each denoising step can be
timed and checked, and offload policies can place each stage. The arithmetic is the pipeline's own, step for step
(its helpers are called where they exist): a test holds `generate` equal to `pipe(...)` bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Conditioning:
    """One prompt's text conditioning in compact form: `text` [n, D], the features of its n tokens (in the text
    encoder's dtype: the pipeline's float32 features of a bf16 encoder are bf16 values, so nothing is lost), padded
    to `text_tokens` = T; `grid` is the image's token grid. `packed()` builds the pipeline's packed tensors from it
    (zeros for the padding and image rows, the layout ids from the pipeline's own `_prepare_ids`)."""

    text: torch.Tensor
    text_tokens: int
    grid: tuple[int, int]

    @property
    def prompt_tokens(self) -> int:
        return int(self.text.shape[0])

    def to(self, device) -> Conditioning:
        return Conditioning(self.text.to(device), self.text_tokens, self.grid)

    def packed(
        self, pipe, device, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(llm_features [1, T + N, D] in `dtype`, position_ids [1, T + N, 3], segment_ids, indicator [1, T + N]).

        The pipeline builds the features in float32 and casts them to the transformer's dtype; built in that
        dtype directly they hold the same values (bf16 features of a bf16 encoder) without the float32 copy."""
        n, t = self.prompt_tokens, self.text_tokens
        gh, gw = self.grid
        llm = torch.zeros(1, t + gh * gw, self.text.shape[1], dtype=dtype, device=device)
        llm[0, t - n : t] = self.text.to(device=device, dtype=torch.float32).to(dtype)
        pos, seg, ind = pipe._prepare_ids([n], gh, gw, t, device)
        return llm, pos, seg, ind


def grid(pipe, height: int, width: int) -> tuple[int, int]:
    m = pipe.vae_scale_factor * pipe.patch_size
    return height // m, width // m


def prompt_tokens(pipe, prompt: str) -> int:
    """The prompt's token count once chat-formatted, as `Ideogram4Pipeline.encode_prompt` tokenizes it."""
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    text = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return int(pipe.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].shape[1])


@torch.no_grad()
def encode(pipe, prompt: str, height: int, width: int, text_tokens: int, device=None) -> Conditioning:
    """The pipeline's `encode_prompt` for one prompt, with the text padded to `text_tokens`."""
    gh, gw = grid(pipe, height, width)
    device = device or pipe._execution_device
    llm, _, _, _ = pipe.encode_prompt(
        prompt=prompt, grid_h=gh, grid_w=gw, max_sequence_length=text_tokens, device=device
    )
    n = prompt_tokens(pipe, prompt)
    rows = llm[0, text_tokens - n : text_tokens]
    if pipe.text_encoder.dtype != torch.float32 and torch.equal(
        rows, rows.to(pipe.text_encoder.dtype).float()
    ):
        rows = rows.to(pipe.text_encoder.dtype)
    return Conditioning(rows.contiguous(), text_tokens, (gh, gw))


class StepTimer:
    """Seconds of each denoising step (both transformers and the scheduler), CUDA-synchronized."""

    def __init__(self, device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.steps: list[float] = []
        self._t = 0.0

    def start(self) -> None:
        self._sync()
        self._t = time.perf_counter()

    def step(self) -> None:
        self._sync()
        now = time.perf_counter()
        self.steps.append(now - self._t)
        self._t = now

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@torch.no_grad()
def denoise(
    pipe,
    cond: Conditioning,
    latents: torch.Tensor,
    height: int,
    width: int,
    guidance_schedule: list[float],
    mu: float,
    std: float,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The pipeline's denoising loop (its steps 4 to 8): returns the final latents [1, N, C] in float32.

    `on_step(i, latents)` is called after each step (timing, finiteness checks)."""
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import _logit_normal_sigmas, _resolution_aware_mu

    device = pipe._execution_device
    t_text = cond.text_tokens
    n_img = latents.shape[1]
    tr, un = pipe.transformer, pipe.unconditional_transformer
    llm, position_ids, segment_ids, indicator = cond.packed(pipe, device, tr.dtype)
    # the unconditional branch's text features are all zeros: one row, expanded, holds them
    neg_llm = torch.zeros(1, 1, llm.shape[-1], dtype=un.dtype, device=device).expand(1, n_img, -1)
    neg_pos, neg_seg, neg_ind = (t[:, t_text:] for t in (position_ids, segment_ids, indicator))
    sigmas = _logit_normal_sigmas(
        len(guidance_schedule), _resolution_aware_mu(height, width, mu), std, device=device
    )
    pipe.scheduler.set_timesteps(sigmas=sigmas.tolist(), device=device)
    gw = torch.as_tensor(guidance_schedule, dtype=torch.float32, device=device)
    latents = latents.to(device=device, dtype=torch.float32)
    text_pad = torch.zeros(1, t_text, latents.shape[-1], dtype=torch.float32, device=device)
    num_train = pipe.scheduler.config.num_train_timesteps
    for i, t in enumerate(pipe.scheduler.timesteps):
        t_model = (1.0 - (t.float() / num_train)).expand(1).to(tr.dtype)
        pos_z = torch.cat([text_pad, latents], dim=1).to(tr.dtype)
        pos_out = tr(
            hidden_states=pos_z,
            timestep=t_model,
            encoder_hidden_states=llm,
            position_ids=position_ids,
            segment_ids=segment_ids,
            indicator=indicator,
            attention_kwargs=None,
            return_dict=False,
        )[0]
        pos_v = pos_out[:, t_text:].to(torch.float32)
        neg_v = un(
            hidden_states=latents.to(un.dtype),
            timestep=t_model,
            encoder_hidden_states=neg_llm,
            position_ids=neg_pos,
            segment_ids=neg_seg,
            indicator=neg_ind,
            attention_kwargs=None,
            return_dict=False,
        )[0].to(torch.float32)
        v = gw[i] * pos_v + (1.0 - gw[i]) * neg_v
        latents = pipe.scheduler.step(-v, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i, latents)
    return latents


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The pipeline's VAE decode (its step 9) of latents [1, N, C]: the decoded image tensor [1, 3, H, W]."""
    gh, gw = grid(pipe, height, width)
    z = latents
    bn_mean = pipe.vae.bn.running_mean.view(1, 1, -1).to(device=z.device, dtype=z.dtype)
    bn_std = torch.sqrt(pipe.vae.bn.running_var + pipe.vae.config.batch_norm_eps).view(1, 1, -1)
    z = z * bn_std.to(device=z.device, dtype=z.dtype) + bn_mean
    patch = pipe.patch_size
    channels = z.shape[-1] // (patch * patch)
    z = z.view(1, gh, gw, patch, patch, channels).permute(0, 5, 1, 3, 2, 4).contiguous()
    z = z.view(1, channels, gh * patch, gw * patch)
    vae_device = next(pipe.vae.parameters()).device
    return pipe.vae.decode(z.to(device=vae_device, dtype=pipe.vae.dtype), return_dict=False)[0]


def decode(pipe, latents: torch.Tensor, height: int, width: int):
    """`decode_latents`, then the pipeline's post-processing: a PIL image."""
    decoded = decode_latents(pipe, latents, height, width)
    return pipe.image_processor.postprocess(decoded.float(), output_type="pil")[0]


def padded_text_tokens(n: int, multiple: int = 64, cap: int | None = None) -> int:
    """`n` rounded up to a multiple of `multiple` (at most `cap`)."""
    padded = max(multiple, math.ceil(n / multiple) * multiple)
    return padded if cap is None else min(padded, max(cap, n))
