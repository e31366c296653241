"""Recording activation statistics with forward hooks, for any model: what each call's arguments say (timestep
bucket, padding mask), per-input accumulators on the device, probes, and a resumable state.

Layers fed the very same tensor (to_q/to_k/to_v; w1/w3; BERT's query/key/value) share one record: the others are
aliases. Each top-level model call is read through its forward signature, so arguments count by name whether they
came positionally or as keywords:
- the bucket is that of the `timestep` argument (model time in [0, 1]); a model without one records into bucket 0;
- the tokens kept are those `token_mask(arguments)` marks (default `default_token_mask`: an `attention_mask`
  [B, T] with 1 for real tokens, as Hugging Face models take it, or Ideogram 4's `segment_ids` != -1). A Linear
  input whose leading dims are [B, T] (or B*T rows) is masked with it; other inputs (one row per sample, such as
  a pooler or the adaLN conditioning) count every row.

`accumulate="device"` (default) keeps every reduction on the device the inputs arrive on; `"host"` copies each
input to the CPU in fp32 first (the old path; identical arithmetic). `state()` / `load_state()` move the whole state
to and from the host, which `calibrate_pipeline` does once per prompt to resume an interrupted calibration.
"""

from __future__ import annotations

import bisect
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ditq.errors import ConfigError
from ditq.quant.calibration.accumulate import FIELDS, Accumulator
from ditq.quant.calibration.stats import (
    DEFAULT_BUCKETS,
    LLM_TOKEN_INDICATOR,
    PROBE_ARGS,
    QUANTILES,
    SEQUENCE_PADDING_INDICATOR,
    CalibrationStats,
    fingerprint,
    is_linear_like,
    linear_shapes,
)

log = logging.getLogger(__name__)

ACCUMULATE = ("device", "host")
FIRST_CALL_ROWS = 2  # batch entries of the first call kept for finding smoothing groups
TokenMask = Callable[[Mapping[str, Any]], "torch.Tensor | None"]


def default_token_mask(arguments: Mapping[str, Any]) -> torch.Tensor | None:
    """bool [B, T] of the tokens that are not padding, from a model call's arguments (by name), or None."""
    mask = arguments.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() == 2:
        return mask != 0
    seg = arguments.get("segment_ids")
    if torch.is_tensor(seg) and seg.dim() == 2:
        return seg != SEQUENCE_PADDING_INDICATOR
    return None


class CalibrationRecorder:
    """Forward hooks that record Linear input statistics of one or more models, keyed by a model name."""

    def __init__(
        self,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        sample_tokens: int = 64,
        probes_per_bucket: int = 1,
        seed: int = 0,
        *,
        token_mask: TokenMask | None = default_token_mask,
        accumulate: str = "device",
    ) -> None:
        edges = tuple(float(b) for b in buckets)
        if len(edges) < 2 or any(e2 <= e1 for e1, e2 in zip(edges, edges[1:], strict=False)):
            raise ConfigError(
                f"buckets must be increasing edges with at least two values, got {list(buckets)}"
            )
        if sample_tokens < 0 or probes_per_bucket < 0:
            raise ConfigError("sample_tokens and probes_per_bucket must be >= 0")
        if accumulate not in ACCUMULATE:
            raise ConfigError(f"accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
        self.buckets = edges
        self.sample_tokens = sample_tokens
        self.probes_per_bucket = probes_per_bucket
        self.token_mask = token_mask
        self.accumulate = accumulate
        self.gen = torch.Generator().manual_seed(seed)
        self.acc: dict[str, dict[str, Accumulator]] = {}
        self.aliases: dict[str, dict[str, str]] = {}
        self.probes: dict[str, list[dict[str, torch.Tensor]]] = {}
        self.fingerprints: dict[str, str] = {}
        self.first_calls: dict[str, tuple[tuple, dict]] = {}
        self._capture: set[str] = set()
        self._probe_count: dict[str, list[int]] = {}
        self._call: dict[str, tuple[int, torch.Tensor | None]] = {}
        self._last: dict[str, tuple] = {}
        self._handles: list = []

    @property
    def n_buckets(self) -> int:
        return len(self.buckets) - 1

    def bucket_of(self, t: float) -> int:
        i = bisect.bisect_right(self.buckets, t) - 1
        return min(max(i, 0), self.n_buckets - 1)

    def attach(
        self, model: nn.Module, name: str = "transformer", *, capture_first_call: bool = False
    ) -> CalibrationRecorder:
        """Hook `model` under `name`; `capture_first_call` keeps a copy of its first call (at most
        `FIRST_CALL_ROWS` batch entries) in `first_calls[name]`, for finding smoothing groups."""
        if name in self._probe_count:
            raise ConfigError(f"a model named {name!r} is already attached")
        self.acc.setdefault(name, {})
        self.aliases.setdefault(name, {})
        self.probes.setdefault(name, [])
        self._probe_count[name] = [0] * self.n_buckets
        for p in self.probes[name]:  # probes restored by load_state count
            b = self.bucket_of(float(p["timestep"].reshape(-1)[0]))
            self._probe_count[name][b] += 1
        self._call[name] = (0, None)
        self.fingerprints[name] = fingerprint(linear_shapes(model))
        if capture_first_call:
            self._capture.add(name)
        signature = _signature(model)
        self._handles.append(
            model.register_forward_pre_hook(self._model_hook(name, model, signature), with_kwargs=True)
        )
        for mod_name, m in model.named_modules():
            if is_linear_like(m):
                self._handles.append(m.register_forward_pre_hook(self._linear_hook(name, mod_name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last.clear()
        self._probe_count.clear()

    def _model_hook(self, name: str, model: nn.Module, signature: inspect.Signature | None):
        def hook(module, args, kwargs):
            arguments = _bind(signature, args, kwargs)
            t = arguments.get("timestep")
            b = self.bucket_of(float(t.reshape(-1)[0])) if torch.is_tensor(t) and t.numel() else 0
            mask = self.token_mask(arguments) if self.token_mask is not None else None
            self._call[name] = (b, None if mask is None else mask.detach().bool())
            self._last.pop(name, None)
            if name in self._capture and name not in self.first_calls:
                self.first_calls[name] = _first_rows(args, kwargs)
            if self._probe_count[name][b] < self.probes_per_bucket and torch.is_tensor(t):
                probe = _probe(arguments)
                if probe is not None:
                    self.probes[name].append(probe)
                    self._probe_count[name][b] += 1

        return hook

    def _linear_hook(self, name: str, mod_name: str):
        def hook(module, args):
            x = args[0]
            last = self._last.get(name)
            if last is not None and last[0] is x and last[1] == x._version:
                self.aliases[name][mod_name] = last[2]
                return
            self._last[name] = (x, x._version, mod_name)
            if mod_name in self.aliases[name]:
                return
            self._add(name, mod_name, x)

        return hook

    def _add(self, name: str, mod_name: str, x: torch.Tensor) -> None:
        bucket, mask = self._call[name]
        k = x.shape[-1]
        x2 = x.detach().reshape(-1, k)
        valid = None
        if mask is not None and (
            tuple(x.shape[:-1]) == tuple(mask.shape) or x.dim() == 2 and x2.shape[0] == mask.numel()
        ):
            valid = mask.reshape(-1)
        if self.accumulate == "host":
            x2 = x2.float().cpu()
            valid = None if valid is None else valid.cpu()
        acc = self.acc[name].get(mod_name)
        if acc is None:
            acc = self.acc[name][mod_name] = Accumulator(k, self.n_buckets, self.sample_tokens, x2.device)
        elif acc.device != x2.device:
            acc.to(x2.device)  # a resumed state (loaded on the host) moves to the device once
        keys = torch.rand(x2.shape[0], generator=self.gen, dtype=torch.float64).to(x2.device)
        acc.add(x2, None if valid is None else valid.to(x2.device), bucket, keys)

    def result(self, meta: dict | None = None) -> CalibrationStats:
        modules = {tr: {m: a.finish(QUANTILES) for m, a in mods.items()} for tr, mods in self.acc.items()}
        info = dict(meta or {})
        info["models"] = {tr: {"fingerprint": fp} for tr, fp in self.fingerprints.items()}
        return CalibrationStats(
            buckets=self.buckets,
            modules=modules,
            aliases={tr: dict(a) for tr, a in self.aliases.items()},
            probes={tr: list(p) for tr, p in self.probes.items()},
            meta=info,
        )

    # -- resumable state
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able metadata) of the whole state, on the host."""
        tensors: dict[str, torch.Tensor] = {"generator": self.gen.get_state()}
        for tr, mods in self.acc.items():
            for m, acc in mods.items():
                for f, v in acc.state().items():
                    tensors[f"acc/{tr}/{m}/{f}"] = v
        for tr, probes in self.probes.items():
            for i, probe in enumerate(probes):
                for k, v in probe.items():
                    tensors[f"probe/{tr}/{i}/{k}"] = v
        meta = {
            "buckets": list(self.buckets),
            "sample_tokens": self.sample_tokens,
            "aliases": self.aliases,
            "fingerprints": self.fingerprints,
            "probes": {tr: len(p) for tr, p in self.probes.items()},
        }
        return tensors, meta

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        """Continue from `state()`'s output (before `attach`)."""
        if tuple(meta["buckets"]) != self.buckets or meta["sample_tokens"] != self.sample_tokens:
            raise ConfigError(
                f"calibration state has buckets {meta['buckets']} and sample_tokens {meta['sample_tokens']}, "
                f"this run {list(self.buckets)} and {self.sample_tokens}"
            )
        self.gen.set_state(tensors["generator"])
        fields: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        probes: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for key, v in tensors.items():
            if key.startswith("acc/"):
                _, tr, rest = key.split("/", 2)
                m, f = rest.rsplit("/", 1)
                fields.setdefault((tr, m), {})[f] = v
            elif key.startswith("probe/"):
                _, tr, i, k = key.split("/", 3)
                probes.setdefault(tr, {}).setdefault(int(i), {})[k] = v
        for (tr, m), fs in fields.items():
            if set(fs) != set(FIELDS):
                raise ConfigError(f"calibration state: {tr}/{m} lacks {sorted(set(FIELDS) - set(fs))}")
            self.acc.setdefault(tr, {})[m] = Accumulator.from_state(fs)
        self.aliases = {tr: dict(a) for tr, a in meta["aliases"].items()}
        self.probes = {tr: [p[i] for i in sorted(p)] for tr, p in probes.items()}
        for tr, n in meta.get("probes", {}).items():
            self.probes.setdefault(tr, [])
            if len(self.probes[tr]) != n:
                raise ConfigError(
                    f"calibration state: {tr} should hold {n} probes, has {len(self.probes[tr])}"
                )


def call_arguments(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call of `model` by parameter name (what `token_mask` reads), from a forward pre-hook."""
    return _bind(_signature(model), args, kwargs)


def _signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _bind(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by parameter name (keywords only where the signature cannot bind them)."""
    if signature is not None:
        try:
            return dict(signature.bind_partial(*args, **kwargs).arguments)
        except TypeError:
            pass
    return dict(kwargs)


def _first_rows(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A detached copy of a call, cut to its first FIRST_CALL_ROWS batch entries where every tensor argument has
    the same leading size (else whole)."""
    tensors = [v for v in (*args, *kwargs.values()) if torch.is_tensor(v)]
    sizes = {t.shape[0] for t in tensors if t.dim() >= 1}
    cut = len(sizes) == 1 and all(t.dim() >= 1 for t in tensors) and next(iter(sizes)) > FIRST_CALL_ROWS

    def copy(v):
        if not torch.is_tensor(v):
            return v
        v = v.detach()
        return (v[:FIRST_CALL_ROWS] if cut else v).clone()

    return tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()}


def _probe(arguments: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """A compact copy of an Ideogram 4 transformer call: text features only at LLM-token rows (the model masks the
    rest). None for other models."""
    if any(k not in arguments or not torch.is_tensor(arguments[k]) for k in PROBE_ARGS):
        return None
    out = {k: _dense_copy(arguments[k]) for k in PROBE_ARGS if k != "encoder_hidden_states"}
    ehs = arguments["encoder_hidden_states"].detach().cpu()
    mask = out["indicator"] == LLM_TOKEN_INDICATOR
    out["llm_rows"] = _dense_copy(ehs[mask])
    out["llm_shape"] = torch.tensor(list(ehs.shape), dtype=torch.int64)
    return out


def _dense_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy with standard strides (an expanded `timestep` has stride 0)."""
    t = t.detach().cpu()
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def probe_inputs(
    probe: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The keyword arguments of the transformer call a probe recorded."""
    shape = [int(s) for s in probe["llm_shape"].tolist()]
    ehs = torch.zeros(shape, dtype=probe["llm_rows"].dtype)
    ehs[probe["indicator"] == LLM_TOKEN_INDICATOR] = probe["llm_rows"]
    out = {k: probe[k] for k in PROBE_ARGS if k != "encoder_hidden_states"}
    out["encoder_hidden_states"] = ehs
    if dtype is not None:
        for k in ("hidden_states", "encoder_hidden_states", "timestep"):
            out[k] = out[k].to(dtype)
    return out
