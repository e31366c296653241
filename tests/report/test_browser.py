"""The HTML report renders in a real headless browser (skipped where Chromium is not installed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(built_report, tmp_path):
    shot = tmp_path / "shot.png"
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}", "--window-size=1280,2000", built_report.index_html.resolve().as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        pixels = np.asarray(im.convert("RGB"), dtype=np.int16)
    # Non-blank: a page of text and tables has many non-white pixels, several distinct colours and dark text
    # in the top band where the title is.
    non_white = (pixels < 245).any(axis=2)
    assert non_white.mean() > 0.05
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 50
    assert (pixels[:120].sum(axis=2) < 200).any()
