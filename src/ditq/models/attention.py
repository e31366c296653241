"""The attention kernel of Ideogram 4's transformers: PyTorch's SDPA (diffusers' default) or comfy-kitchen's INT8
attention (SageAttention-style: INT8 Q/K with a block-Hadamard rotation, INT8 P, FP32 softmax; CUDA, sm_80+).

diffusers' attention backends are a closed enum, so INT8 attention is an attention processor (diffusers' extension
point, `attn.set_processor`): Ideogram 4's own projection, QK-norm and multi-axis RoPE, then the INT8 kernel in
place of SDPA. With the SDPA kernel passed in instead, it computes exactly what diffusers' processor computes (a
test holds it), so the only difference in the benchmark is the kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ditq.errors import ConfigError

# q, k, v [B, H, L, D] and a bool mask [B, 1, L, L] (True: attend) -> [B, H, L, D]
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def int8_attention_kernel(q, k, v, mask):
    import comfy_kitchen as ck

    return ck.int8_attention(q, k, v, attn_mask=mask)


def sdpa_kernel(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Ideogram4KernelAttnProcessor:
    """Ideogram 4's attention computed with `kernel` (default: comfy-kitchen's INT8 attention)."""

    def __init__(self, kernel: Kernel | None = None) -> None:
        self.kernel = kernel or int8_attention_kernel

    def __call__(self, attn, hidden_states, attention_mask, image_rotary_emb):
        from diffusers.models.transformers.transformer_ideogram4 import _rotate_half

        heads = (attn.num_heads, attn.head_dim)
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, heads))
        k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, heads))
        v = attn.to_v(hidden_states).unflatten(-1, heads)
        cos, sin = (t.unsqueeze(2) for t in image_rotary_emb)
        q = (q * cos) + (_rotate_half(q) * sin)
        k = (k * cos) + (_rotate_half(k) * sin)
        out = self.kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask)
        return attn.to_out[0](out.transpose(1, 2).flatten(2, 3))


def int8_attention_available(device) -> tuple[bool, str]:
    """(available, why not): comfy-kitchen's INT8 attention kernel runs on CUDA GPUs it was built for."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"INT8 attention needs a CUDA GPU (comfy-kitchen's kernel); the device is {device}"
    try:
        import comfy_kitchen as ck
    except ImportError:
        return False, "comfy-kitchen is not installed"
    if not ck.int8_attention_is_available(device):
        return (
            False,
            f"comfy-kitchen's INT8 attention kernel does not support {torch.cuda.get_device_name(device)}",
        )
    return True, ""


def set_attention(pipe, attention: str, kernel: Kernel | None = None) -> None:
    """Use `attention` ("sdpa" or "int8") in both transformers; `kernel` overrides the INT8 kernel (tests)."""
    from diffusers.models.transformers.transformer_ideogram4 import Ideogram4Attention, Ideogram4AttnProcessor

    if attention == "int8" and kernel is None:
        ok, why = int8_attention_available(pipe._execution_device)
        if not ok:
            raise ConfigError(f"--attention int8: {why}; use --attention sdpa")
    for name in ("transformer", "unconditional_transformer"):
        for module in getattr(pipe, name).modules():
            if isinstance(module, Ideogram4Attention):
                proc = (
                    Ideogram4AttnProcessor() if attention == "sdpa" else Ideogram4KernelAttnProcessor(kernel)
                )
                module.set_processor(proc)
