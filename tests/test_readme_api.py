"""The README's Python API example runs as written (in a scratch folder, on the tiny model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def api_example() -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no api-example block"
    return m.group(1)


@pytest.mark.slow
def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(api_example(), "README.md:api-example", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "fp8"
    assert out[1].startswith("int8+q4_k gguf {") and "'gguf': " in out[1]  # layer counts per format
    assert out[2] == "{'0': 'Q4_K', '2': 'Q4_K'}"
    assert (tmp_path / "fox.png").is_file() and (tmp_path / "variants" / "int8" / "ditq.json").is_file()
