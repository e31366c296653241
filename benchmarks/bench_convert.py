"""Streaming conversion of one full-size transformer: wall time, throughput and peak memory per recipe.

    python benchmarks/bench_convert.py [--recipes q4_k,nf4] [--source DIR] [--out /tmp/ditq-bench-convert]
                                       [--threads N] [--keep] [--json results.json]

The source is the synthetic full-size FP8 checkpoint from `make_synthetic_checkpoint.py` (built under
/tmp/ditq-synthetic/ on first use, reused afterwards): the real shapes and names of one `Ideogram4Transformer2DModel`
with random weights, ~9.3 GB. Each recipe converts it in its own subprocess through the recipe's per-transformer
entry point (what `ditq quantize` runs for each transformer), so the peak resident set size measured for that
child (`os.wait4` rusage, which counts every page the process touched, memory-mapped file pages included) is the
conversion's own. Goal: peak RSS <= 3 GB per recipe, whatever the model size.

Reported per recipe: wall time of the child (imports included) and of the conversion itself, MB/s of FP8 source
read and of float32 values encoded, output bytes, peak RSS. The machine, torch version and git commit are printed
with the numbers. Outputs are deleted afterwards unless --keep.

Measured 2026-11-25 on AMD EPYC, 2 cores, 25 GB, torch 2.13.0+cpu, commit 7ce1572, other work on the machine
(load average 3-4); MB/s of float32 values encoded:
    q4_k  169 s  220 MB/s  5.65 GB out  peak RSS 1.07 GB
    nf4   355 s  105 MB/s  5.22 GB out  peak RSS 0.96 GB
Before reading in row blocks without a memory map (commit c7813bd): q4_k 184 s, peak RSS 10.27 GB; nf4 637 s,
peak RSS 11.07 GB (every page of the 9.3 GB memory-mapped source stayed resident, and NF4 handed bitsandbytes the
whole 245M-value text projection at once, whose quantizer makes several float32 temporaries of its input).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RSS_GOAL = 3e9
# what a conversion runs: a change here makes the numbers not those of the recorded commit
CONVERSION_SOURCES = (
    "src/ditq/quant/recipes",
    "src/ditq/quant/formats",
    "src/ditq/io",
    "src/ditq/gguf",
    "benchmarks/bench_convert.py",
    "benchmarks/make_synthetic_checkpoint.py",
)


def machine() -> dict[str, object]:
    import psutil
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    root = HERE.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", *CONVERSION_SOURCES],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout
        commit += " (with uncommitted changes)" if dirty.strip() else ""
    except OSError:
        commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
        "load_average": os.getloadavg(),
    }


def child(recipe: str, source: Path, out: Path, threads: int | None) -> int:
    """Runs in the subprocess: convert `source` (a transformer component folder) into `out`."""
    import resource

    from ditq.quant.recipes import RECIPES

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = RECIPES.get(recipe).convert(
        source, out, {"progress": False, "component": "transformer", "threads": threads}
    )
    summary["convert_s"] = time.perf_counter() - start
    summary["self_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(summary, default=str), flush=True)
    return 0


def run_recipe(recipe: str, source: Path, out: Path, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", recipe, "--source", str(source), "--out", str(out)]
    if threads:
        cmd += ["--threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{recipe}: conversion failed with status {proc.returncode}")
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
    summary = json.loads(line[len("RESULT ") :])
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, **summary}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="q4_k,nf4", help="comma list of ditq recipes")
    p.add_argument("--source", type=Path, help="transformer component folder (default: the synthetic one)")
    p.add_argument("--out", type=Path, default=Path("/tmp/ditq-bench-convert"))
    p.add_argument("--threads", type=int, help="GGUF encoder threads (default: every core)")
    p.add_argument("--keep", action="store_true", help="keep the converted files")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.source, args.out, args.threads)

    if args.source is None:
        sys.path.insert(0, str(HERE))
        from make_synthetic_checkpoint import ensure_checkpoint

        args.source = ensure_checkpoint()
    from ditq.io.safetensors_io import TensorSource

    src = TensorSource(args.source)
    fp8_bytes = src.total_bytes()
    # values the recipes decode to float32 (every tensor but the FP8 scales)
    values = sum(math.prod(src.info(k).shape) for k in src.keys() if not k.endswith(".weight_scale"))
    del src
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB; python {info['python']}")
    print(f"torch {info['torch']}; commit {info['commit']}; {info['date']}")
    print(f"source: {args.source} ({fp8_bytes / 1e9:.2f} GB FP8/bf16, {values / 1e9:.3f} G values)")
    results = {"machine": info, "source": str(args.source), "source_bytes": fp8_bytes, "recipes": {}}
    header = f"{'recipe':8} {'wall s':>8} {'conv s':>8} {'src MB/s':>9} {'f32 MB/s':>9} {'out GB':>7} {'peak RSS':>9}"
    rows = []
    for recipe in args.recipes.split(","):
        out = args.out / recipe
        shutil.rmtree(out, ignore_errors=True)
        r = run_recipe(recipe, args.source, out, args.threads)
        r["source_mb_per_s"] = fp8_bytes / 1e6 / r["convert_s"]
        r["float32_mb_per_s"] = 4 * values / 1e6 / r["convert_s"]
        r["load_average_after"] = os.getloadavg()
        results["recipes"][recipe] = r
        rows.append(
            f"{recipe:8} {r['wall_s']:8.1f} {r['convert_s']:8.1f} {r['source_mb_per_s']:9.1f} "
            f"{r['float32_mb_per_s']:9.1f} {r['bytes'] / 1e9:7.3f} {r['peak_rss_bytes'] / 1e9:7.2f} GB"
            + ("" if r["peak_rss_bytes"] <= RSS_GOAL else "  (over the 3 GB goal)")
        )
        print(rows[-1] if len(rows) > 1 else header + "\n" + rows[-1], flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
