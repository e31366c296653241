"""Throughput and error of ditq's GGUF encoders against llama.cpp's C reference quantizer.

    python benchmarks/bench_kquants.py [--ggml-lib PATH/libggml-base.so] [--types Q3_K,Q4_K] [--repeat 3]
                                       [--rows 4096] [--json results.json]

Input: `np.random.default_rng(1234).standard_normal((rows, 4096), dtype=np.float32)` (64 MiB at 4096 rows) and
the imatrix `exp(N(0, 1))` of `np.random.default_rng(8)`. For each type it reports MB/s of float32 input (best of
--repeat, wall clock) on 1 and 2 threads, with and without the imatrix, and the ratio of ditq on one thread to
llama.cpp's reference quantizer on one thread:

- measured side by side, when --ggml-lib names a shared library exporting ggml's `ggml_quantize_chunk` (the
  `libggml-base.so` of a llama.cpp build with default flags, whose quantizers are compiled without -march=native):
  the C and ditq runs alternate round by round so both see the same machine load, and the bytes of both are
  compared (ditq follows the k-quant rule given by --rule, which must be the library's);
- else against RECORDED_C below, numbers measured that way on a named machine ("recorded" in the table).

Also: "CPU MB/s" (input bytes per CPU-second per thread, meaningful when other processes share the cores; the load
average is printed with every row), and the relative Frobenius error ||W - dequantize(quantize(W))|| / ||W||.
The machine, library versions and git commit are recorded with the numbers.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
from gguf import GGMLQuantizationType

import ditq.gguf as G

# llama.cpp's reference quantizer on one core, MB/s of float32 input (plain, imatrix), measured side by side with
# this script (--ggml-lib, a -O3 build of ggml-quants.c's reference functions at llama.cpp 01243c58 without
# -march=native) while ditq ran 2.8x (Q3_K) to 6.6x faster; load average 2-4 from other jobs.
RECORDED_C = {
    "machine": "2-core AMD EPYC (znver3: AVX2, FMA, F16C, no AVX-512 / VNNI), 24 GB RAM, 2026-12-01",
    "mbps": {
        "Q2_K": (38.9, 14.1),
        "Q3_K": (164.0, 46.6),
        "Q4_K": (29.5, 16.4),
        "Q5_K": (37.1, 17.5),
        "Q6_K": (66.3, 44.8),
        "Q8_0": (361.5, None),
    },
}
DEFAULT_TYPES = "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0"


def machine() -> dict[str, object]:
    cpu = platform.processor()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [
                    f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni") if f in have
                ]
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
        "cpu_flags": " ".join(flags),
        "cores_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "gguf": importlib.metadata.version("gguf"),
        "git_commit": commit,
    }


class CReference:
    """llama.cpp's quantizer through ggml's public `ggml_quantize_chunk` in a shared library."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        f = self.lib.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        f.argtypes += [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self._f = f

    def quantize(self, x: np.ndarray, qtype: str, imatrix: np.ndarray | None) -> np.ndarray:
        q = GGMLQuantizationType[qtype]
        out = np.empty((x.shape[0], G.row_bytes(qtype, x.shape[1])), np.uint8)
        im = None if imatrix is None else imatrix.ctypes.data
        n = self._f(int(q), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], im)
        if n != out.nbytes:
            raise RuntimeError(
                f"{self.path}: ggml_quantize_chunk wrote {n} bytes of {qtype}, expected {out.nbytes}"
            )
        return out


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def side_by_side(runs: dict[str, Callable[[], object]], repeat: int) -> dict[str, tuple[float, float]]:
    """Best wall and CPU seconds of each run, the runs taken round-robin `repeat` times."""
    best = {k: (float("inf"), float("inf")) for k in runs}
    for _ in range(repeat):
        for k, fn in runs.items():
            wall, cpu = timed(fn)
            best[k] = (min(best[k][0], wall), min(best[k][1], cpu))
    return best


def bench_type(x, imatrix, qtype, c_ref, rule, repeat):
    """One type: rows of the table (plain and imatrix), each with ditq's 1- and 2-thread and C's 1-thread speed."""
    uses_imatrix = G.codec(qtype).uses_imatrix
    rows = []
    for im in (None, imatrix) if uses_imatrix else (None,):
        G.quantize(x[:64], qtype, im, threads=1, rule=rule)  # compile / load the kernels
        runs: dict[str, Callable[[], object]] = {
            "ditq1": lambda im=im: G.quantize(x, qtype, im, threads=1, rule=rule),
            "ditq2": lambda im=im: G.quantize(x, qtype, im, threads=2, rule=rule),
        }
        identical = None
        if c_ref is not None:
            runs["c"] = lambda im=im: c_ref.quantize(x, qtype, im)
            identical = bool(
                np.array_equal(c_ref.quantize(x, qtype, im), G.quantize(x, qtype, im, rule=rule))
            )
        best = side_by_side(runs, repeat)
        mb = x.nbytes / 1e6
        row = {
            "type": qtype,
            "imatrix": im is not None,
            "ditq_mbps_1": mb / best["ditq1"][0],
            "ditq_mbps_2": mb / best["ditq2"][0],
            "ditq_cpu_mbps_2": mb / (best["ditq2"][1] / 2),
            "load": os.getloadavg()[0],
        }
        if c_ref is not None:
            row.update(c_mbps_1=mb / best["c"][0], c_source="measured", bytes_identical=identical)
        else:
            recorded = RECORDED_C["mbps"].get(qtype, (None, None))[1 if im is not None else 0]
            row.update(c_mbps_1=recorded, c_source="recorded" if recorded else None, bytes_identical=None)
        row["ratio_1"] = row["ditq_mbps_1"] / row["c_mbps_1"] if row["c_mbps_1"] else None
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=DEFAULT_TYPES)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--ggml-lib", type=Path, help="shared library exporting ggml_quantize_chunk")
    parser.add_argument("--rule", default=G.DEFAULT_RULE, choices=list(G.KQUANT_RULES))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    types = [t.strip() for t in args.types.split(",")]
    c_ref = CReference(args.ggml_lib) if args.ggml_lib else None

    x = np.random.default_rng(1234).standard_normal((args.rows, 4096), dtype=np.float32)
    imatrix = np.exp(np.random.default_rng(8).standard_normal(4096)).astype(np.float32)
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    c_note = (
        f"measured side by side from {args.ggml_lib}" if c_ref else f"recorded on {RECORDED_C['machine']}"
    )
    print(f"input: float32 {x.shape}, {x.nbytes / 1e6:.1f} MB; best of {args.repeat}; C reference {c_note}")
    print()
    head = f"{'type':6} {'imatrix':7} {'ditq 1T':>8} {'ditq 2T':>8} {'C 1T':>8} {'ditq/C 1T':>10} {'CPU MB/s 2T':>11}"
    print(head + f" {'bytes = C':>9} {'load':>5}")
    rows = []
    for qtype in types:
        for row in bench_type(x, imatrix, qtype, c_ref, args.rule, args.repeat):
            rows.append(row)
            c = f"{row['c_mbps_1']:.1f}" if row["c_mbps_1"] else "-"
            ratio = (
                f"{row['ratio_1']:.2f}x" + ("" if row["c_source"] == "measured" else "*")
                if row["ratio_1"]
                else "-"
            )
            same = {True: "yes", False: "NO", None: "-"}[row["bytes_identical"]]
            print(
                f"{qtype:6} {'yes' if row['imatrix'] else 'no':7} {row['ditq_mbps_1']:8.1f} {row['ditq_mbps_2']:8.1f} "
                f"{c:>8} {ratio:>10} {row['ditq_cpu_mbps_2']:11.1f} {same:>9} {row['load']:5.1f}"
            )
    if c_ref is None:
        print("* against the recorded C figures, not measured in this run")
    q3 = next((r for r in rows if r["type"] == "Q3_K" and not r["imatrix"] and r["ratio_1"]), None)
    if q3 is not None:
        verdict = "meets" if q3["ratio_1"] >= 2 else "misses"
        print(
            f"\nQ3_K without imatrix: {q3['ratio_1']:.2f}x the C reference on one thread ({verdict} the 2x target)"
        )

    print()
    print(f"{'type':6} {'rel. Frobenius error':>21}")
    errors = {}
    for qtype in types:
        decoded = G.dequantize(G.quantize(x, qtype), qtype)
        err = float(np.linalg.norm((decoded - x).astype(np.float64)) / np.linalg.norm(x.astype(np.float64)))
        errors[qtype] = err
        print(f"{qtype:6} {err:21.5f}")

    if args.json:
        result = {
            "machine": info,
            "c_reference": c_note,
            "rule": args.rule,
            "throughput": rows,
            "rel_error": errors,
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
