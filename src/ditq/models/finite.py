"""Generation never writes a non-finite image: a cheap check of the latents after every denoising step (one
reduction), and, when it fails, one diagnostic rerun of the same image with a forward hook on every module of the
transformers that names the first module (in call order) whose output holds a NaN or an infinity.

    check = FiniteCheck()
    generate(pipe, prompt, seed, settings, on_step=check)          # raises NonFiniteStep at the first bad step
    name = first_nonfinite_module(pipe, lambda: generate(...))     # e.g. "transformer.layers.3.feed_forward.w2"
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TRANSFORMERS = ("transformer", "unconditional_transformer")


class NonFiniteStep(Exception):
    """Raised by `FiniteCheck` inside the denoising loop (caught by the caller, which names the module)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"non-finite latents after step {step}")
        self.step = step


class FiniteCheck:
    """An `on_step(i, latents)` callback raising `NonFiniteStep(i)` when the latents hold a NaN or an infinity."""

    def __call__(self, i: int, latents: torch.Tensor) -> None:
        if not bool(torch.isfinite(latents).all()):
            raise NonFiniteStep(i)


class _Found(Exception):
    pass


def first_nonfinite_module(pipe, rerun: Callable[[], object]) -> str | None:
    """The first module of the pipeline's transformers whose floating-point output is non-finite while `rerun()`
    runs (stopped there), as "<transformer>.<module path>"; None when the rerun stays finite."""
    found: list[str] = []
    handles = []

    def hook_for(name: str):
        def hook(_module, _args, output):
            tensors = output if isinstance(output, (tuple, list)) else (output,)
            for t in tensors:
                if (
                    isinstance(t, torch.Tensor)
                    and t.is_floating_point()
                    and not bool(torch.isfinite(t).all())
                ):
                    found.append(name)
                    raise _Found

        return hook

    for branch in TRANSFORMERS:
        model = getattr(pipe, branch, None)
        if model is None:
            continue
        for path, module in model.named_modules():
            if (
                next(module.children(), None) is None or path == ""
            ):  # leaves first to fire, then the whole model
                handles.append(module.register_forward_hook(hook_for(f"{branch}.{path}".rstrip("."))))
    try:
        rerun()
    except (_Found, NonFiniteStep):
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


__all__ = ["FiniteCheck", "NonFiniteStep", "first_nonfinite_module"]
