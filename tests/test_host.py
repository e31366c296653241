"""The thread default: physical cores, one per rank under torchrun, `--threads` wins; set for torch and numba."""

from __future__ import annotations

import pytest
import torch

from ditq import host
from ditq.errors import ConfigError


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_is_the_physical_cores_and_one_per_rank_under_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(host, "physical_cores", lambda: 6)
    assert host.default_threads() == 6
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert host.default_threads() == 1
    monkeypatch.setenv("WORLD_SIZE", "not a number")
    assert host.default_threads() == 6


def test_set_threads_applies_the_default_or_the_given_count(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert host.set_threads(None) == 1 and torch.get_num_threads() == 1
    monkeypatch.delenv("WORLD_SIZE")
    assert host.set_threads(2) == 2 and torch.get_num_threads() == 2
    with pytest.raises(ConfigError, match="--threads must be >= 1"):
        host.set_threads(0)


def test_physical_cores_is_at_most_the_logical_count():
    import os

    assert 1 <= host.physical_cores() <= (os.cpu_count() or 1)
