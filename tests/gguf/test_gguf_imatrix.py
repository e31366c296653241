"""An importance matrix lowers the activation-weighted error of the k-quants."""

from __future__ import annotations

import gguf.quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType

import ditq.gguf as G


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_imatrix_lowers_activation_weighted_error(qtype):
    rng = np.random.default_rng(2024)
    weight = (rng.standard_normal((64, 1024)) * 0.02).astype(np.float32)
    # skewed per-column activation energy (log-normal), as in DiT linears with outlier channels; the imatrix is
    # the mean squared activation per input column, as llama.cpp's imatrix tool collects it
    energy = np.exp(1.5 * rng.standard_normal(1024))
    acts = rng.standard_normal((512, 1024)) * np.sqrt(energy)
    imatrix = (acts**2).mean(axis=0).astype(np.float32)

    def weighted_error(imat: np.ndarray | None) -> float:
        decoded = gguf.quants.dequantize(G.quantize(weight, qtype, imat), GGMLQuantizationType[qtype])
        return float((imatrix * (weight - decoded) ** 2).sum())

    plain, weighted = weighted_error(None), weighted_error(imatrix)
    assert weighted < 0.8 * plain, f"{qtype}: imatrix {weighted:.4g} vs plain {plain:.4g}"
