"""LoRA on every Ideogram 4 variant: read the files people ship, apply them beside quantized layers, merge them.

    import ditq.lora as lora

    pipe = ditq.load_pipeline("variants/q4_k")
    lora.apply_lora(pipe, "style.safetensors", strength=0.8)          # a branch beside each adapted layer
    lora.apply_loras(pipe, ["a.safetensors:0.5", "b.safetensors"], strict=True)   # the CLI's --lora PATH[:S]
    lora.set_lora_strength(pipe, "style", 1.2)
    lora.unload_lora(pipe, "style")                                   # bit-identical to never having applied it
    lora.merge_lora_folder("ideogram-ai/ideogram-4-fp8", ["style.safetensors:0.8"], "merged")   # the reference
    ditq.quantize_pipeline("merged", "q4_k", "variants/q4_k-style")   # merge first, then quantize

Modules: `files` (reading and checking), `names` (key layouts), `targets` (mapping onto a model's Linears),
`adapters` (the fused low-rank branch), `api` (apply / strength / unload), `merge` (the float reference),
`frames` (layers whose coordinates SmoothQuant moved), `spec` (`LoraSpec`, `PATH[:STRENGTH]`).

## File layouts read

| layout | key of the factors of a module `m` |
|---|---|
| diffusers / peft | `transformer.m.lora_A.weight`, `transformer.m.lora_B.weight` (alpha from `lora_adapter_metadata`) |
| kohya / ai-toolkit / OneTrainer | `lora_unet_<m with . as _>.lora_down.weight`, `.lora_up.weight`, `.alpha` (also `lora_transformer_`) |
| ComfyUI / ai-toolkit | `diffusion_model.m.lora_A.weight` / `.lora_down.weight` (+ `.alpha`), `model.diffusion_model.` too |

`m` may be an official fused name (`layers.3.attention.qkv`, `layers.3.attention.o`) or a diffusers split name
(`layers.3.attention.to_q`, `layers.3.attention.to_out.0`), or any other Linear of the transformer
(`feed_forward.w1/w2/w3`, `adaln_modulation`, `llm_cond_proj`, `final_layer.linear`, ...). A fused qkv LoRA is the
split LoRA whose to_q, to_k, to_v share A and take B's thirds in that order, so both give the same result.
Roles `lora.down/up` and `lora_linear_layer.down/up` (older diffusers) are read too.

## Which transformer a key is for

| prefix | transformer |
|---|---|
| `transformer.`, `conditional_transformer.`, `diffusion_model.`, `model.diffusion_model.`, `base_model.model.`, `lora_unet_`, `lora_transformer_` | conditional (`transformer`) |
| `unconditional_transformer.`, `uncond.`, `diffusion_model.uncond.`, `model.diffusion_model.uncond.`, `lora_uncond_`, `lora_unconditional_transformer_` | unconditional |
| none (`layers.3.attention.qkv.lora_A.weight`) | conditional only, unless read with `unprefixed="both"` |

`uncond.` is the name stable-diffusion.cpp gives the unconditional model; `lora_uncond_` is what trainers that
adapt both Ideogram 4 transformers write next to `lora_unet_`. A file without prefixes goes to the conditional
transformer only, as diffusers' `Ideogram4LoraLoaderMixin` loads it: LoRAs are trained on the conditional
transformer (the one that reads the prompt), and the unconditional one is a different network whose output CFG
subtracts, so the same update on both would largely cancel in the guided direction instead of being a no-op.
`unprefixed="both"` (`LoraSpec(unprefixed="both")`) opts in for files meant for both.

## Applying (see `ditq.lora.adapters`)

y = layer(x) + x Aᵀ Bᵀ in the layer's compute dtype, for every format (FP8, INT8, ConvRot INT8, GGUF, NF4,
bf16 `nn.Linear`, and any `QuantizedLinear`), without requantizing and without replacing the layer: A and B fuse
every LoRA active on the layer, so several LoRAs cost one low-rank matmul pair per layer. INT8 folders quantized
with SmoothQuant folded into neighbours compute in scaled coordinates: the writer records their smoothing vectors
in the folder's `smoothing.safetensors`, the LoRA is mapped into those coordinates (`ditq.lora.frames`), and it is
refused on a folder without them.

Bad files raise `CheckpointError` naming the file and key (wrong rank, shape mismatch with the layer, NaN/Inf,
missing factors, duplicates); keys ditq does not apply are logged, listed in `AppliedLora.unknown`, and refused
with `strict=True`.
"""

from __future__ import annotations

from ditq.lora.api import (
    AppliedLora,
    applied_loras,
    apply_lora,
    apply_loras,
    check_folder_loras,
    set_branch_kernel,
    set_lora_strength,
    unload_lora,
)
from ditq.lora.files import LoraFactors, LoraFile, read_lora
from ditq.lora.frames import LayerFrame, smoothing_frames
from ditq.lora.merge import merge_lora_, merge_lora_folder, merged_weight
from ditq.lora.spec import LoraSpec, lora_records, parse_lora_arg, parse_lora_spec

__all__ = [
    "AppliedLora",
    "LayerFrame",
    "LoraFactors",
    "LoraFile",
    "LoraSpec",
    "applied_loras",
    "apply_lora",
    "apply_loras",
    "check_folder_loras",
    "lora_records",
    "merge_lora_",
    "merge_lora_folder",
    "merged_weight",
    "parse_lora_arg",
    "parse_lora_spec",
    "read_lora",
    "set_branch_kernel",
    "set_lora_strength",
    "smoothing_frames",
    "unload_lora",
]
