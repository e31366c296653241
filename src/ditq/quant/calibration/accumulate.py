"""Running statistics of one Linear input, kept on the device the inputs arrive on.

Per timestep bucket b and input channel k, for the tokens of each call that are not padding::

    absmax[b, k]  fp32   max |x_k|                       (a max: exact in any order, on any device)
    sumsq[b, k]   fp64   Σ x_k²   (squares summed in fp64, a chunk of rows at a time)
    count[b]      int64  tokens counted

and two bounded samples, both drawn by *priority sampling*: every offered token gets a random key (uniform in
[0, 1), drawn from one seeded CPU generator in the order the calls arrive), and a sample holds the `cap` tokens with
the smallest keys seen so far. That is a uniform sample without replacement of everything offered, whatever the
number of calls, and it needs no per-row Python loop: one `topk` over the pool and the new keys. Padding tokens get
the key +inf, so they are never kept. Because the keys come from the CPU generator, the samples are the same rows
whether the statistics accumulate on a GPU or on the host.

- `token_absmax[b]`: up to `TOKEN_RESERVOIR` per-token absmax values (for the quantiles of per-token scales);
- `samples`: up to `sample_tokens` whole input rows (bf16), pooled over buckets, for choosing alpha.

Transient memory per call is one chunk of rows in fp32 (`CHUNK_ELEMENTS`), never a host copy of the input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ditq.quant.calibration.stats import TOKEN_RESERVOIR, ModuleStats

CHUNK_ELEMENTS = 1 << 22  # rows are reduced in chunks of ~4M elements (16 MB of fp32)
FIELDS = (
    "absmax",
    "sumsq",
    "count",
    "token_absmax",
    "token_keys",
    "samples",
    "sample_keys",
    "sample_seq",
    "seen",
)


def _chunks(rows: int, k: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


class Accumulator:
    """The statistics of one Linear input (see the module docstring); all state on `device`."""

    def __init__(
        self, k: int, n_buckets: int, sample_tokens: int, device: torch.device | str = "cpu"
    ) -> None:
        dev = torch.device(device)
        inf = float("inf")
        self.absmax = torch.zeros(n_buckets, k, device=dev)
        self.sumsq = torch.zeros(n_buckets, k, dtype=torch.float64, device=dev)
        self.count = torch.zeros(n_buckets, dtype=torch.int64, device=dev)
        self.token_absmax = torch.zeros(n_buckets, TOKEN_RESERVOIR, device=dev)
        self.token_keys = torch.full((n_buckets, TOKEN_RESERVOIR), inf, dtype=torch.float64, device=dev)
        self.samples = torch.zeros(sample_tokens, k, dtype=torch.bfloat16, device=dev)
        self.sample_keys = torch.full((sample_tokens,), inf, dtype=torch.float64, device=dev)
        self.sample_seq = torch.zeros(sample_tokens, dtype=torch.int64, device=dev)
        self.seen = torch.zeros((), dtype=torch.int64)  # rows offered so far (host: it numbers the rows)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def to(self, device: torch.device | str) -> Accumulator:
        for f in FIELDS:
            if f != "seen":
                setattr(self, f, getattr(self, f).to(device))
        return self

    def add(self, x2: torch.Tensor, valid: torch.Tensor | None, bucket: int, keys: torch.Tensor) -> None:
        """Count the rows of x2 [M, K] (any float dtype, on this accumulator's device) where `valid` [M] (bool or
        None: all) holds; `keys` [M] fp64 are the rows' sampling keys (on the same device)."""
        m, k = x2.shape
        if m == 0:
            return
        tok = torch.empty(m, device=x2.device)
        for r in _chunks(m, k):
            a = x2[r].float().abs()
            if valid is not None:
                a.mul_(valid[r, None])  # padding rows become zero rows: no part in a max or a sum of squares
            self.absmax[bucket] = torch.maximum(self.absmax[bucket], a.amax(dim=0))
            tok[r] = a.amax(dim=1)
            self.sumsq[bucket] += a.square_().sum(dim=0, dtype=torch.float64)
        live = tok > 0  # padding and all-zero tokens are not counted
        self.count[bucket] += live.sum()
        keys = torch.where(live, keys, torch.full_like(keys, float("inf")))
        self.token_absmax[bucket], self.token_keys[bucket] = _keep_smallest(
            self.token_keys[bucket], self.token_absmax[bucket], keys, tok
        )
        cap = self.samples.shape[0]
        if cap:
            cand = torch.cat([self.sample_keys, keys])
            top = torch.topk(cand, cap, largest=False, sorted=True)
            idx = top.indices
            from_pool = idx < cap
            old = self.samples[idx.clamp(max=cap - 1)]
            new = x2[(idx - cap).clamp(min=0)].to(torch.bfloat16)
            rows = torch.where(from_pool[:, None], old, new)
            seq = torch.where(
                from_pool,
                self.sample_seq[idx.clamp(max=cap - 1)],
                (idx - cap).clamp(min=0) + int(self.seen),
            )
            empty = torch.isinf(top.values)
            self.samples = rows.masked_fill(empty[:, None], 0)
            self.sample_seq = seq.masked_fill(empty, 0)
            self.sample_keys = top.values
        self.seen += m

    def finish(self, quantiles: Sequence[float]) -> ModuleStats:
        """The statistics on the host (samples in the order they arrived)."""
        q = torch.tensor(quantiles, dtype=torch.float32)
        keys, vals = self.token_keys.cpu(), self.token_absmax.cpu()
        quant = torch.stack(
            [
                torch.quantile(v[torch.isfinite(k)], q)
                if bool(torch.isfinite(k).any())
                else torch.zeros(len(q))
                for k, v in zip(keys, vals, strict=True)
            ]
        )
        kept = torch.isfinite(self.sample_keys.cpu())
        order = torch.argsort(self.sample_seq.cpu()[kept])
        return ModuleStats(
            absmax=self.absmax.cpu(),
            sumsq=self.sumsq.cpu(),
            count=self.count.cpu(),
            token_absmax_quantiles=quant,
            samples=self.samples.cpu()[kept][order],
        )

    def state(self) -> dict[str, torch.Tensor]:
        """Host copies of the whole state (what a resumed calibration continues from)."""
        return {f: getattr(self, f).detach().cpu().clone() for f in FIELDS}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Accumulator:
        acc = cls.__new__(cls)
        for f in FIELDS:
            setattr(acc, f, state[f].clone())
        return acc


def _keep_smallest(
    pool_keys: torch.Tensor, pool_vals: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `len(pool_keys)` (value, key) pairs with the smallest keys among the pool's and the new ones."""
    cap = pool_keys.shape[0]
    top = torch.topk(torch.cat([pool_keys, keys]), cap, largest=False, sorted=True)
    out = torch.cat([pool_vals, vals.to(pool_vals.dtype)])[top.indices]
    return out.masked_fill(torch.isinf(top.values), 0), top.values
