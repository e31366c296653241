"""Throughput and error of ditq's GGUF encoders against llama.cpp's C reference quantizer.

    python benchmarks/bench_kquants.py [--types Q4_K,Q5_K,Q6_K,Q8_0] [--repeat 3] [--json results.json]

Input: `np.random.default_rng(1234).standard_normal((4096, 4096), dtype=np.float32)` (64 MiB). For each type and
1 and 2 threads it reports MB/s of float32 input (best of --repeat, wall clock) and the ratio to llama.cpp's
reference quantizer on one core of the same kind of machine (the numbers below), plus "CPU MB/s": input bytes per
CPU-second per thread, which stays meaningful when other processes share the cores (the load average is printed
with every row). Then the relative Frobenius error ||W - dequantize(quantize(W))|| / ||W|| next to llama.cpp's.
The machine, library versions and git commit are recorded with the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numba
import numpy as np

import ditq.gguf as G

# llama.cpp's reference quantizer (ggml_quantize_chunk, default x86 build), measured on one core of the same
# 2-core AMD EPYC machine type: MB/s of float32 input by thread count, and relative Frobenius error on the input.
LLAMA_CPP_MBPS = {"Q4_K": {1: 81.8, 2: 160.0}, "Q5_K": {1: 95.0}, "Q6_K": {1: 157.0}, "Q8_0": {1: 1440.0}}
LLAMA_CPP_ERROR = {"Q4_K": 0.07134, "Q5_K": 0.03611, "Q6_K": 0.01773, "Q8_0": 0.00535}
DEFAULT_TYPES = "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0"


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src/ditq/gguf", "benchmarks"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout
        commit = commit.strip() + (" (gguf sources modified)" if dirty.strip() else "")
    except OSError:
        commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "gguf": importlib.metadata.version("gguf"),
        "git_commit": commit,
    }


def time_quantize(x: np.ndarray, qtype: str, threads: int, repeat: int, imatrix=None) -> dict[str, float]:
    G.quantize(x[:64], qtype, imatrix, threads=threads)  # compile / load the kernels
    wall = cpu = float("inf")
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        G.quantize(x, qtype, imatrix, threads=threads)
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return {
        "mbps": x.nbytes / wall / 1e6,
        "cpu_mbps": x.nbytes / (cpu / threads) / 1e6,
        "load": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=DEFAULT_TYPES)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    types = [t.strip() for t in args.types.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]

    x = np.random.default_rng(1234).standard_normal((4096, 4096), dtype=np.float32)
    imatrix = np.exp(np.random.default_rng(8).standard_normal(4096)).astype(np.float32)
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"input: float32 {x.shape}, {x.nbytes / 1e6:.1f} MB; best of {args.repeat}")
    print()
    print(
        f"{'type':6} {'thr':>3} {'MB/s':>8} {'llama.cpp':>9} {'ratio':>6} {'CPU MB/s':>9} {'imatrix MB/s':>12} {'load':>5}"
    )
    rows = []
    for qtype in types:
        for threads in thread_counts:
            r = time_quantize(x, qtype, threads, args.repeat)
            uses_imatrix = G.codec(qtype).uses_imatrix
            r_im = time_quantize(x, qtype, threads, args.repeat, imatrix) if uses_imatrix else None
            ref = LLAMA_CPP_MBPS.get(qtype, {}).get(threads)
            row = {"type": qtype, "threads": threads, **r, "llama_cpp_mbps": ref}
            row["imatrix_mbps"] = r_im["mbps"] if r_im else None
            rows.append(row)
            ratio = f"{r['mbps'] / ref:.2f}x" if ref else "-"
            im = f"{r_im['mbps']:.1f}" if r_im else "-"
            print(
                f"{qtype:6} {threads:3d} {r['mbps']:8.1f} {ref or '-':>9} {ratio:>6} {r['cpu_mbps']:9.1f} "
                f"{im:>12} {r['load']:5.1f}"
            )

    print()
    print(f"{'type':6} {'rel. Frobenius error':>21} {'llama.cpp':>10}")
    errors = {}
    for qtype in types:
        decoded = G.dequantize(G.quantize(x, qtype), qtype)
        err = float(np.linalg.norm((decoded - x).astype(np.float64)) / np.linalg.norm(x.astype(np.float64)))
        errors[qtype] = err
        ref = LLAMA_CPP_ERROR.get(qtype)
        print(f"{qtype:6} {err:21.5f} {f'{ref:.5f}' if ref else '-':>10}")

    if args.json:
        args.json.write_text(json.dumps({"machine": info, "throughput": rows, "rel_error": errors}, indent=2))


if __name__ == "__main__":
    main()
