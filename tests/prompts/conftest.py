"""Fixtures for the caption tests: the tiny random-weight Ideogram 4 pipeline, built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_pipeline():
    """`ditq.models.tiny.build_tiny_pipeline` with its prompt enhancer head (float32, CPU)."""
    from ditq.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0, with_prompt_enhancer=True)


@pytest.fixture
def cpu_inference_settings():
    """One torch thread and flushed denormals while a test decodes: random weights through 36 layers produce
    denormal activations that slow CPU matmuls several-fold, and the test machine's cores are shared."""
    import torch

    (threads,) = (torch.get_num_threads(),)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)
