"""Tiny stand-ins for the metric models: a CLIP BPE tokenizer, image processor and random CLIPModels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

TINY_IMAGE = 32


def byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def save_tiny_processor(folder: Path) -> Path:
    """A CLIP tokenizer with a byte-only vocabulary (no merges) and a 32-pixel image processor."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    chars = byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the highest id, as in CLIP's real vocabulary
    folder.mkdir(parents=True, exist_ok=True)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE}, crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE}
    ).save_pretrained(folder)
    return folder


def tiny_clip_config(vocab_size: int):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 1,
        },
        vision_config={
            "hidden_size": 40,
            "intermediate_size": 56,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TINY_IMAGE,
            "patch_size": 8,
        },
        projection_dim=24,
        logit_scale_init_value=2.3,
    )


@pytest.fixture(scope="session")
def tiny_processor(tmp_path_factory) -> Path:
    return save_tiny_processor(tmp_path_factory.mktemp("tiny-processor"))


@pytest.fixture(scope="session")
def tiny_clip_folder(tmp_path_factory, tiny_processor) -> Path:
    """A random-weight CLIPModel saved with its processor in the Hugging Face layout."""
    from transformers import CLIPModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-clip")
    model = CLIPModel(tiny_clip_config(vocab_size=514)).eval()
    model.save_pretrained(folder)
    save_tiny_processor(folder)
    return folder


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def write_jsonl():
    def write(path: Path, records: list[dict]) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    return write


# Lines the blocked-image calibration test leaves for the terminal summary (shown without -s).
CALIBRATION = pytest.StashKey[list]()


@pytest.fixture
def calibration_log(request) -> list:
    """Lines to print in the terminal summary under "blocked-image detector calibration"."""
    return request.config.stash.setdefault(CALIBRATION, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(CALIBRATION, [])
    if lines:
        terminalreporter.section("blocked-image detector calibration")
        for line in lines:
            terminalreporter.write_line(line)
