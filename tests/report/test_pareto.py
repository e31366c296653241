"""Pareto frontier on hand-made points, against a brute-force reading of the definition."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from ditq.report.pareto import ParetoPoint, frontier_shares, pareto_frontier, plot_pareto


def _frontier_by_definition(mem, q, higher_is_better):
    better = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)
    out = []
    for i in range(len(mem)):
        if not (np.isfinite(mem[i]) and np.isfinite(q[i])):
            out.append(False)
            continue
        dominated = any(
            np.isfinite(mem[j]) and np.isfinite(q[j]) and mem[j] <= mem[i]
            and (q[j] == q[i] or better(q[j], q[i])) and (mem[j] < mem[i] or better(q[j], q[i]))
            for j in range(len(mem)) if j != i
        )  # fmt: skip
        out.append(not dominated)
    return out


def test_pareto_frontier_hand_made_points():
    # (memory GB, quality): the 2.0/0.7 point beats 3.0/0.6; 2.0/0.4 loses to 2.0/0.7 at equal memory.
    mem = [1.0, 2.0, 3.0, 2.0, 4.0]
    q = [0.5, 0.7, 0.6, 0.4, 0.9]
    assert pareto_frontier(mem, q).tolist() == [True, True, False, False, True]


def test_pareto_frontier_ties():
    # Identical points do not dominate each other; equal quality at more memory is dominated.
    mem = [5.0, 5.0, 6.0, 4.0]
    q = [0.8, 0.8, 0.8, 0.3]
    assert pareto_frontier(mem, q).tolist() == [True, True, False, True]


def test_pareto_frontier_lower_is_better():
    # LPIPS-like: lower quality value is better. 4 GB with 0.10 beats 5 GB with 0.20.
    mem = [4.0, 5.0, 9.0, 3.0]
    lpips = [0.10, 0.20, 0.01, 0.30]
    assert pareto_frontier(mem, lpips, higher_is_better=False).tolist() == [True, False, True, True]
    # Read as higher-is-better, the cheapest point (3 GB, 0.30) would dominate every other one.
    assert pareto_frontier(mem, lpips, higher_is_better=True).tolist() == [False, False, False, True]


def test_pareto_frontier_skips_non_finite_points():
    mask = pareto_frontier([1.0, 2.0, np.nan], [np.nan, 0.5, 0.9])
    assert mask.tolist() == [False, True, False]


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_pareto_frontier_matches_definition_on_random_points(higher_is_better):
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(1, 9))
        mem = rng.integers(1, 5, size=n).astype(float)  # small integer grids produce many ties
        q = rng.integers(0, 4, size=n).astype(float)
        got = pareto_frontier(mem, q, higher_is_better=higher_is_better).tolist()
        assert got == _frontier_by_definition(mem, q, higher_is_better)


def test_plot_pareto_writes_png(tmp_path):
    pts = [
        ParetoPoint(label=name, memory_bytes=m * 1e9, quality=v, low=v - 0.01, high=v + 0.01)
        for name, m, v in [
            ("fp8", 9.6, 0.27),
            ("int8", 9.59, 0.269),
            ("nf4", 5.3, 0.24),
            ("q4_k", 5.05, 0.258),
        ]
    ]
    pts.append(ParetoPoint(label="one", memory_bytes=7e9, quality=0.25, low=np.nan, high=np.nan))
    mask = plot_pareto(
        pts, tmp_path / "p.png", quality_label="hpsv2", memory_label="Resident memory", higher_is_better=True
    )
    assert mask.tolist() == [True, True, False, True, False]
    with Image.open(tmp_path / "p.png") as im:
        assert im.format == "PNG" and im.width > 400
        assert len(set(itertools.islice(im.convert("RGB").getdata(), 0, None, 97))) > 10


def test_frontier_shares_hand_checked_example():
    # A: 1 GB, prompt scores (0, 1); B: 2 GB, (0.4, 0.4). Resampling two prompts gives A a mean of 0, 0.5, 0.5 or 1
    # with probability 1/4 each, while B's mean is always 0.4. A uses less memory, so it is never dominated; B is
    # non-dominated only when it scores strictly higher than A, i.e. when A's mean is 0: share 1/4.
    shares = frontier_shares([1.0, 2.0], np.array([[0.0, 1.0], [0.4, 0.4]]), n_resamples=40_000, seed=1)
    assert shares[0] == 1.0
    assert shares[1] == pytest.approx(0.25, abs=0.01)  # Monte Carlo sd 0.0022
    # Lower is better (an LPIPS-like axis): B is non-dominated when A's mean is 0.5 or 1 -> 3/4.
    low = frontier_shares(
        [1.0, 2.0], np.array([[0.0, 1.0], [0.4, 0.4]]), higher_is_better=False, n_resamples=40_000
    )
    assert low[1] == pytest.approx(0.75, abs=0.01)


def test_frontier_shares_match_exact_enumeration():
    rng = np.random.default_rng(8)
    memory = np.array([3.0, 2.0, 1.0, 2.0])
    values = rng.normal(0, 1, size=(4, 4)).round(1)  # rounded: ties between variants happen
    exact = np.zeros(4)
    draws = list(itertools.product(range(4), repeat=4))  # every resample of 4 prompts, equally likely
    for idx in draws:
        exact += pareto_frontier(memory, values[:, list(idx)].mean(axis=1))
    exact /= len(draws)
    shares = frontier_shares(memory, values, n_resamples=50_000, seed=2)
    np.testing.assert_allclose(shares, exact, atol=0.012)  # 5 Monte Carlo sd at p = 1/2
    assert (
        frontier_shares(memory, values, n_resamples=500, seed=3).tolist()
        == frontier_shares(memory, values, n_resamples=500, seed=3).tolist()
    )


def test_frontier_shares_reject_bad_input():
    with pytest.raises(ValueError, match=r"\[k, n\]"):
        frontier_shares([1.0], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="finite"):
        frontier_shares([1.0, 2.0], np.array([[np.nan], [1.0]]))
