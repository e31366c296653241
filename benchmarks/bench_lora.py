"""The cost of LoRA branches beside quantized layers, per layer and per step, side by side with the base in one run.

    python benchmarks/bench_lora.py [--tokens 1024 4096] [--formats bf16 fp8 int8 convrot q4_k nf4] [--repeats 3]
                                    [--rank 16] [--block fp8 int8] [--block-tokens 256] [--no-tiny] [--threads N]

1. Per layer, at the Ideogram 4 shapes (4608->4608: each of q, k, v, o; 4608->12288: w1, w3; 12288->4608: w2) and
   each format: the base layer call, the branch alone for 1 and 4 rank-`--rank` LoRAs (ditq's kernel choice, and
   torch's bf16 GEMMs for comparison), and the full call with 1 LoRA as a cross-check. Overhead = branch / base:
   the branch is the only work the hook adds, and timing it alone avoids dividing by the noise of a long base call.
2. Per step, derived: one full-width block's Linears (4x 4608->4608, 2x 4608->12288, 1x 12288->4608, every LoRA
   on all seven) summed from (1); attention and norms are left out, so the real per-step overhead is lower.
3. Per step, measured (`--block`): one full-width `Ideogram4TransformerBlock` (diffusers' class, 4608 wide, 18
   heads, FFN 12288) with its Linears in a format, base vs 1 vs 4 LoRAs on the seven projections: whole calls, and
   the time spent inside the branches during them (a whole call's ratio is only as good as the base GEMMs' run-to-
   run spread, which on a shared 2-core machine is larger than the branches).
4. Per step on the tiny pipeline's conditional transformer (`--no-tiny` skips), one thread: the hook's fixed cost
   where layers are tiny.

All times are medians of `--repeats` round-robin calls (every variant sees the same machine load), after a warm-up.
The header names the CPU, its flags, torch, the thread counts, the git commit and the load average.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import tempfile
import time

import torch
from torch import nn

SHAPES = ((4608, 4608), (4608, 12288), (12288, 4608))  # (in, out)
BLOCK_COUNTS = {(4608, 4608): 4, (4608, 12288): 2, (12288, 4608): 1}  # Linears of one block per shape
RECIPES = {"fp8": {}, "int8": {"smoothquant": False}, "q4_k": {}, "q8_0": {}, "nf4": {}}
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")
PROJECTIONS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
PROJECTIONS += ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def machine() -> str:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout
    except OSError:
        commit = "?"
    import numba

    have = ", ".join(f for f in FLAGS if f in flags) or "none of " + ", ".join(FLAGS)
    return (
        f"{cpu} ({os.cpu_count()} cores; flags: {have}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, {numba.get_num_threads()} numba threads, "
        f"git {commit.strip() or '?'}, load average {os.getloadavg()[0]:.1f}"
    )


def median_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each function, round-robin so that all see the same load (each round starts with the
    next function, so none is always first), after one warm-up each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def make_layer(fmt: str, weight: torch.Tensor) -> nn.Module:
    """A layer of `fmt` (bf16 compute) quantized from a float32 weight [N, K], through ditq's public API."""
    import ditq

    if fmt == "convrot":
        from ditq.formats.convrot import ConvRotInt8Linear, quantize_convrot

        q, s = quantize_convrot(weight, 256)
        return ConvRotInt8Linear(q, s, None, 256, compute_dtype=torch.bfloat16)
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    model = nn.Sequential(lin).to(torch.bfloat16)
    if fmt != "bf16":
        ditq.quantize_(model, ditq.parse_recipe(fmt, **RECIPES[fmt]))
    return model[0]


def lora_state(names: list[str], shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        n, k = shapes[name]
        out[f"{name}.lora_A.weight"] = (torch.randn(rank, k, generator=gen) / k**0.5).to(torch.bfloat16)
        out[f"{name}.lora_B.weight"] = (torch.randn(n, rank, generator=gen) * 0.1).to(torch.bfloat16)
    return out


class _One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer


def apply_n(model: nn.Module, names: list[str], shapes: dict, n: int, rank: int) -> None:
    from ditq.lora import apply_lora, read_lora

    for i in range(n):
        apply_lora(model, read_lora(lora_state(names, shapes, rank, seed=i), name=f"lora{i}"), 0.8)


def per_layer(formats: list[str], tokens: list[int], rank: int, repeats: int) -> dict:
    """{(fmt, K, N, T): times in ms} of the base layer, the branches alone and the full call with one LoRA."""
    from ditq.lora import set_branch_kernel

    print(f"\n## Per layer: median ms of {repeats} round-robin calls, bf16 activations, rank {rank}")
    head = f"{'format':>8} {'K->N':>12} {'T':>5} | {'base':>9} {'1 LoRA':>8} {'4 LoRAs':>8} {'1, torch':>9}"
    print(head + f" | {'call+1':>9} | {'1/base':>7} {'4/base':>7} {'call+1/base':>11}")
    results = {}
    gen = torch.Generator().manual_seed(0)
    for k, n in SHAPES:
        weight = torch.randn(n, k, generator=gen) / k**0.5
        for fmt in formats:
            made = make_layer(fmt, weight)
            plain, one, four, torch_one = copy.deepcopy(made), *(_One(copy.deepcopy(made)) for _ in range(3))
            del made
            apply_n(one, ["proj"], {"proj": (n, k)}, 1, rank)
            apply_n(four, ["proj"], {"proj": (n, k)}, 4, rank)
            apply_n(torch_one, ["proj"], {"proj": (n, k)}, 1, rank)
            set_branch_kernel(torch_one, "torch")
            for t in tokens:
                x = torch.randn(t, k, generator=gen).to(torch.bfloat16)
                r = _layer_times(plain, one.proj, four.proj, torch_one.proj, x, repeats)
                results[(fmt, k, n, t)] = r
                b = r["base"]
                print(
                    f"{fmt:>8} {f'{k}->{n}':>12} {t:>5} | {b:9.1f} {r['branch1']:8.1f} {r['branch4']:8.1f} "
                    f"{r['branch1_torch']:9.1f} | {r['call1']:9.1f} | {r['branch1'] / b:6.1%} "
                    f"{r['branch4'] / b:6.1%} {r['call1'] / b - 1:10.1%}",
                    flush=True,
                )
    return results


def _layer_times(plain, one, four, torch_one, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """The base call, each branch alone (adding into a scratch output) and the full call with one LoRA."""
    y = torch.zeros(x.shape[0], plain.out_features, dtype=torch.bfloat16)
    fns = {
        "base": lambda: plain(x),
        "branch1": lambda: one.lora(x, y),
        "branch4": lambda: four.lora(x, y),
        "branch1_torch": lambda: torch_one.lora(x, y),
        "call1": lambda: one(x),
    }
    return median_ms(fns, repeats)


def per_step_derived(results: dict, formats: list[str], tokens: list[int]) -> None:
    print(
        "\n## Per step, derived from the layers: one block's seven projections (attention and norms left out)"
    )
    print(
        f"{'format':>8} {'T':>5} | {'base s':>8} {'1 LoRA s':>9} {'4 LoRAs s':>10} | {'1/base':>7} {'4/base':>7}"
    )
    for fmt in formats:
        for t in tokens:
            sums = {key: 0.0 for key in ("base", "branch1", "branch4")}
            for (k, n), count in BLOCK_COUNTS.items():
                for key in sums:
                    sums[key] += count * results[(fmt, k, n, t)][key] / 1e3
            b = sums["base"]
            print(
                f"{fmt:>8} {t:>5} | {b:8.2f} {sums['branch1']:9.3f} {sums['branch4']:10.3f} | "
                f"{sums['branch1'] / b:6.1%} {sums['branch4'] / b:6.1%}"
            )


def full_block(fmt: str) -> nn.Module:
    from diffusers.models.transformers.transformer_ideogram4 import Ideogram4TransformerBlock

    import ditq

    torch.manual_seed(0)
    block = Ideogram4TransformerBlock(4608, 12288, 18, 1e-5, 512).to(torch.bfloat16).eval()
    for p in block.parameters():
        p.requires_grad_(False)
    if fmt == "bf16":
        return block
    ditq.quantize_(block, ditq.parse_recipe(fmt, **RECIPES.get(fmt, {})))
    return block


class BranchClock:
    """Wall time spent inside the LoRA branches of a model (pre/post hooks on each `LoraBranch`), per model call."""

    def __init__(self, model: nn.Module) -> None:
        from ditq.lora.adapters import LoraBranch

        self.total, self.calls, self._t0 = 0.0, 0, 0.0
        for m in model.modules():
            if isinstance(m, LoraBranch):
                m.register_forward_pre_hook(self._start)
                m.register_forward_hook(self._stop)
        model.register_forward_pre_hook(self._count)

    def _start(self, *_):
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self.total += time.perf_counter() - self._t0

    def _count(self, *_):
        self.calls += 1

    @property
    def per_call(self) -> float:
        return self.total / max(self.calls, 1)


def per_step_block(formats: list[str], t: int, rank: int, repeats: int) -> None:
    """One full-width block per format: whole calls (base vs 1 vs 4 LoRAs, round-robin) and the time spent inside
    the branches during those calls, which the base GEMMs' own variance does not blur."""
    from ditq.lora.targets import linear_shapes

    print(
        f"\n## Per step, measured: one full-width block, {t} tokens, median s of {repeats} round-robin calls"
    )
    print(
        f"{'format':>8} | {'base s':>8} {'1 LoRA s':>9} {'4 LoRAs s':>10} | {'in branch 1':>11} {'in branch 4':>11}"
        f" | {'1/base':>7} {'4/base':>7} | {'call1-1':>8} {'call4-1':>8}"
    )
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, t, 4608, generator=gen).to(torch.bfloat16)
    angle = torch.randn(1, t, 256, generator=gen)
    rope = (angle.cos().to(torch.bfloat16), angle.sin().to(torch.bfloat16))
    adaln = (torch.randn(1, 1, 512, generator=gen) * 0.1).to(torch.bfloat16)
    for fmt in formats:
        block = full_block(fmt)
        shapes = linear_shapes(block)
        models = {"base": copy.deepcopy(block)}  # all three are copies, laid out in memory alike
        clocks = {}
        for count in (1, 4):
            m = copy.deepcopy(block)
            apply_n(m, list(PROJECTIONS), shapes, count, rank)
            models[f"lora{count}"], clocks[count] = m, BranchClock(m)
        del block
        fns = {name: (lambda m=m: m(hidden, None, rope, adaln)) for name, m in models.items()}
        r = {k: v / 1e3 for k, v in median_ms(fns, repeats).items()}
        b, in1, in4 = r["base"], clocks[1].per_call, clocks[4].per_call
        print(
            f"{fmt:>8} | {b:8.2f} {r['lora1']:9.2f} {r['lora4']:10.2f} | {in1:11.3f} {in4:11.3f} | "
            f"{in1 / b:6.1%} {in4 / b:6.1%} | {r['lora1'] / b - 1:7.1%} {r['lora4'] / b - 1:7.1%}",
            flush=True,
        )
        del models, fns


def per_step_tiny(rank: int, repeats: int) -> None:
    """One call of each tiny transformer per variant, base vs 1 vs 4 LoRAs on every block projection."""
    os.environ.setdefault("DITQ_CACHE", tempfile.mkdtemp(prefix="ditq-bench-"))
    import ditq
    from ditq.lora import apply_lora, read_lora
    from ditq.lora.targets import linear_shapes

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests do: at these sizes a second thread only adds OpenMP barrier waits
    print(
        f"\n## Per step on the tiny pipeline (2 layers, 256 wide, 320 tokens, 1 thread), median ms of {repeats}"
    )
    print(f"{'variant':>8} | {'base':>8} {'1 LoRA':>8} {'4 LoRAs':>8} | {'1/base-1':>8} {'4/base-1':>8}")
    root = tempfile.mkdtemp(prefix="ditq-bench-variants-")
    folders = {"fp8": "tiny"}
    for name, recipe in (("int8", ditq.Int8Recipe(smoothquant=False)), ("q4_k", "q4_k"), ("nf4", "nf4")):
        folders[name] = ditq.quantize_pipeline("tiny", recipe, os.path.join(root, name), progress=False)
    for name, folder in folders.items():
        pipe = ditq.load_pipeline(folder)
        kw = _recorded_inputs(pipe)
        models = {0: pipe.transformer, 1: copy.deepcopy(pipe.transformer), 4: copy.deepcopy(pipe.transformer)}
        shapes = linear_shapes(models[0])
        names = [n for n in shapes if n.startswith("layers.") and n.split(".", 2)[2] in PROJECTIONS]
        for count, model in models.items():
            for i in range(count):
                apply_lora(model, read_lora(lora_state(names, shapes, rank, seed=i), name=f"l{i}"), 0.8)
        fns = {count: (lambda m=m, kw=kw: m(**kw, return_dict=False)) for count, m in models.items()}
        times = median_ms(fns, repeats)
        b = times[0]
        print(
            f"{name:>8} | {b:8.1f} {times[1]:8.1f} {times[4]:8.1f} | {times[1] / b - 1:7.1%} {times[4] / b - 1:7.1%}"
        )
    torch.set_num_threads(threads)


def _recorded_inputs(pipe) -> dict:
    """The keyword arguments of the conditional transformer's call in one denoising step."""
    got: dict = {}

    def pre(module, args, kwargs):
        got.setdefault("kw", {k: v for k, v in kwargs.items() if k != "return_dict"})

    hook = pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True)
    pipe(prompt="a red fox", height=64, width=64, num_inference_steps=1, guidance_schedule=[7.0],
         max_sequence_length=64, output_type="latent")  # fmt: skip
    hook.remove()
    return got["kw"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024])
    ap.add_argument("--formats", nargs="+", default=["bf16", "fp8", "int8", "convrot", "q4_k", "nf4"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--block", nargs="*", default=["fp8", "int8"], help="formats of the full-block step (none: skip)"
    )
    ap.add_argument("--block-tokens", type=int, default=256)
    ap.add_argument("--no-tiny", action="store_true")
    ap.add_argument("--no-layers", action="store_true")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {machine()}")
    start = time.time()
    if not args.no_layers:
        results = per_layer(args.formats, args.tokens, args.rank, args.repeats)
        per_step_derived(results, args.formats, args.tokens)
    if args.block:
        per_step_block(args.block, args.block_tokens, args.rank, args.repeats)
    if not args.no_tiny:
        per_step_tiny(args.rank, max(15, args.repeats))
    print(f"\n# done in {time.time() - start:.0f} s; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
