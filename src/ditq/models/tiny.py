"""A tiny random-weight Ideogram 4 pipeline built from the real diffusers/transformers classes.

Same classes, same wiring, toy sizes: a 36-layer Qwen3-VL text encoder (the pipeline taps layers 0, 3, ..., 33, 35)
with a byte-level BPE tokenizer trained offline, two `Ideogram4Transformer2DModel` instances (conditional and
unconditional) whose quantizable layers have input widths that are multiples of 256 (so GGUF k-quants apply),
a two-block `AutoencoderKLFlux2` and the real `FlowMatchEulerDiscreteScheduler`. A 64x64 image takes well under a
second on two CPU cores. `save_official_fp8` writes it in the official FP8 checkpoint layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Text the tokenizer learns merges from: caption JSON syntax plus common English.
_CORPUS = [
    '{"high_level_description":"","style_description":{"aesthetics":"","lighting":"","photo":"","medium":"",'
    '"art_style":"","color_palette":["#FFFFFF"]},"compositional_deconstruction":{"background":"","elements":'
    '[{"type":"obj","bbox":[0,0,1000,1000],"desc":"","color_palette":[]},{"type":"text","text":"","desc":""}]}}',
    "a photograph of a red fox in the snow, a minimalist poster for a jazz festival with bold typography",
    "the quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG 0123456789",
    "neon sign reading OPEN late at night, watercolor painting of a lighthouse, 3D render of a glass bottle",
    "soft even daylight, flat graphic design, centered, upper left, lower right, background, foreground",
]


@dataclass(frozen=True, kw_only=True)
class TinySpec:
    """Sizes of the tiny pipeline. Defaults keep quantizable input widths at multiples of 256."""

    vocab_size: int = 640
    text_hidden: int = 32
    text_layers: int = 36
    text_heads: int = 2
    text_kv_heads: int = 1
    text_head_dim: int = 16
    text_intermediate: int = 64
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 128
    intermediate: int = 512
    adaln_dim: int = 256
    mrope_section: tuple[int, int, int] = (12, 10, 10)
    vae_channels: tuple[int, ...] = (32, 32)
    latent_channels: int = 4
    max_sequence_length: int = 512

    def __post_init__(self) -> None:
        if self.text_layers < 36:
            raise ValueError("text_layers must be >= 36: the pipeline taps decoder layers up to 35")
        if sum(self.mrope_section) * 2 > self.head_dim:
            raise ValueError("mrope_section needs sum(mrope_section) <= head_dim / 2")


def build_tokenizer(vocab_size: int = 640):
    """A byte-level BPE tokenizer trained offline on a fixed corpus, with a Qwen-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.model_max_length = 32768
    return fast


def _text_encoder(spec: TinySpec, tokenizer):
    from transformers import Qwen3VLConfig, Qwen3VLModel

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": spec.text_hidden,
            "intermediate_size": spec.text_intermediate,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "head_dim": spec.text_head_dim,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": spec.text_hidden,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
            "patch_size": 4,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen3VLModel(config).eval()


def transformer_config(spec: TinySpec) -> dict:
    return {
        "in_channels": spec.latent_channels * 4,
        "num_layers": spec.num_layers,
        "attention_head_dim": spec.head_dim,
        "num_attention_heads": spec.num_heads,
        "intermediate_size": spec.intermediate,
        "adaln_dim": spec.adaln_dim,
        "llm_features_dim": 13 * spec.text_hidden,
        "mrope_section": list(spec.mrope_section),
    }


def build_tiny_pipeline(
    seed: int = 0,
    spec: TinySpec | None = None,
    with_prompt_enhancer: bool = True,
    dtype: torch.dtype = torch.float32,
):
    """Build a seeded tiny `Ideogram4Pipeline` (random weights, real classes) in memory."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Ideogram4Pipeline,
        Ideogram4Transformer2DModel,
    )
    from diffusers.pipelines.ideogram4.prompt_enhancer import Ideogram4PromptEnhancerHead

    spec = spec or TinySpec()
    tokenizer = build_tokenizer(spec.vocab_size)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = _text_encoder(spec, tokenizer)
        transformer = Ideogram4Transformer2DModel(**transformer_config(spec))
        unconditional = Ideogram4Transformer2DModel(**transformer_config(spec))
        _perturb_norms(transformer)
        _perturb_norms(unconditional)
        n = len(spec.vae_channels)
        vae = AutoencoderKLFlux2(
            block_out_channels=spec.vae_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            layers_per_block=1,
            latent_channels=spec.latent_channels,
            norm_num_groups=8,
            sample_size=64,
        )
        with torch.no_grad():
            vae.bn.running_mean.normal_(0.0, 0.1)
            vae.bn.running_var.uniform_(0.5, 1.5)
        head = Ideogram4PromptEnhancerHead(hidden_size=spec.text_hidden, vocab_size=len(tokenizer))
    finally:
        torch.random.set_rng_state(gen_state)
    pipe = Ideogram4Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        unconditional_transformer=unconditional.eval(),
        prompt_enhancer_head=head.eval() if with_prompt_enhancer else None,
    )
    pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _perturb_norms(model) -> None:
    """Random affine norm weights around 1 so that norms are not identities (as in a trained model)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)


def tiny_spec_dict(spec: TinySpec) -> dict:
    return dataclasses.asdict(spec)
