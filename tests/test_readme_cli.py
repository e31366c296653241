"""The README's CLI examples run as written, in order, on the tiny model in an empty folder.

Lines that need what the tiny model cannot give (a CUDA GPU, the real checkpoint, the user's LoRA files) say so in a
`# needs` comment and are skipped; any other line that mentions the hub model or a CUDA device fails the test, so
nothing is skipped without the reader being told.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def cli_block(text: str) -> list[str]:
    """The lines of the first ```bash block under the README's "## The CLI" heading."""
    section = text.split("\n## The CLI\n", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "README: no bash block under ## The CLI"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


def test_every_line_that_cannot_run_on_tiny_says_why():
    lines = cli_block(README.read_text(encoding="utf-8"))
    unmarked = [
        line for line in lines if ("ideogram-ai/" in line or "--device cuda" in line) and "# needs" not in line
    ]
    assert not unmarked, unmarked
    assert sum("# needs" not in line for line in lines) >= 20


@pytest.mark.slow
def test_the_readme_cli_block_runs_as_written(tmp_path):
    lines = [line for line in cli_block(README.read_text(encoding="utf-8")) if "# needs" not in line]
    bindir = str(Path(sys.executable).parent)  # where `pip install` put the `ditq` and `torchrun` scripts
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1"}
    for line in lines:
        done = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200
        )
        assert done.returncode == 0, f"README line failed: {line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert (tmp_path / "run" / "report" / "index.html").is_file()
    assert (tmp_path / "variants" / "q4_k_m-imported" / "model_index.json").is_file()
    assert sorted(p.name for p in (tmp_path / "out-file").glob("*.png")) == ["000_s0.png", "001_s0.png"]
