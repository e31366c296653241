"""ditq: post-training quantization and a paired benchmark for flow-matching diffusion transformers."""

from __future__ import annotations

__version__ = "0.1.0"
