"""ditq's W8A8 linear against bf16 `nn.Linear` (F.linear) and torchao's `Int8DynamicActivationInt8WeightConfig` (eager), at
Ideogram 4 shapes, in one process: median wall time of repeated calls (round-robin, so all see the same machine load), speed
ratios and output errors. The ceiling is the bare `torch._int_mm` of already-quantized activations against the layer's int8
weight (no quantization, no rescale): what any W8A8 layer built on it could reach.

    python benchmarks/bench_int8_linear.py [--tokens 1024 4096] [--repeats 7] [--threads N]

Errors are relative RMS errors against a float64 reference of the same bf16 inputs and weights.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import time

import torch

SHAPES = ((4608, 4608), (4608, 12288), (12288, 4608))  # (in, out): attention, ffn up, ffn down


def median_ms(fns: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median time of each function, measured round-robin so that every one sees the same machine load."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn(x)  # warm-up (numba / oneDNN first-call costs)
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "?"
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, git {commit or '?'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    from ditq.formats.int8 import Int8Linear

    print(f"# {machine()}")
    print(
        f"# median of {args.repeats} round-robin calls; errors: relative RMS vs float64 of the same bf16 inputs"
    )
    header = (
        f"{'K->N':>12} {'tokens':>6} | {'bf16 ms':>8} {'ditq ms':>8} {'torchao ms':>10} {'_int_mm ms':>10} | "
    )
    header += f"{'ditq/bf16':>9} {'ditq/ao':>8} {'mm/bf16':>8} | {'err ditq':>9} {'err ao':>9}"
    print(header)
    gen = torch.Generator().manual_seed(0)
    for k, n in SHAPES:
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(torch.bfloat16)
        ours = Int8Linear.from_float(w.float())
        ref_lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        ref_lin.weight.data.copy_(w)
        ao = copy.deepcopy(ref_lin)
        quantize_(ao, Int8DynamicActivationInt8WeightConfig())
        for m in args.tokens:
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
            wt = ours.stored("weight").t()  # the layer's own int8 weight, transposed view [K, N]

            def bare(_x, xq=xq, wt=wt):
                return torch._int_mm(xq, wt)

            with torch.no_grad():
                ref = x.double() @ w.double().t()
                fns = {"bf16": ref_lin, "ditq": ours, "torchao": ao, "int_mm": bare}
                t = median_ms(fns, x, args.repeats)
                t_bf16, t_ours, t_ao, t_mm = t["bf16"], t["ditq"], t["torchao"], t["int_mm"]
                e_ours, e_ao = rel_err(ours(x), ref), rel_err(ao(x), ref)
            print(
                f"{f'{k}->{n}':>12} {m:>6} | {t_bf16:8.1f} {t_ours:8.1f} {t_ao:10.1f} {t_mm:10.1f} | "
                f"{t_bf16 / t_ours:8.2f}x {t_ao / t_ours:7.2f}x {t_bf16 / t_mm:7.2f}x | {e_ours:9.2e} {e_ao:9.2e}"
            )


if __name__ == "__main__":
    main()
