"""LoRA files written the way the tools that ship them write them, from one canonical description.

A canonical LoRA is `{diffusers split name: (A [rank, in], B [out, rank])}` with update B A (scale 1). The writers
spell it in each layout with `safetensors.torch.save_file` (never with ditq's writers):

- diffusers / peft: `transformer.<m>.lora_A.weight` / `lora_B.weight`, no alpha (peft's default scale 1);
- kohya / ai-toolkit: `lora_unet_<m with dots as _>.lora_down.weight` / `lora_up.weight` and `.alpha`, with B
  stored as B · rank / alpha so that the file's scale alpha / rank gives back B A (exactly: rank / alpha is a
  power of two here);
- ComfyUI: `diffusion_model.<m>.lora_down.weight` / `lora_up.weight` (+ `.alpha`, same convention).

`fuse_qkv` rewrites to_q/to_k/to_v sharing one A into the official `attention.qkv` (B's stacked in q, k, v order)
and `to_out.0` into `attention.o`, as ai-toolkit files name them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

Canonical = dict[str, tuple[torch.Tensor, torch.Tensor]]
_QKV = re.compile(r"^(layers\.\d+\.attention\.)to_([qkv])$")


def random_lora(
    shapes: dict[str, tuple[int, int]],
    modules: list[str],
    rank: int = 4,
    seed: int = 0,
    magnitude: float = 1.0,
    share_qkv_down: bool = True,
    dtype: torch.dtype = torch.bfloat16,
) -> Canonical:
    """Random factors on `modules`; to_q/to_k/to_v of one block share A when `share_qkv_down` (so the LoRA also
    has a fused qkv spelling). `magnitude` scales B A relative to a unit-variance input's output."""
    gen = torch.Generator().manual_seed(seed)
    out: Canonical = {}
    shared: dict[str, torch.Tensor] = {}
    for name in modules:
        n, k = shapes[name]
        m = _QKV.match(name)
        if m and share_qkv_down and m.group(1) in shared:
            a = shared[m.group(1)]
        else:
            a = (torch.randn(rank, k, generator=gen) / k**0.5).to(dtype)
            if m:
                shared[m.group(1)] = a
        b = (torch.randn(n, rank, generator=gen) * magnitude / rank**0.5).to(dtype)
        out[name] = (a, b)
    return out


def fuse_qkv(lora: Canonical) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The same LoRA under the official fused names (to_q/k/v must share A; B's stacked q, k, v)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    blocks: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, ab in lora.items():
        m = _QKV.match(name)
        if m:
            blocks.setdefault(m.group(1), {})[m.group(2)] = ab
        elif name.endswith(".attention.to_out.0"):
            out[name[: -len("to_out.0")] + "o"] = ab
        else:
            out[name] = ab
    for head, parts in blocks.items():
        a = parts["q"][0]
        assert all(torch.equal(parts[p][0], a) for p in "qkv"), "qkv parts must share A to be fused"
        out[head + "qkv"] = (a, torch.cat([parts[p][1] for p in "qkv"], dim=0))
    return out


def peft_state(lora, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b) in lora.items():
        out[f"{prefix}{name}.lora_A.weight"] = a.clone()
        out[f"{prefix}{name}.lora_B.weight"] = b.clone()
    return out


def _with_alpha(a, b, alpha: float):
    rank = a.shape[0]
    return a.clone(), (b.float() * (rank / alpha)).to(b.dtype), torch.tensor(alpha, dtype=torch.float32)


def kohya_state(lora, prefix: str = "lora_unet_", alpha: float = 2.0) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b) in lora.items():
        flat = prefix + name.replace(".", "_")
        down, up, al = _with_alpha(a, b, alpha)
        out[f"{flat}.lora_down.weight"], out[f"{flat}.lora_up.weight"], out[f"{flat}.alpha"] = down, up, al
    return out


def comfy_state(lora, prefix: str = "diffusion_model.", alpha: float = 8.0) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b) in lora.items():
        down, up, al = _with_alpha(a, b, alpha)
        out[f"{prefix}{name}.lora_down.weight"], out[f"{prefix}{name}.lora_up.weight"] = down, up
        out[f"{prefix}{name}.alpha"] = al
    return out


def save(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def update(lora, name: str) -> torch.Tensor:
    """B A of one module in float64."""
    a, b = lora[name]
    return b.double() @ a.double()
