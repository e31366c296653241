"""On-disk formats of quantized Linear layers; importing a format module registers it."""

from __future__ import annotations

import importlib

FORMAT_MODULES = ("fp8", "int8", "nf4", "gguf")


def load_all_formats() -> None:
    """Import every format module that exists, so `LINEAR_FORMATS` is complete."""
    for name in FORMAT_MODULES:
        try:
            importlib.import_module(f"ditq.quant.formats.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"ditq.quant.formats.{name}":
                raise
