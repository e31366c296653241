"""Calibration statistics: what the recorder keeps per Linear input and per timestep bucket, and their file.

    absmax  [B, K] fp32   max |x_k| over tokens                    (SmoothQuant's max|X_j|)
    sumsq   [B, K] fp64   Σ x_k² over tokens                       (activation energy; GGUF importance matrix)
    count   [B]    int64  tokens seen (all-zero padding tokens are skipped)
    token_absmax_quantiles [B, Q]  quantiles of the per-token absmax (what per-token scales will be)
and, pooled over buckets, `samples` [S, K]: a uniform sample of input tokens (without replacement, in the order they
arrived) for choosing alpha, plus a few complete transformer calls (`probes`) for the fragility analysis. Padding
tokens are not counted: the recorder drops the tokens the model call's attention mask (or Ideogram 4's segment ids)
marks as padding, and all-zero tokens. `groups` holds the smoothing groups found on a generic model
(`ditq.quant.int8.groups`). The file is a safetensors file; its `ditq.calibration` metadata names the buckets, the
number of captions, a hash of the captions, a fingerprint of each transformer's Linear shapes and the groups.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ditq._version import __version__
from ditq.errors import CheckpointError
from ditq.formats.keys import split_module_name
from ditq.io.safetensors_io import TensorSource, save_safetensors
from ditq.quant.modules import is_linear_like

log = logging.getLogger(__name__)

STATS_VERSION = 1
METADATA_KEY = "ditq.calibration"
DEFAULT_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)  # edges in model time t (0 = noise, 1 = clean image)
QUANTILES = (0.5, 0.9, 0.99, 0.999, 1.0)
TOKEN_RESERVOIR = 4096
PROBE_ARGS = (
    "hidden_states",
    "timestep",
    "encoder_hidden_states",
    "position_ids",
    "segment_ids",
    "indicator",
)
LLM_TOKEN_INDICATOR = 3
SEQUENCE_PADDING_INDICATOR = -1  # Ideogram 4's segment id of left-padding text tokens


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module name: (out_features, in_features)} of every Linear-like module."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if is_linear_like(m)}


def fingerprint(shapes: Mapping[str, tuple[int, int]]) -> str:
    """A short hash identifying a model by its Linear names and shapes (diffusers split names)."""
    text = json.dumps(sorted((k, list(v)) for k, v in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def captions_hash(captions: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()


@dataclass
class ModuleStats:
    """Input statistics of one Linear input (shapes in the module docstring)."""

    absmax: torch.Tensor
    sumsq: torch.Tensor
    count: torch.Tensor
    token_absmax_quantiles: torch.Tensor
    samples: torch.Tensor

    @property
    def in_features(self) -> int:
        return int(self.absmax.shape[1])

    def channel_absmax(self, buckets: Sequence[int] | None = None) -> torch.Tensor:
        """max |x_k| [K] over the given buckets (default all)."""
        a = self.absmax if buckets is None else self.absmax[list(buckets)]
        return a.amax(dim=0)

    def mean_square(self, buckets: Sequence[int] | None = None) -> torch.Tensor:
        """E[x_k²] [K] (float64) over the given buckets."""
        s = self.sumsq if buckets is None else self.sumsq[list(buckets)]
        c = self.count if buckets is None else self.count[list(buckets)]
        return s.sum(0) / max(int(c.sum()), 1)


@dataclass
class CalibrationStats:
    """Statistics for one or both transformers; `modules[transformer][leader module]`."""

    buckets: tuple[float, ...]
    modules: dict[str, dict[str, ModuleStats]]
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)
    probes: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    quantiles: tuple[float, ...] = QUANTILES
    # smoothing groups found on a generic model: {transformer: [{"name", "linears", "fold"}]}
    groups: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def transformers(self) -> list[str]:
        return sorted(self.modules)

    def leader(self, transformer: str, module: str) -> str:
        """The recorded module whose input `module` shares (accepts official fused names too)."""
        name = split_module_name(module)[0]
        return self.aliases.get(transformer, {}).get(name, name)

    def get(self, transformer: str, module: str) -> ModuleStats:
        if transformer not in self.modules:
            known = ", ".join(self.transformers) or "none"
            raise CheckpointError(
                f"calibration statistics have no transformer {transformer!r} (have: {known})"
            )
        leader = self.leader(transformer, module)
        try:
            return self.modules[transformer][leader]
        except KeyError:
            raise CheckpointError(
                f"calibration statistics for {transformer} have no entry for layer {module!r}"
            ) from None

    def has(self, transformer: str, module: str) -> bool:
        return self.leader(transformer, module) in self.modules.get(transformer, {})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        # Zero-element tensors (no samples seen; no text rows in an unconditional probe) are left out: they are
        # rebuilt on load.
        tensors: dict[str, torch.Tensor] = {}
        for tr, mods in self.modules.items():
            for name, st in mods.items():
                for f in ("absmax", "sumsq", "count", "token_absmax_quantiles", "samples"):
                    tensors[f"{tr}/{name}/{f}"] = getattr(st, f).contiguous()
        for tr, probes in self.probes.items():
            for i, probe in enumerate(probes):
                for k, v in probe.items():
                    tensors[f"probe/{tr}/{i}/{k}"] = v.contiguous()
        tensors = {k: v for k, v in tensors.items() if v.numel()}
        meta = dict(self.meta)
        meta.update(
            version=STATS_VERSION,
            buckets=list(self.buckets),
            quantiles=list(self.quantiles),
            aliases=self.aliases,
            ditq_version=__version__,
        )
        if self.groups:
            meta["groups"] = self.groups
        save_safetensors(path, tensors, {METADATA_KEY: json.dumps(meta), "format": "pt"})
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        path = Path(path)
        src = TensorSource(path)
        raw = src.metadata.get(METADATA_KEY)
        if raw is None:
            raise CheckpointError(f"{path}: not a ditq calibration file (no {METADATA_KEY!r} metadata)")
        meta = json.loads(raw)
        if meta.get("version") != STATS_VERSION:
            raise CheckpointError(
                f"{path}: calibration format version {meta.get('version')}, expected {STATS_VERSION}"
            )
        fields: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        probes: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for key in src.keys():
            if key.startswith("probe/"):
                _, tr, idx, arg = key.split("/", 3)
                probes.setdefault(tr, {}).setdefault(int(idx), {})[arg] = src.get(key)
            else:
                tr, rest = key.split("/", 1)
                name, f = rest.rsplit("/", 1)
                fields.setdefault((tr, name), {})[f] = src.get(key)
        modules: dict[str, dict[str, ModuleStats]] = {}
        for (tr, name), fs in fields.items():
            if "samples" not in fs:
                fs["samples"] = torch.zeros(0, fs["absmax"].shape[1], dtype=torch.bfloat16)
            modules.setdefault(tr, {})[name] = ModuleStats(**fs)
        for p in (p for per_tr in probes.values() for p in per_tr.values()):
            if "llm_rows" not in p:
                p["llm_rows"] = torch.zeros(0, int(p["llm_shape"][-1]), dtype=p["hidden_states"].dtype)
        return cls(
            buckets=tuple(meta["buckets"]),
            modules=modules,
            aliases=meta.get("aliases", {}),
            probes={tr: [p[i] for i in sorted(p)] for tr, p in probes.items()},
            meta={k: v for k, v in meta.items() if k not in ("aliases", "groups")},
            quantiles=tuple(meta.get("quantiles", QUANTILES)),
            groups=meta.get("groups", {}),
        )


def importance(stats: CalibrationStats, transformer: str, module: str) -> np.ndarray:
    """Activation energy E[x_k²] [K] (float32) of a Linear's input over all buckets: the per-input-channel weights
    a GGUF importance matrix holds (llama.cpp's imatrix: sum of squared activations over its token count)."""
    return stats.get(transformer, module).mean_square().float().numpy()
