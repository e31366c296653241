"""Prompt-image preference: CLIP score, PickScore and HPSv2.1, all on transformers' `CLIPModel`.

Each embeds the image and the prompt text, L2-normalizes both and scores their cosine c:
- `clip_score`: 100 * max(c, 0), torchmetrics' definition, `openai/clip-vit-large-patch14`.
- `pickscore`: exp(logit_scale) * c, PickScore's definition, model `yuvalkirstain/PickScore_v1` with the
  processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`.
- `hpsv2`: 100 * c (the scale of HPSv2's benchmark tables), the v2.1 checkpoint `HPS_v2.1_compressed.pt`
  of `xswu/HPSv2`, an open_clip ViT-H-14 state dict converted to a CLIPModel (see `openclip.py`), with the
  tokenizer and image processor of the ViT-H-14 repo (resize the short side to 224 bicubic, centre crop,
  OpenAI mean / std, as open_clip's eval transform).

Prompts longer than the text context (77 tokens) are truncated, keeping the end-of-text token.

Nothing is downloaded. A source is a local folder / file or a hub id looked up in the local Hugging Face
cache only; each can be overridden by an argument or an environment variable:
    $DITQ_CLIP_MODEL, $DITQ_PICKSCORE_MODEL, $DITQ_PICKSCORE_PROCESSOR, $DITQ_HPSV2_CHECKPOINT,
    $DITQ_HPSV2_PROCESSOR.
When a source is absent the metric is unavailable, with a one-line reason: the `hf download` command or the
variable that makes it available (or, for a source given explicitly, what that folder lacks).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ditq.errors import CheckpointError
from ditq.metrics.base import METRICS, Metric, MetricStatus, ScoreItem

logger = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
MODEL_FILES = (("config.json",), WEIGHT_FILES)
PROCESSOR_FILES = (("preprocessor_config.json",), ("tokenizer.json", "vocab.json"))
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _cached_file(repo_id: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None


GROUP_LABELS = {WEIGHT_FILES: "model weights", ("tokenizer.json", "vocab.json"): "tokenizer"}


def _label(group: Sequence[str]) -> str:
    return GROUP_LABELS.get(tuple(group), group[0])


def find_folder(source: str, needed: Sequence[Sequence[str]]) -> tuple[str | None, str | None]:
    """Where `source` (a folder or a hub id in the local cache) holds one file of each group in `needed`.

    Returns (what to pass to `from_pretrained`, None) or (None, what is missing in a few words).
    """
    path = Path(source).expanduser()
    if path.exists() or not _REPO_ID.match(source):
        lacking = [_label(group) for group in needed if not any((path / f).is_file() for f in group)]
        if lacking:
            return None, f"{path} lacks {', '.join(lacking)}"
        return str(path), None
    lacking = [_label(group) for group in needed if not any(_cached_file(source, f) for f in group)]
    if lacking:
        return None, f"{source} is not in the Hugging Face cache"
    return source, None


def find_file(source: str, default_repo: str, filename: str) -> tuple[str | None, str | None]:
    """A single weights file: a path (or a folder holding `filename`), else `filename` of a hub id in the cache."""
    if source:
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / filename
        if path.is_file():
            return str(path), None
        if not _REPO_ID.match(source):
            return None, f"{path}: no such file"
    repo = source or default_repo
    found = _cached_file(repo, filename)
    if found is None:
        return None, f"{filename} of {repo} is not in the Hugging Face cache"
    return found, None


def weight_paths(source: str) -> list[Path]:
    """The weight files `from_pretrained` reads for a folder or a cached hub id, in its order of preference
    (safetensors first); the shards of an index. [] when none is found."""
    folder = Path(source).expanduser()

    def lookup(name: str) -> Path | None:
        if folder.is_dir():
            return folder / name if (folder / name).is_file() else None
        if _REPO_ID.match(source):
            found = _cached_file(source, name)
            return Path(found) if found else None
        return None

    for name in WEIGHT_FILES:
        found = lookup(name)
        if found is None:
            continue
        if not name.endswith(".index.json"):
            return [found]
        try:
            weight_map = json.loads(found.read_text(encoding="utf-8")).get("weight_map", {})
            shards = sorted({str(v) for v in weight_map.values()})
        except (OSError, ValueError, AttributeError):
            return [found]
        return [found, *[p for p in map(lookup, shards) if p is not None]]
    return []


def load_processor(source: str):
    """(tokenizer, image processor) of a CLIP-style folder or cached hub id, from local files only."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=True)
        image_processor = CLIPImageProcessorPil.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot load the CLIP tokenizer / image processor of {source}: {exc}"
        ) from None
    return tokenizer, image_processor


class ClipPreference(Metric):
    """Shared machinery: resolve sources, load once, embed in batches, apply `formula` to the cosine."""

    family = "preference"
    higher_is_better = True
    model_env: str
    default_model: str
    processor_env: str | None = None
    default_processor: str | None = None  # None: the model folder holds the processor too

    def __init__(self, model: str | Path | None = None, processor: str | Path | None = None) -> None:
        self._model_arg = str(model) if model else None
        self._processor_arg = str(processor) if processor else None
        self._loaded = None  # (model, tokenizer, image_processor)
        self._device = "cpu"
        self._text_cache: dict[str, torch.Tensor] = {}

    # -- sources
    def model_source(self) -> str:
        return self._model_arg or os.environ.get(self.model_env) or self.default_model

    def processor_source(self) -> str:
        if self._processor_arg:
            return self._processor_arg
        if self.processor_env and os.environ.get(self.processor_env):
            return os.environ[self.processor_env]
        return self.default_processor or self.model_source()

    def _resolve_model(self) -> tuple[str | None, str | None]:
        return find_folder(self.model_source(), MODEL_FILES)

    def _given(self, arg: str | None, env: str | None) -> str | None:
        """How a source was given: "$VAR", "argument", or None when it is the default hub id."""
        if arg:
            return "argument"
        return f"${env}" if env and os.environ.get(env) else None

    def _resolve(self) -> tuple[str | None, str | None, str | None]:
        """(model source, processor source, None) when both are found, else (.., .., one line: what to get)."""
        model_env, processor_env = self.model_env, self.processor_env or self.model_env
        if self.processor_source() == self.model_source():
            found, problem = find_folder(self.model_source(), (*MODEL_FILES, *PROCESSOR_FILES))
            parts = [(problem, self.default_model, self._model_arg, model_env)] if problem else []
            model = processor = found
        else:
            model, model_problem = self._resolve_model()
            processor, processor_problem = find_folder(self.processor_source(), PROCESSOR_FILES)
            parts = []
            if model_problem:
                parts.append((model_problem, self.default_model, self._model_arg, model_env))
            if processor_problem:
                default = self.default_processor or self.default_model
                parts.append((processor_problem, default, self._processor_arg, processor_env))
        if not parts:
            return model, processor, None
        return model, processor, self._reason(parts)

    def download(self, default: str) -> str:
        """The arguments of `hf download` that fetch a default source."""
        return default

    def _reason(self, parts: list[tuple[str, str, str | None, str]]) -> str:
        """One line: the given sources that lack files, then the `hf download` commands for missing defaults."""
        explicit, commands, variables = [], [], []
        for problem, default, arg, env in parts:
            given = self._given(arg, env)
            if given == "argument":
                explicit.append(problem)
            elif given:
                explicit.append(f"{given}: {problem}")
            else:
                commands.append(f"`hf download {self.download(default)}`")
                variables.append(f"${env}")
        if commands:
            explicit.append(f"needs {' and '.join(commands)} (or {', '.join(variables)})")
        return "; ".join(explicit)

    def status(self) -> MetricStatus:
        *_, problem = self._resolve()
        return MetricStatus.missing(problem) if problem else MetricStatus.ok()

    def model(self) -> str | None:
        model, processor = self.model_source(), self.processor_source()
        return model if processor == model else f"{model} (processor {processor})"

    def weight_files(self) -> list[Path]:
        model, _processor, problem = self._resolve()
        return [] if problem or model is None else weight_paths(model)

    # -- loading
    def build_model(self, source: str, tokenizer):
        from transformers import CLIPModel

        try:
            return CLIPModel.from_pretrained(source, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load CLIPModel from {source}: {exc}") from None

    def load(self, device: str = "cpu") -> None:
        if self._loaded is not None and self._device == device:
            return
        model_source, processor_source, problem = self._resolve()
        if problem:
            raise CheckpointError(problem)
        tokenizer, image_processor = load_processor(processor_source)
        model = self.build_model(model_source, tokenizer).eval().requires_grad_(False).to(device)
        self._loaded = (model, tokenizer, image_processor)
        self._device = device
        self._text_cache = {}

    def unload(self) -> None:
        self._loaded = None
        self._text_cache = {}

    # -- scoring
    @torch.inference_mode()
    def embed_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 [H, W, 3] images -> L2-normalized float32 [B, E]."""
        from PIL import Image

        model, _, image_processor = self._loaded
        pixels = image_processor(
            images=[Image.fromarray(np.asarray(a, dtype=np.uint8)) for a in images], return_tensors="pt"
        )
        pixel_values = pixels["pixel_values"].to(self._device, torch.float32)
        pooled = model.vision_model(pixel_values=pixel_values).pooler_output
        features = model.visual_projection(pooled)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> L2-normalized float32 [B, E]; each distinct prompt is encoded once per load."""
        model, tokenizer, _ = self._loaded
        todo = sorted({p for p in prompts if p not in self._text_cache})
        if todo:
            tokens = tokenizer(
                todo,
                padding=True,
                truncation=True,
                max_length=model.config.text_config.max_position_embeddings,
                return_tensors="pt",
            )
            pooled = model.text_model(
                input_ids=tokens["input_ids"].to(self._device),
                attention_mask=tokens["attention_mask"].to(self._device),
            ).pooler_output
            features = torch.nn.functional.normalize(model.text_projection(pooled).float(), dim=-1)
            self._text_cache.update(zip(todo, features, strict=True))
        return torch.stack([self._text_cache[p] for p in prompts])

    def formula(self, cosine: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        if not items:
            return []
        if self._loaded is None:
            self.load(self._device)
        images = self.embed_images([item.image for item in items])
        texts = self.embed_texts([item.prompt for item in items])
        cosine = (images.double() * texts.double()).sum(dim=-1).cpu().numpy()
        return [float(v) for v in self.formula(cosine)]


class ClipScore(ClipPreference):
    """torchmetrics' CLIPScore: 100 * max(cos(image, text), 0) with CLIP ViT-L/14."""

    name = "clip_score"
    model_env = "DITQ_CLIP_MODEL"
    default_model = "openai/clip-vit-large-patch14"

    def formula(self, cosine: np.ndarray) -> np.ndarray:
        return 100.0 * np.maximum(cosine, 0.0)


class PickScore(ClipPreference):
    """PickScore v1: exp(logit_scale) * cos(image, text)."""

    name = "pickscore"
    model_env = "DITQ_PICKSCORE_MODEL"
    default_model = "yuvalkirstain/PickScore_v1"
    processor_env = "DITQ_PICKSCORE_PROCESSOR"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def formula(self, cosine: np.ndarray) -> np.ndarray:
        model = self._loaded[0]
        return float(model.logit_scale.detach().double().exp()) * cosine


class HPSv2(ClipPreference):
    """HPS v2.1: 100 * cos(image, text) with the HPSv2.1-tuned open_clip ViT-H-14."""

    name = "hpsv2"
    model_env = "DITQ_HPSV2_CHECKPOINT"
    default_model = "xswu/HPSv2"
    checkpoint_file = "HPS_v2.1_compressed.pt"
    processor_env = "DITQ_HPSV2_PROCESSOR"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(
        self,
        model: str | Path | None = None,
        processor: str | Path | None = None,
        *,
        text_heads: int = 16,
        vision_heads: int = 16,
    ) -> None:
        super().__init__(model, processor)
        self.text_heads = text_heads
        self.vision_heads = vision_heads

    def _resolve_model(self) -> tuple[str | None, str | None]:
        source = self._model_arg or os.environ.get(self.model_env) or ""
        return find_file(source, self.default_model, self.checkpoint_file)

    def download(self, default: str) -> str:
        return f"{default} {self.checkpoint_file}" if default == self.default_model else default

    def model(self) -> str | None:
        source = (
            self._model_arg
            or os.environ.get(self.model_env)
            or f"{self.default_model}/{self.checkpoint_file}"
        )
        return f"{source} (open_clip ViT-H-14; processor {self.processor_source()})"

    def weight_files(self) -> list[Path]:
        found, problem = self._resolve_model()
        return [] if problem or found is None else [Path(found)]

    def build_model(self, source: str, tokenizer):
        from ditq.metrics.openclip import clip_model_from_openclip

        try:
            checkpoint = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt files
            raise CheckpointError(f"cannot read HPSv2 checkpoint {source}: {exc}") from None
        return clip_model_from_openclip(
            checkpoint,
            text_heads=self.text_heads,
            vision_heads=self.vision_heads,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    def formula(self, cosine: np.ndarray) -> np.ndarray:
        return 100.0 * cosine


METRICS.add(ClipScore.name, ClipScore())
METRICS.add(PickScore.name, PickScore())
METRICS.add(HPSv2.name, HPSv2())
