"""`benchmarks/bench_gpu.py --smoke`: the GPU benchmark's own code at the tiny model's shapes on the CPU, so the
script is known to run before a GPU sees it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"


@pytest.mark.slow
def test_the_gpu_benchmark_runs_at_tiny_shapes_on_the_cpu():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--repeats", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for heading in ("torch._int_mm", "One transformer block", "2 denoising steps", "Whole generation"):
        assert heading in text, heading
    # every part ran every row it lists on the CPU: no format or variant was skipped
    rows = [line for line in text.splitlines() if "|" in line]
    assert not [r for r in rows if "not run" in r], [r for r in rows if "not run" in r]
    for fmt in ("bf16", "fp8", "int8", "int8+compile", "q4_k", "nf4", "svdq_w4a4", "convrot_w4a4"):
        assert any(r.split("|")[0].strip() == fmt for r in rows), fmt
    for variant in ("fp8", "int8", "q8_0", "q6_k", "q4_k", "nf4", "int8+q4_k"):
        assert sum(r.split("|")[0].split()[:1] == [variant] for r in rows) >= 1, variant


def test_the_gpu_benchmark_refuses_to_run_without_cuda():
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--smoke" in out.stderr
