"""Fixtures for the report tests: one synthetic run folder and its report, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic_run import FAST, write_run


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="session")
def built_report(synthetic_run):
    from ditq.report import build_report

    return build_report(synthetic_run, settings=FAST)
