"""Random Ideogram 4 transformer call arguments, for tests and benchmarks without a text encoder."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ditq.quant.calibration.stats import LLM_TOKEN_INDICATOR


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
