"""The text conditioning of every prompt of a run, encoded once and cached in the run folder.

Every variant ditq writes reuses the reference's text encoder, so a prompt's conditioning is the same for all of
them: a run encodes each prompt once, with only the text encoder on the device, and the transformers never share the
card with it. `RUN/embeddings/<key>.safetensors` holds one prompt's token features (`text` [n, D], in the encoder's
dtype) and its padded length; the key hashes the prompt, the padded length, the image grid, the compute dtype and a
fingerprint of the text encoder's files, so variants with another encoder get their own entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from ditq.io.files import folder_fingerprint
from ditq.models.denoise import Conditioning

log = logging.getLogger(__name__)
FOLDER = "embeddings"


def encoder_id(model_folder: Path) -> str:
    return folder_fingerprint(Path(model_folder) / "text_encoder")[:24]


class EmbeddingCache:
    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.root = Path(run_dir) / FOLDER

    @staticmethod
    def key(prompt: str, text_tokens: int, grid: tuple[int, int], dtype: torch.dtype, encoder: str) -> str:
        payload = json.dumps([prompt, text_tokens, list(grid), str(dtype), encoder], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> Conditioning | None:
        from ditq.errors import CheckpointError
        from ditq.io.safetensors_io import TensorSource

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            src = TensorSource(path)
            meta = json.loads(src.metadata.get("ditq.conditioning", "{}"))
            cond = Conditioning(src.get("text").clone(), int(meta["text_tokens"]), tuple(meta["grid"]))
        except (CheckpointError, KeyError, ValueError, TypeError) as exc:
            log.warning("%s: unreadable cached embedding (%s); encoding it again", path, exc)
            return None
        return cond

    def put(self, key: str, cond: Conditioning) -> None:
        """Written under a unique temporary name and renamed: ranks that encode the same prompt never collide."""
        from ditq.io.safetensors_io import save_safetensors

        self.root.mkdir(parents=True, exist_ok=True)
        meta = {"ditq.conditioning": json.dumps({"text_tokens": cond.text_tokens, "grid": list(cond.grid)})}
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".safetensors", dir=self.root)
        os.close(fd)
        try:
            save_safetensors(tmp, {"text": cond.text.detach().cpu().contiguous()}, meta)
            os.replace(tmp, self.path(key))
        finally:
            Path(tmp).unlink(missing_ok=True)


def ensure_embeddings(
    cache: EmbeddingCache, model: str, prompts: Iterable[str], settings, device: str, dtype: torch.dtype
) -> dict[str, str]:
    """{prompt: cache key} for `prompts` under `model`'s text encoder, encoding (with only the text encoder on the
    device, released afterwards) the ones not cached yet."""
    from ditq.models.denoise import grid, padded_text_tokens, prompt_tokens
    from ditq.models.loading import resolve_source

    folder = resolve_source(model)
    enc = encoder_id(folder)
    prompts = list(dict.fromkeys(prompts))
    tokenizer_pipe = _tokenizer_pipe(folder)
    g = grid(tokenizer_pipe, settings.height, settings.width)
    keys, missing = {}, []
    for p in prompts:
        if settings.text_padding == "fixed":
            t = settings.max_sequence_length
        else:
            t = padded_text_tokens(prompt_tokens(tokenizer_pipe, p), 64, cap=settings.max_sequence_length)
        keys[p] = cache.key(p, t, g, dtype, enc)
        if not cache.path(keys[p]).is_file():
            missing.append(p)
    if missing:
        from ditq.models.placement import encode_all

        log.info("encoding %d prompt(s) with %s's text encoder", len(missing), model)
        for p, cond in encode_all(model, missing, settings, device, dtype).items():
            cache.put(keys[p], cond)
    return keys


class _TokenizerOnly:
    """What `grid` and `prompt_tokens` read from a pipeline: its tokenizer and its VAE's scale factor."""

    def __init__(self, tokenizer, vae_scale_factor: int) -> None:
        self.tokenizer, self.vae_scale_factor, self.patch_size = tokenizer, vae_scale_factor, 2


def _tokenizer_pipe(folder: Path) -> _TokenizerOnly:
    from diffusers import AutoencoderKLFlux2
    from transformers import AutoTokenizer

    config = AutoencoderKLFlux2.load_config(folder / "vae")
    return _TokenizerOnly(
        AutoTokenizer.from_pretrained(folder / "tokenizer"), 2 ** (len(config["block_out_channels"]) - 1)
    )
