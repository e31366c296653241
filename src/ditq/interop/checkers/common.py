"""What the loader checks share: `Violation`, the loaders' names, the expected tensors of a configuration, and the
name and shape rules."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ditq.errors import CheckpointError
from ditq.formats.keys import COMFY_PREFIXES, detect_layout, find_prefix

SDCPP = "stable-diffusion.cpp"
COMFYUI_GGUF = "ComfyUI-GGUF"
COMFYUI = "ComfyUI"
LOADER_NAMES = {"sdcpp": SDCPP, "comfyui": COMFYUI}
# stable-diffusion.cpp's documented Ideogram 4 conversion (docs/ideogram4.md, --tensor-type-rules).
SDCPP_RULE = re.compile(r"^layers\..*(adaln_modulation|attention\.o|attention\.qkv|feed_forward).*weight$")
FLOAT_TYPES = ("F32", "F16", "BF16")
COMFYUI_GGUF_TYPES = (
    *FLOAT_TYPES,
    "Q8_0",
    "Q5_1",
    "Q5_0",
    "Q4_1",
    "Q4_0",
    "Q6_K",
    "Q5_K",
    "Q4_K",
    "Q3_K",
    "Q2_K",
)
COMFYUI_GGUF_ARCH = "ideogram"
SMALL_TENSOR = 1024  # ComfyUI-GGUF keeps tensors of at most this many elements in F32
SDCPP_MARKER_MAX_BYTES = 4096
SDCPP_CONVROT_GROUP = 256
COMFY_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class Violation:
    """One broken rule: which loader it concerns, a short rule id, the tensor (if any) and what is wrong."""

    loader: str
    rule: str
    message: str
    tensor: str | None = None

    def __str__(self) -> str:
        where = f" {self.tensor}:" if self.tensor else ""
        return f"[{self.loader}] {self.rule}:{where} {self.message}"


# ------------------------------------------------------------------------------------------- architecture


def load_config(config: dict | str | Path | None) -> dict:
    """A transformer config dict: given, read from `config.json` (or a folder holding it), or the official one."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    path = Path(config)
    path = path / "config.json" if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the transformer config ({exc})") from None


def expected_tensors(config: dict | str | Path | None = None) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """({fused tensor name: shape}, {fused Linear module names}) of the Ideogram 4 transformer `config` describes."""
    from accelerate import init_empty_weights
    from diffusers import Ideogram4Transformer2DModel

    from ditq.quant.sizes import fused_tensors

    cfg = {k: v for k, v in load_config(config).items() if not k.startswith("_")}
    cfg.pop("quantization_config", None)
    with init_empty_weights():
        model = Ideogram4Transformer2DModel.from_config(cfg)
    return fused_tensors(model)


def check_shapes(
    logical: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], loaders: list[str]
) -> list[Violation]:
    out = []
    for name in sorted(set(expected) - set(logical)):
        out += [
            Violation(ld, "missing", f"missing tensor of shape {list(expected[name])}", name)
            for ld in loaders
        ]
    for name in sorted(set(logical) - set(expected)):
        out += [
            Violation(ld, "unexpected", "not a tensor of the Ideogram 4 transformer", name) for ld in loaders
        ]
    for name in sorted(set(logical) & set(expected)):
        if tuple(logical[name]) != tuple(expected[name]):
            msg = f"shape {list(logical[name])}, expected {list(expected[name])} for this configuration"
            out += [Violation(ld, "shape", msg, name) for ld in loaders]
    return out


def check_names(names: list[str], loaders: list[str], sdcpp: bool) -> tuple[str, list[Violation]]:
    """Prefix and fused/split rules; returns (prefix, violations)."""
    out = []
    try:
        prefix = find_prefix(names)
    except CheckpointError as exc:
        prefix = ""
        out += [Violation(ld, "prefix", str(exc)) for ld in loaders]
    if sdcpp and prefix:
        out.append(
            Violation(SDCPP, "prefix", f"names carry {prefix!r}; stable-diffusion.cpp reads bare names")
        )
    if prefix and prefix != COMFY_PREFIX:
        msg = f"names carry {prefix!r}; ComfyUI strips only {COMFY_PREFIX!r}"
        out += [Violation(ld, "prefix", msg) for ld in loaders if ld in (COMFYUI, COMFYUI_GGUF)]
    try:
        if detect_layout(names) == "split":
            msg = "diffusers split names (attention.to_q/to_k/to_v/to_out.0); the loaders need attention.qkv / .o"
            out += [Violation(ld, "split-names", msg) for ld in loaders]
    except CheckpointError as exc:
        out += [Violation(ld, "split-names", str(exc)) for ld in loaders]
    return prefix, out


def bare_name(name: str) -> str:
    for p in COMFY_PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name
