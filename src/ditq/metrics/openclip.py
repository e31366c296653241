"""Convert an open_clip ViT state dict (as in HPSv2's checkpoints) into a transformers `CLIPModel`.

open_clip key                                  transformers key
token_embedding.weight                         text_model.embeddings.token_embedding.weight
positional_embedding            [T, D]         text_model.embeddings.position_embedding.weight
transformer.resblocks.{i}.ln_1 / ln_2          text_model.encoder.layers.{i}.layer_norm1 / layer_norm2
  .attn.in_proj_weight          [3D, D]        .self_attn.{q,k,v}_proj.weight (row thirds, in that order)
  .attn.in_proj_bias            [3D]           .self_attn.{q,k,v}_proj.bias
  .attn.out_proj                               .self_attn.out_proj
  .mlp.c_fc / .mlp.c_proj                      .mlp.fc1 / .mlp.fc2
ln_final                                       text_model.final_layer_norm
text_projection                 [D, E]         text_projection.weight [E, D] (transposed: open_clip does x @ P)
visual.conv1.weight             [W, 3, p, p]   vision_model.embeddings.patch_embedding.weight
visual.class_embedding          [W]            vision_model.embeddings.class_embedding
visual.positional_embedding     [1 + N, W]     vision_model.embeddings.position_embedding.weight
visual.ln_pre / visual.ln_post                 vision_model.pre_layrnorm / vision_model.post_layernorm
visual.transformer.resblocks.{i}.*             vision_model.encoder.layers.{i}.* (as for text)
visual.proj                     [W, E]         visual_projection.weight [E, W] (transposed)
logit_scale                                    logit_scale

Everything but the attention head counts is read from the tensor shapes; the head counts default to
ViT-H-14's (16 text heads of 64, 16 vision heads of 80). Activation: exact GELU (ViT-H-14 has no QuickGELU).
"""

from __future__ import annotations

import re

import torch

from ditq.errors import CheckpointError

_BLOCK_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP_LEVEL = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
# Buffers some open_clip versions save; transformers rebuilds them.
_IGNORED = {"attn_mask", "visual.attn_mask"}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def unwrap_checkpoint(obj: object) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint ({"state_dict": ...}), without DDP's `module.` prefix."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            "expected an open_clip state dict (a dict of tensors, maybe under 'state_dict')"
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def convert_openclip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip keys -> transformers CLIPModel keys (float32); raises CheckpointError on unknown keys."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        tensor = tensor.detach().float()
        if key in _IGNORED:
            continue
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = tensor
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = tensor.t().contiguous()
            continue
        match = _BLOCK.match(key)
        if not match:
            unknown.append(key)
            continue
        tower = "vision_model" if match.group(1) else "text_model"
        prefix = f"{tower}.encoder.layers.{match.group(2)}."
        rest = match.group(3)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if rest.endswith("weight") else "bias"
            if tensor.shape[0] % 3:
                raise CheckpointError(f"{key} has {tensor.shape[0]} rows, not a multiple of 3 (q, k, v)")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
            continue
        module, _, leaf = rest.rpartition(".")
        if module not in _BLOCK_PARTS:
            unknown.append(key)
            continue
        out[f"{prefix}{_BLOCK_PARTS[module]}.{leaf}"] = tensor
    if unknown:
        raise CheckpointError(f"not an open_clip ViT state dict: unexpected keys {unknown[:6]}")
    return out


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def clip_config_from_openclip(
    state: dict[str, torch.Tensor],
    *,
    text_heads: int = 16,
    vision_heads: int = 16,
    bos_token_id: int = 49406,
    eos_token_id: int = 49407,
    pad_token_id: int = 0,
):
    """A `CLIPConfig` matching the shapes of an open_clip ViT state dict (open_clip keys)."""
    from transformers import CLIPConfig

    try:
        vocab, text_width = state["token_embedding.weight"].shape
        context = state["positional_embedding"].shape[0]
        vision_width, _, patch, _ = state["visual.conv1.weight"].shape
        tokens = state["visual.positional_embedding"].shape[0]
        embed_dim = state["text_projection"].shape[1]
        text_mlp = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        vision_mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"not an open_clip ViT state dict: missing {exc.args[0]!r}") from None
    grid = round((tokens - 1) ** 0.5)
    if grid * grid != tokens - 1:
        raise CheckpointError(f"visual.positional_embedding has {tokens} rows, expected 1 + a square grid")
    text_config = {
        "vocab_size": vocab,
        "hidden_size": text_width,
        "intermediate_size": text_mlp,
        "num_hidden_layers": _count_blocks(state, ""),
        "num_attention_heads": text_heads,
        "max_position_embeddings": context,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": embed_dim,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    vision_config = {
        "hidden_size": vision_width,
        "intermediate_size": vision_mlp,
        "num_hidden_layers": _count_blocks(state, "visual."),
        "num_attention_heads": vision_heads,
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": embed_dim,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed_dim)


def clip_model_from_openclip(state: dict[str, torch.Tensor], **config_kwargs):
    """Build a transformers CLIPModel (float32, eval) holding an open_clip ViT state dict's weights."""
    from transformers import CLIPModel
    from transformers.initialization import no_init_weights

    state = unwrap_checkpoint(state)
    config = clip_config_from_openclip(state, **config_kwargs)
    with no_init_weights():  # every weight is loaded below (checked), so skip ~40 s of random init for ViT-H
        model = CLIPModel(config)
    converted = convert_openclip_state_dict(state)
    try:
        result = model.load_state_dict(converted, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(
            f"open_clip weights do not fit the CLIP model built from their shapes: {exc}"
        ) from None
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"open_clip weights do not fill the CLIP model: missing {missing[:6]}, unexpected {result.unexpected_keys[:6]}"
        )
    return model.eval().requires_grad_(False)
