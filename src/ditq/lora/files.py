"""Reading LoRA files: safetensors in the diffusers/peft, kohya/ai-toolkit and ComfyUI layouts, checked.

`read_lora(path)` returns a `LoraFile`: per transformer ("transformer", "unconditional_transformer"), per module
as the file names it (prefix removed), the factors `down` A [rank, in_features] and `up` B [out_features, rank] as
stored, and the scale alpha / rank that multiplies B A (1 without an alpha, as diffusers and ComfyUI do). Nothing
is converted or copied: a fused qkv stays one module here and is split when it is resolved against a model
(`ditq.lora.targets`).

Alpha comes from the module's `.alpha` tensor (kohya, ai-toolkit, ComfyUI), else from diffusers'
`lora_adapter_metadata` (peft's `lora_alpha`, `alpha_pattern`, `use_rslora`: scale alpha / sqrt(rank)), else 1.

Refused with a `CheckpointError` naming the file and the key: a file that is not safetensors (pickles run code when
loaded), A without B or B without A, factors that are not 2-D floating-point tensors, a rank mismatch between A
and B, NaN or Inf in a factor or alpha, an alpha that is not one finite number, one module given twice (two
spellings of the same name, or lora_A next to lora_down), and DoRA files (`use_dora` in the metadata). Keys that
are not factors of the transformers (text-encoder LoRAs, LoHa/LoKr, DoRA scales, bias terms, anything else) are
kept in `unknown` with the reason; `ditq.lora.apply_lora` logs them and refuses them with `strict=True`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ditq.errors import CheckpointError, ConfigError
from ditq.lora.names import BRANCHES, COND, ParsedKey, parse_key

log = logging.getLogger(__name__)

METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (peft LoraConfig, prefixed)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
UNPREFIXED = {"transformer": (COND,), "both": BRANCHES}


@dataclass(frozen=True, eq=False)
class LoraFactors:
    """One adapted Linear: `down` A [rank, in_features], `up` B [out_features, rank] (dtypes as stored), and
    `scale` = alpha / rank (alpha / sqrt(rank) for rsLoRA, 1 without an alpha); the update is scale · B A."""

    key: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A checked LoRA file: `branches[transformer][module] -> LoraFactors` (module names as in the file, prefix
    removed; the same factors appear under both transformers for unprefixed keys read with `unprefixed="both"`),
    and `unknown`: (key, reason) for every key that is not a factor ditq applies."""

    name: str
    source: str
    branches: Mapping[str, Mapping[str, LoraFactors]]
    unknown: tuple[tuple[str, str], ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    path: Path | None = None

    def summary(self) -> dict:
        """Counts for logs and records: modules and ranks per transformer, unknown keys."""
        out: dict = {"name": self.name, "source": self.source, "unknown": len(self.unknown)}
        for branch, mods in self.branches.items():
            ranks = sorted({f.rank for f in mods.values()})
            out[branch] = {"modules": len(mods), "ranks": ranks}
        return out


def read_lora(
    source: str | os.PathLike | Mapping[str, torch.Tensor] | LoraFile,
    *,
    name: str | None = None,
    unprefixed: str = "transformer",
    metadata: Mapping[str, str] | None = None,
) -> LoraFile:
    """Read and check a LoRA from a safetensors file or a state dict (see the module docstring).

    `unprefixed` says where keys without a transformer prefix go: "transformer" (the default, as diffusers
    loads Ideogram 4 LoRAs) or "both". `metadata` stands in for a file's safetensors metadata for a state dict.
    """
    if isinstance(source, LoraFile):
        return source
    if unprefixed not in UNPREFIXED:
        raise ConfigError(f"unprefixed must be one of {sorted(UNPREFIXED)}, got {unprefixed!r}")
    path = None
    if isinstance(source, Mapping):
        tensors, meta, where = dict(source), dict(metadata or {}), name or "<state dict>"
    else:
        path = Path(source)
        tensors, meta = _read_file(path)
        where = str(path)
    branches, unknown = _group(tensors, meta, where, UNPREFIXED[unprefixed])
    lora_name = name or (path.stem if path is not None else "lora")
    return LoraFile(lora_name, where, branches, tuple(unknown), meta, path)


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from ditq.io.safetensors_io import TensorSource

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: a pickle file; ditq reads LoRAs from .safetensors only (loading a pickle can run code): "
            "convert it first"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such LoRA file")
    src = TensorSource(path)
    try:
        return {k: src.get(k) for k in src.keys()}, dict(src.metadata)
    finally:
        src.close()


class _Peft:
    """diffusers' `lora_adapter_metadata` for one transformer: peft's lora_alpha, alpha_pattern, use_rslora."""

    def __init__(self, meta: Mapping[str, str], branch: str, where: str) -> None:
        self.config: dict = {}
        raw = meta.get(METADATA_KEY)
        if raw:
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{where}: metadata {METADATA_KEY!r} is not JSON ({exc})") from None
            if not isinstance(data, dict):
                raise CheckpointError(f"{where}: metadata {METADATA_KEY!r} is not a JSON object")
            plain = {k: v for k, v in data.items() if "." not in k}
            mine = {k[len(branch) + 1 :]: v for k, v in data.items() if k.startswith(branch + ".")}
            self.config = {**plain, **mine}
        if self.config.get("use_dora"):
            raise CheckpointError(
                f"{where}: a DoRA adapter (use_dora in {METADATA_KEY}); ditq applies plain LoRA only"
            )

    def alpha(self, module: str) -> float | None:
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return float(value)
        value = self.config.get("lora_alpha")
        return None if value is None else float(value)

    @property
    def rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))


def _group(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], where: str, unprefixed: tuple[str, ...]
) -> tuple[dict[str, dict[str, LoraFactors]], list[tuple[str, str]]]:
    parts: dict[tuple[str | None, str], dict[str, ParsedKey]] = {}
    unknown: list[tuple[str, str]] = []
    for key in tensors:
        parsed = parse_key(key)
        if isinstance(parsed, str):
            unknown.append((key, parsed))
            continue
        slot = parts.setdefault((parsed.branch, parsed.module), {})
        if parsed.role in slot:
            raise CheckpointError(
                f"{where}: {slot[parsed.role].key} and {key} both give the {parsed.role} factor of {parsed.module}"
            )
        slot[parsed.role] = parsed
    branches: dict[str, dict[str, LoraFactors]] = {b: {} for b in BRANCHES}
    peft = {b: _Peft(meta, b, where) for b in BRANCHES}
    for (branch, module), slot in parts.items():
        if "down" not in slot or "up" not in slot:
            have = next(iter(slot.values()))
            if set(slot) == {"alpha"}:
                unknown.append((have.key, "alpha without lora_down / lora_up factors"))
                continue
            missing = "up (B)" if "up" not in slot else "down (A)"
            raise CheckpointError(f"{where}: {have.key} has no matching {missing} factor for {module}")
        for b in (branch,) if branch is not None else unprefixed:
            factors = _factors(tensors, slot, module, where, peft[b])
            if module in branches[b]:
                first = branches[b][module].key
                raise CheckpointError(f"{where}: {module} of the {b} is given twice ({first}, {factors.key})")
            branches[b][module] = factors
    return {b: m for b, m in branches.items() if m}, unknown


def _factors(
    tensors: Mapping[str, torch.Tensor], slot: dict[str, ParsedKey], module: str, where: str, peft: _Peft
) -> LoraFactors:
    down_key, up_key = slot["down"].key, slot["up"].key
    down, up = tensors[down_key], tensors[up_key]
    for key, t, what in ((down_key, down, "[rank, in_features]"), (up_key, up, "[out_features, rank]")):
        if t.ndim != 2 or not t.is_floating_point():
            raise CheckpointError(
                f"{where}: {key} is {t.dtype} {list(t.shape)}; expected a 2-D floating-point {what} LoRA factor"
            )
        _check_finite(t, f"{where}: {key}")
    if down.shape[0] != up.shape[1] or down.shape[0] == 0:
        raise CheckpointError(
            f"{where}: wrong rank: {down_key} is {list(down.shape)} (rank {down.shape[0]}) but {up_key} is "
            f"{list(up.shape)} (rank {up.shape[1]}); expected A [r, in_features] and B [out_features, r], r > 0"
        )
    rank = int(down.shape[0])
    alpha = None
    if "alpha" in slot:
        key = slot["alpha"].key
        t = tensors[key]
        if t.numel() != 1:
            raise CheckpointError(f"{where}: {key} has shape {list(t.shape)}; expected one number")
        alpha = float(t.reshape(()).double())
        if not math.isfinite(alpha):
            raise CheckpointError(f"{where}: {key} is {alpha}; expected a finite alpha")
    else:
        alpha = peft.alpha(module)
    if alpha is None:
        scale = 1.0
    else:
        scale = alpha / (math.sqrt(rank) if peft.rslora else rank)
    return LoraFactors(slot["down"].stem, down, up, alpha, scale)


def _check_finite(t: torch.Tensor, where: str) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(
            f"{where}: {bad} non-finite value(s) (NaN or Inf); expected finite LoRA factors"
        )
