"""Recording activation statistics with forward hooks: per-input accumulators, reservoir samples, probes.

Layers fed the very same tensor (to_q/to_k/to_v; w1/w3) share one record: the others are aliases.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ditq.errors import ConfigError
from ditq.quant.calibration.stats import (
    DEFAULT_BUCKETS,
    LLM_TOKEN_INDICATOR,
    PROBE_ARGS,
    QUANTILES,
    TOKEN_RESERVOIR,
    CalibrationStats,
    ModuleStats,
    fingerprint,
    is_linear_like,
    linear_shapes,
)

log = logging.getLogger(__name__)


class _Accumulator:
    """Running statistics of one Linear input."""

    def __init__(self, k: int, n_buckets: int, sample_tokens: int, generator: torch.Generator) -> None:
        self.absmax = torch.zeros(n_buckets, k)
        self.sumsq = torch.zeros(n_buckets, k, dtype=torch.float64)
        self.count = torch.zeros(n_buckets, dtype=torch.int64)
        self.token_absmax = [torch.empty(0) for _ in range(n_buckets)]
        self.token_seen = [0] * n_buckets
        self.samples = torch.zeros(sample_tokens, k)
        self.seen = 0
        self.gen = generator

    def add(self, x: torch.Tensor, b: int) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        a = x2.abs()
        tok = a.amax(dim=1)
        keep = tok > 0
        if not bool(keep.all()):
            x2, a, tok = x2[keep], a[keep], tok[keep]
        if x2.shape[0] == 0:
            return
        self.absmax[b] = torch.maximum(self.absmax[b], a.amax(dim=0))
        self.sumsq[b] += a.square_().sum(dim=0, dtype=torch.float64)
        self.count[b] += x2.shape[0]
        self.token_absmax[b], self.token_seen[b] = _reservoir(
            self.token_absmax[b], tok, self.token_seen[b], TOKEN_RESERVOIR, self.gen
        )
        if self.samples.shape[0]:
            self.samples, self.seen = _reservoir_rows(self.samples, x2, self.seen, self.gen)

    def finish(self, quantiles: Sequence[float]) -> ModuleStats:
        q = torch.tensor(quantiles, dtype=torch.float32)
        quant = torch.stack(
            [torch.quantile(t, q) if t.numel() else torch.zeros(len(quantiles)) for t in self.token_absmax]
        )
        n = min(self.seen, self.samples.shape[0])
        return ModuleStats(
            absmax=self.absmax,
            sumsq=self.sumsq,
            count=self.count,
            token_absmax_quantiles=quant,
            samples=self.samples[:n].to(torch.bfloat16),
        )


def _reservoir(pool: torch.Tensor, new: torch.Tensor, seen: int, cap: int, gen: torch.Generator):
    """Uniform reservoir sample (Algorithm R) of scalars."""
    if pool.numel() < cap:
        take = min(cap - pool.numel(), new.numel())
        pool = torch.cat([pool, new[:take]])
        new, seen = new[take:], seen + take
    if new.numel():
        idx = torch.arange(seen + 1, seen + 1 + new.numel(), dtype=torch.float64)
        j = (torch.rand(new.numel(), generator=gen, dtype=torch.float64) * idx).long()
        hit = j < cap
        pool[j[hit]] = new[hit]  # duplicates: any of the candidates is a valid draw
        seen += new.numel()
    return pool, seen


def _reservoir_rows(pool: torch.Tensor, rows: torch.Tensor, seen: int, gen: torch.Generator):
    """Uniform reservoir sample of rows into the fixed-size `pool` [S, K]; `seen` counts rows offered so far."""
    cap = pool.shape[0]
    start = 0
    if seen < cap:
        take = min(cap - seen, rows.shape[0])
        pool[seen : seen + take] = rows[:take]
        start, seen = take, seen + take
    rest = rows[start:]
    if rest.shape[0]:
        idx = torch.arange(seen + 1, seen + 1 + rest.shape[0], dtype=torch.float64)
        j = (torch.rand(rest.shape[0], generator=gen, dtype=torch.float64) * idx).long()
        hit = (j < cap).nonzero().flatten()
        for i in hit.tolist():
            pool[j[i]] = rest[i]
        seen += rest.shape[0]
    return pool, seen


class CalibrationRecorder:
    """Forward hooks that record Linear input statistics of one or more models, keyed by a model name.

    The bucket of each call is read from the model's `timestep` argument (model time in [0, 1]); a model called
    without one records into bucket 0.
    """

    def __init__(
        self,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        sample_tokens: int = 64,
        probes_per_bucket: int = 1,
        seed: int = 0,
    ) -> None:
        edges = tuple(float(b) for b in buckets)
        if len(edges) < 2 or any(e2 <= e1 for e1, e2 in zip(edges, edges[1:], strict=False)):
            raise ConfigError(
                f"buckets must be increasing edges with at least two values, got {list(buckets)}"
            )
        if sample_tokens < 0 or probes_per_bucket < 0:
            raise ConfigError("sample_tokens and probes_per_bucket must be >= 0")
        self.buckets = edges
        self.sample_tokens = sample_tokens
        self.probes_per_bucket = probes_per_bucket
        self.gen = torch.Generator().manual_seed(seed)
        self.acc: dict[str, dict[str, _Accumulator]] = {}
        self.aliases: dict[str, dict[str, str]] = {}
        self.probes: dict[str, list[dict[str, torch.Tensor]]] = {}
        self.fingerprints: dict[str, str] = {}
        self._probe_count: dict[str, list[int]] = {}
        self._bucket: dict[str, int] = {}
        self._last: dict[str, tuple] = {}
        self._handles: list = []

    @property
    def n_buckets(self) -> int:
        return len(self.buckets) - 1

    def bucket_of(self, t: float) -> int:
        i = bisect.bisect_right(self.buckets, t) - 1
        return min(max(i, 0), self.n_buckets - 1)

    def attach(self, model: nn.Module, name: str = "transformer") -> CalibrationRecorder:
        if name in self.acc:
            raise ConfigError(f"a model named {name!r} is already attached")
        self.acc[name], self.aliases[name] = {}, {}
        self.probes[name], self._probe_count[name] = [], [0] * self.n_buckets
        self._bucket[name] = 0
        self.fingerprints[name] = fingerprint(linear_shapes(model))
        self._handles.append(model.register_forward_pre_hook(self._model_hook(name), with_kwargs=True))
        for mod_name, m in model.named_modules():
            if is_linear_like(m):
                self._handles.append(m.register_forward_pre_hook(self._linear_hook(name, mod_name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last.clear()

    def _model_hook(self, name: str):
        def hook(module, args, kwargs):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            b = self.bucket_of(float(t.reshape(-1)[0])) if torch.is_tensor(t) else 0
            self._bucket[name] = b
            self._last.pop(name, None)
            if self._probe_count[name][b] < self.probes_per_bucket and torch.is_tensor(t):
                probe = _probe(args, kwargs)
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
            acc = self.acc[name].get(mod_name)
            if acc is None:
                acc = self.acc[name][mod_name] = _Accumulator(
                    x.shape[-1], self.n_buckets, self.sample_tokens, self.gen
                )
            acc.add(x, self._bucket[name])

        return hook

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


def _probe(args, kwargs) -> dict[str, torch.Tensor] | None:
    """A compact copy of a transformer call: text features only at LLM-token rows (the model masks the rest)."""
    values = dict(zip(PROBE_ARGS, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k in PROBE_ARGS})
    if any(k not in values or not torch.is_tensor(values[k]) for k in PROBE_ARGS):
        return None
    out = {k: _dense_copy(values[k]) for k in PROBE_ARGS if k != "encoder_hidden_states"}
    ehs = values["encoder_hidden_states"].detach().cpu()
    mask = out["indicator"] == LLM_TOKEN_INDICATOR
    out["llm_rows"] = _dense_copy(ehs[mask])
    out["llm_shape"] = torch.tensor(list(ehs.shape), dtype=torch.int64)
    return out


def synthetic_inputs(
    config: Mapping,
    *,
    text_tokens: int = 16,
    grid: tuple[int, int] = (8, 8),
    timestep: float = 0.5,
    unconditional: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Random transformer call arguments in the pipeline's packed layout ([text][image], or image only for the
    unconditional branch), for tests and benchmarks without a text encoder. `config` is the transformer config."""
    g = torch.Generator().manual_seed(seed)
    n_img = grid[0] * grid[1]
    n_txt = 0 if unconditional else text_tokens
    length = n_txt + n_img
    h = torch.arange(grid[0]).repeat_interleave(grid[1])
    w = torch.arange(grid[1]).repeat(grid[0])
    pos = torch.zeros(1, length, 3, dtype=torch.long)
    pos[0, n_txt:] = torch.stack([torch.zeros_like(h), h, w], dim=1) + 65536
    pos[0, :n_txt] = torch.arange(n_txt)[:, None]
    indicator = torch.full((1, length), 2, dtype=torch.long)
    indicator[0, :n_txt] = LLM_TOKEN_INDICATOR
    hidden = torch.zeros(1, length, config["in_channels"])
    hidden[0, n_txt:] = torch.randn(n_img, config["in_channels"], generator=g)
    text = torch.zeros(1, length, config["llm_features_dim"])
    text[0, :n_txt] = torch.randn(n_txt, config["llm_features_dim"], generator=g)
    return {
        "hidden_states": hidden.to(dtype),
        "timestep": torch.tensor([timestep], dtype=dtype),
        "encoder_hidden_states": text.to(dtype),
        "position_ids": pos,
        "segment_ids": torch.ones(1, length, dtype=torch.long),
        "indicator": indicator,
    }


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
