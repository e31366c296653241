"""Sampling settings and deterministic, paired generation.

The initial noise for (seed, height, width) is drawn on the CPU from `torch.Generator().manual_seed(seed)`, so every
variant and every device starts from bit-identical latents (the paired design of the benchmark). Both transformers
run exactly as in `Ideogram4Pipeline.__call__`: the conditional one on the packed text+image sequence, the
unconditional one on the image tokens with zeroed text features, blended by the per-step guidance weight.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

import torch

from ditq.errors import ConfigError

# Official sampler presets: (steps at guidance 7, steps at guidance 3, mu, std).
PRESETS = {
    "quality48": (45, 3, 0.0, 1.5),
    "default20": (18, 2, 0.0, 1.75),
    "turbo12": (11, 1, 0.5, 1.75),
}


def parse_guidance(spec: str, steps: int) -> list[float]:
    """`"7"` (constant) or a run-length schedule `"18x7,2x3"`; the result has exactly `steps` entries."""
    spec = spec.strip()
    if re.fullmatch(r"[0-9.]+", spec):
        return [float(spec)] * steps
    schedule: list[float] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*([0-9.]+)\s*", part)
        if not m:
            raise ConfigError(f"--guidance {spec!r}: expected a number or a schedule like '18x7,2x3'")
        schedule += [float(m.group(2))] * int(m.group(1))
    if len(schedule) != steps:
        raise ConfigError(f"--guidance {spec!r} has {len(schedule)} steps, expected --steps {steps}")
    return schedule


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """Everything besides the prompt and seed that determines an image."""

    height: int = 1024
    width: int = 1024
    steps: int = 20
    guidance_schedule: tuple[float, ...] = field(default=(7.0,) * 18 + (3.0,) * 2)
    mu: float = 0.0
    std: float = 1.75
    max_sequence_length: int = 2048
    # "fixed": the text padded to max_sequence_length, as the pipeline does; "prompt": to the prompt's own token
    # count rounded up to 64 (identical images in float32; in bf16 the attention's reduction blocks shift, ~54 dB)
    text_padding: str = "fixed"

    def __post_init__(self) -> None:
        if self.text_padding not in ("fixed", "prompt"):
            raise ConfigError(f"text_padding must be 'fixed' or 'prompt', got {self.text_padding!r}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if len(self.guidance_schedule) != self.steps:
            raise ConfigError(
                f"guidance_schedule has {len(self.guidance_schedule)} entries, expected steps={self.steps}"
            )
        if self.height <= 0 or self.width <= 0:
            raise ConfigError(f"height and width must be positive, got {self.height}x{self.width}")
        if self.std <= 0:
            raise ConfigError(f"std must be > 0, got {self.std}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> SamplingSettings:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        hi, lo, mu, std = PRESETS[name]
        base = {"steps": hi + lo, "guidance_schedule": (7.0,) * hi + (3.0,) * lo, "mu": mu, "std": std}
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["guidance_schedule"] = list(self.guidance_schedule)
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def image_multiple(pipe) -> int:
    return pipe.vae_scale_factor * pipe.patch_size


def check_size(pipe, settings: SamplingSettings) -> None:
    m = image_multiple(pipe)
    if settings.height % m or settings.width % m:
        raise ConfigError(
            f"--height {settings.height} / --width {settings.width}: both must be multiples of {m} "
            f"(VAE scale factor x patch size) for this model"
        )


def initial_noise(pipe, seed: int, settings: SamplingSettings) -> torch.Tensor:
    """Packed initial latents (1, tokens, channels), float32, drawn on the CPU from `seed`."""
    m = image_multiple(pipe)
    tokens = (settings.height // m) * (settings.width // m)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((1, tokens, pipe.transformer.config.in_channels), generator=gen, dtype=torch.float32)


@torch.no_grad()
def generate(
    pipe,
    prompt: str,
    seed: int,
    settings: SamplingSettings,
    latents: torch.Tensor | None = None,
    cond=None,
    timer=None,
    on_step=None,
):
    """One image (PIL) for `prompt` and `seed`; identical pixels for identical inputs on the same machine.

    The stages are `ditq.models.denoise`'s (the pipeline's own arithmetic): `cond` skips the text encoder with a
    conditioning encoded earlier; `timer` (a `StepTimer`) records each denoising step; `on_step(i, latents)` is
    called after each step.
    """
    from ditq.models.denoise import decode, denoise, encode

    check_size(pipe, settings)
    _check_prompt(pipe, prompt, settings)
    if latents is None:
        latents = initial_noise(pipe, seed, settings)
    device = pipe._execution_device
    if cond is None:
        cond = encode(
            pipe, prompt, settings.height, settings.width, text_tokens(pipe, prompt, settings), device
        )
    cond = cond.to(device)

    def step(i, lat):
        if timer is not None:
            timer.step()
        if on_step is not None:
            on_step(i, lat)

    if timer is not None:
        timer.start()
    out = denoise(
        pipe,
        cond,
        latents,
        settings.height,
        settings.width,
        list(settings.guidance_schedule),
        settings.mu,
        settings.std,
        on_step=step,
    )
    image = decode(pipe, out, settings.height, settings.width)
    pipe.maybe_free_model_hooks()
    return image


def text_tokens(pipe, prompt: str, settings: SamplingSettings) -> int:
    """The padded text length of `prompt` under `settings.text_padding`."""
    if settings.text_padding == "fixed":
        return settings.max_sequence_length
    from ditq.models.denoise import padded_text_tokens, prompt_tokens

    return padded_text_tokens(prompt_tokens(pipe, prompt), 64, cap=settings.max_sequence_length)


def _check_prompt(pipe, prompt: str, settings: SamplingSettings) -> None:
    """The pipeline's own input checks, as a ConfigError."""
    try:
        pipe.check_inputs(
            prompt=prompt,
            height=settings.height,
            width=settings.width,
            num_inference_steps=settings.steps,
            guidance_scale=None,
            guidance_schedule=list(settings.guidance_schedule),
        )
    except ValueError as exc:
        raise ConfigError(f"cannot generate: {exc}") from None
    from ditq.models.denoise import prompt_tokens

    n = prompt_tokens(pipe, prompt)
    if n > settings.max_sequence_length:
        raise ConfigError(
            f"cannot generate: the prompt has {n} tokens, more than max_sequence_length={settings.max_sequence_length}"
        )


def png_metadata(**fields) -> object:
    """PNG text chunks (values JSON-encoded unless strings)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in fields.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    return info
