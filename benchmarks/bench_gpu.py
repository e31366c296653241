"""The GPU benchmark: speed per format at Ideogram 4's full-size shapes, and the memory of a whole generation on a
24 GiB budget next to the plan. One script, meant to finish in under 8 minutes on one GPU.

    python benchmarks/bench_gpu.py                 # CUDA, full size
    python benchmarks/bench_gpu.py --smoke         # the same code at the tiny model's shapes on the CPU

Parts (each prints one table; `--parts` picks some):

1. `intmm`: `torch._int_mm` [M, K] x [K, N] with the weight stored [N, K] (passed transposed: column-major, the
   layout cuBLASLt's INT8 kernels want) and stored [K, N] (row-major), against bf16 `mm`; TOPS.
2. `block`: one `Ideogram4TransformerBlock` (diffusers' class; 4608 wide, 18 heads, FFN 12288) at 6,144 tokens (the
   conditional branch at 1024² with the text padded to 2,048) and 4,096 (the unconditional one), its Linears in
   each format quantized from the same random bf16 weights: median seconds per call, x FP8-dequant, and the
   relative error of the block's update (output less its residual input) against bf16. A step is 34 blocks of each.
3. `step`: both full-size transformers resident with synthetic storage (uninitialized, in each format's real
   layout: speed is real, outputs are not), 2 denoising steps at 1024²: seconds per step.
4. `memory`: the whole pipeline (FP8 text encoder, both transformers, VAE) in each variant, with the process capped at
   24 GiB (`torch.cuda.set_per_process_memory_fraction`), under the policy the planner picks for a 24 GiB card:
   encode, 2 steps, decode; `max_memory_allocated` / `max_memory_reserved` next to the planned peak.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

GiB = 2**30
FULL = {
    "width": 4608,
    "ffn": 12288,
    "heads": 18,
    "adaln": 512,
    "tokens": (6144, 4096),
    "size": 1024,
    "text": 2048,
}
TINY = {"width": 256, "ffn": 512, "heads": 2, "adaln": 256, "tokens": (768, 256), "size": 64, "text": 512}
BLOCK_FORMATS = (
    "bf16",
    "fp8",
    "fp8-scaled_mm",
    "int8",
    "int8+compile",
    "q4_k",
    "nf4",
    "svdq_w4a4",
    "convrot_w4a4",
)
STEP_VARIANTS = ("bf16", "fp8", "int8", "q4_k", "nf4", "int8+q4_k")
MEMORY_VARIANTS = ("fp8", "int8", "q8_0", "q6_k", "q4_k", "nf4", "int8+q4_k")
RECIPE_OPTIONS = {"int8": {"smoothquant": False}, "svdq_w4a4": {"smoothquant": False}}
RECIPE_OPTIONS["convrot_w4a4"] = {"smoothquant": False}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_s(fn, device: str, repeats: int, warmup: int = 2) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / GiB:.0f} GiB, torch {torch.__version__}"
    import platform

    return f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------------- _int_mm


def part_intmm(device: str, dims: dict, repeats: int) -> None:
    print(f"\n## torch._int_mm vs bf16 mm, M = {dims['tokens'][0]} tokens, median of {repeats}")
    print(
        f"{'K->N':>13} | {'bf16 ms':>8} {'int8 [N,K]^T ms':>16} {'int8 [K,N] ms':>14} | {'TOPS bf16':>9} {'TOPS int8':>9}"
    )
    m, d, f = dims["tokens"][0], dims["width"], dims["ffn"]
    gen = torch.Generator(device=device).manual_seed(0)
    for k, n in ((d, d), (d, f), (f, d)):
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device, generator=gen)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device, generator=gen)
        w_kn = w.t().contiguous()
        ab, wb = a.to(torch.bfloat16), w.to(torch.bfloat16)
        t_bf = median_s(lambda ab=ab, wb=wb: ab @ wb.t(), device, repeats)
        t_col = median_s(lambda a=a, w=w: torch._int_mm(a, w.t()), device, repeats)
        t_row = median_s(lambda a=a, w_kn=w_kn: torch._int_mm(a, w_kn), device, repeats)
        ops = 2 * m * k * n
        print(
            f"{k:>6}->{n:<6} | {1e3 * t_bf:8.3f} {1e3 * t_col:16.3f} {1e3 * t_row:14.3f} | "
            f"{ops / t_bf / 1e12:9.1f} {ops / min(t_col, t_row) / 1e12:9.1f}",
            flush=True,
        )


# ------------------------------------------------------------------------------------------------------ block


def make_block(fmt: str, dims: dict, device: str) -> nn.Module:
    """One block with the same seeded bf16 weights, its Linears quantized to `fmt` on the CPU, then moved."""
    from diffusers.models.transformers.transformer_ideogram4 import Ideogram4TransformerBlock

    import ditq

    torch.manual_seed(0)
    block = Ideogram4TransformerBlock(dims["width"], dims["ffn"], dims["heads"], 1e-5, dims["adaln"])
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
            p.requires_grad_(False)
    block = block.to(torch.bfloat16).eval()
    base = fmt.split("+")[0].split("-")[0]
    if base != "bf16":
        ditq.quantize_(block, ditq.parse_recipe(base, **RECIPE_OPTIONS.get(base, {})))
    block = block.to(device)
    if fmt == "fp8-scaled_mm":
        from ditq.formats.fp8 import Fp8Linear, check_scaled_mm_device

        check_scaled_mm_device(torch.device(device))
        for m in block.modules():
            if isinstance(m, Fp8Linear):
                m.compute = "scaled_mm"
    if fmt.endswith("+compile"):
        block = torch.compile(block, fullgraph=True, dynamic=False)
    return block


def block_inputs(dims: dict, tokens: int, device: str):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, tokens, dims["width"], generator=gen).to(torch.bfloat16)
    angle = torch.randn(1, tokens, dims["width"] // dims["heads"], generator=gen)
    rope = (angle.cos().to(torch.bfloat16).to(device), angle.sin().to(torch.bfloat16).to(device))
    adaln = (torch.randn(1, 1, dims["adaln"], generator=gen) * 0.1).to(torch.bfloat16)
    return hidden.to(device), rope, adaln.to(device)


def part_block(device: str, dims: dict, formats: list[str], repeats: int) -> None:
    print(
        f"\n## One transformer block, median s of {repeats} calls; x fp8 = fp8-dequant time / this format's"
    )
    print(f"{'format':>14} | " + " | ".join(f"{t:>5} tok s   x fp8  rel.err" for t in dims["tokens"]))
    inputs = {t: block_inputs(dims, t, device) for t in dims["tokens"]}
    rows, ref, fp8 = {}, {}, {}
    for fmt in formats:
        try:
            block = make_block(fmt, dims, device)
            cells = []
            for t, (h, rope, adaln) in inputs.items():
                with torch.no_grad():  # the block's update (its output less the residual input)
                    out = block(h, None, rope, adaln).float() - h.float()
                if fmt == "bf16":
                    ref[t] = out
                secs = median_s(lambda b=block, h=h, r=rope, a=adaln: b(h, None, r, a), device, repeats)
                if fmt == "fp8":
                    fp8[t] = secs
                err = float((out - ref[t]).norm() / ref[t].norm()) if t in ref else float("nan")
                speed = fp8[t] / secs if t in fp8 else float("nan")
                cells.append(f"{secs:9.4f} {speed:7.2f}x {err:8.2e}")
            rows[fmt] = cells
            print(f"{fmt:>14} | " + " | ".join(cells), flush=True)
        except Exception as exc:  # a format this device cannot run: say why, go on
            print(f"{fmt:>14} | not run: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
        finally:
            block = None
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- whole pipeline


def components(smoke: bool) -> dict:
    if smoke:
        from ditq.models.loading import resolve_source
        from ditq.quant.inspect import meta_components

        return meta_components(resolve_source("tiny"))
    from ditq.models.sizes import full_size_components

    return full_size_components()


def synthetic(meta: nn.Module, recipe, device: str) -> nn.Module:
    from ditq.quant.fakes import fake_model, on_device

    with torch.no_grad(), on_device(device):
        return fake_model(meta, recipe, torch.bfloat16)


def run_steps(
    cond, uncond, dims: dict, grid, llm: int, channels: int, device: str, steps: int = 2
) -> list[float]:
    """Seconds of each of `steps` denoising steps (ditq's loop, both transformers)."""
    from ditq.models.denoise import StepTimer, denoise
    from ditq.quant.fakes import on_device
    from ditq.quant.simulate import _real_sigmas, _Scheduler, denoise_inputs

    with on_device(device):
        pipe, c, latents = denoise_inputs(
            cond, uncond, _Scheduler(), dims["text"], dims["text"], grid, llm, channels
        )
    timer = StepTimer(device)
    size = dims["size"]
    with torch.no_grad(), _real_sigmas():
        timer.start()
        denoise(pipe, c, latents, size, size, [7.0] * steps, 0.0, 1.75, on_step=lambda i, x: timer.step())
    return timer.steps


def part_step(device: str, dims: dict, variants: list[str], smoke: bool) -> None:
    from ditq.quant.plan import variant_recipes

    print(
        f"\n## 2 denoising steps at {dims['size']}², both transformers resident (synthetic storage), s per step"
    )
    for v in variants:
        try:
            comps = components(smoke)
            cfg = comps["transformer"].config
            scale = 2 ** (len(comps["vae"].config.block_out_channels) - 1) * 2
            grid = (dims["size"] // scale, dims["size"] // scale)
            recipes = variant_recipes(v)
            t = synthetic(comps["transformer"], recipes["transformer"], device)
            u = synthetic(comps["unconditional_transformer"], recipes["unconditional_transformer"], device)
            steps = run_steps(t, u, dims, grid, cfg.llm_features_dim, cfg.in_channels, device)
            print(
                f"{v:>10} | steps {', '.join(f'{s:.3f}' for s in steps)} s | second step {steps[-1]:.3f} s",
                flush=True,
            )
        except Exception as exc:
            print(f"{v:>10} | not run: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
        finally:
            t = u = None
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


def part_memory(device: str, dims: dict, variants: list[str], smoke: bool, budget: int) -> None:
    from diffusers.hooks import apply_group_offloading

    from ditq.models.denoise import decode_latents
    from ditq.quant.fakes import on_device
    from ditq.quant.plan import plan_variant, variant_recipes

    cuda = device.startswith("cuda")
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    print(
        f"\n## Whole generation at {dims['size']}² under the planned policy, capped at {budget / GiB:.1f} GiB"
    )
    print(
        f"{'variant':>10} {'policy':>9} | {'planned GiB':>11} {'allocated GiB':>13} {'reserved GiB':>12} | s/step"
    )
    size = dims["size"]
    for v in variants:
        try:
            plan = plan_variant(components(smoke), v, size, size, budget, text_tokens=dims["text"])
            policy = plan.policy
            if policy not in ("none", "encoder", "group"):
                print(f"{v:>10} {policy:>9} | not run: only none, encoder and group are benchmarked here")
                continue
            comps = components(smoke)
            cfg = comps["transformer"].config
            scale = 2 ** (len(comps["vae"].config.block_out_channels) - 1) * 2
            grid = (size // scale, size // scale)
            recipes = variant_recipes(v)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            te = comps["text_encoder"]
            if hasattr(te, "visual"):
                del te.visual
            te = synthetic(te, "fp8", device)
            with on_device(device):
                _encode(te, dims, grid)
            if policy != "none":
                te = None
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            where = "cpu" if policy == "group" else device
            t = synthetic(comps["transformer"], recipes["transformer"], where)
            u = synthetic(comps["unconditional_transformer"], recipes["unconditional_transformer"], where)
            if policy == "group":
                for m in (t, u):
                    apply_group_offloading(
                        m,
                        onload_device=torch.device(device),
                        offload_device=torch.device("cpu"),
                        offload_type="block_level",
                        num_blocks_per_group=1,
                        use_stream=cuda,
                    )
            vae = synthetic(comps["vae"], "bf16", device)
            steps = run_steps(t, u, dims, grid, cfg.llm_features_dim, cfg.in_channels, device)
            with on_device(device), torch.no_grad():
                latents = torch.randn(1, grid[0] * grid[1], cfg.in_channels, device=device)
                decode_latents(
                    SimpleNamespace(vae=vae, patch_size=2, vae_scale_factor=scale // 2), latents, size, size
                )
            if cuda:
                alloc, reserved = (
                    torch.cuda.max_memory_allocated(device),
                    torch.cuda.max_memory_reserved(device),
                )
                got = f"{alloc / GiB:13.2f} {reserved / GiB:12.2f}"
            else:
                got = f"{'n/a (CPU)':>13} {'':>12}"
            print(
                f"{v:>10} {policy:>9} | {plan.chosen.peak_bytes / GiB:11.2f} {got} | {steps[-1]:.3f}",
                flush=True,
            )
        except Exception as exc:
            print(f"{v:>10} | not run: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
        finally:
            te = t = u = vae = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()


def _encode(te, dims, grid):
    """The pipeline's `encode_prompt` for one prompt of the padded length (untracked: real storage)."""
    from types import SimpleNamespace

    from diffusers import Ideogram4Pipeline

    from ditq.quant import fakes
    from ditq.quant.simulate import _Tokens

    stub = SimpleNamespace(
        tokenizer=_Tokens(dims["text"]),
        text_encoder=te,
        _prepare_ids=Ideogram4Pipeline._prepare_ids,
        _get_text_encoder_hidden_states=Ideogram4Pipeline._get_text_encoder_hidden_states,
    )
    with torch.no_grad():
        return Ideogram4Pipeline.encode_prompt(
            stub,
            prompt="x",
            grid_h=grid[0],
            grid_w=grid[1],
            max_sequence_length=dims["text"],
            device=fakes.DEVICE,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (tests the script)")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    p.add_argument("--parts", default="intmm,block,step,memory")
    p.add_argument("--formats", default=",".join(BLOCK_FORMATS))
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--budget", type=float, default=24.0, help="GiB the memory part caps the process at")
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    dims = TINY if args.smoke else FULL
    repeats = args.repeats or (3 if args.smoke else 10)
    parts = args.parts.split(",")
    start = time.time()
    print(f"# bench_gpu on {machine(device)}{' (smoke: tiny shapes)' if args.smoke else ''}")
    if "intmm" in parts:
        part_intmm(device, dims, repeats)
    if "block" in parts:
        part_block(device, dims, args.formats.split(","), repeats)
    if "step" in parts:
        part_step(device, dims, list(STEP_VARIANTS), args.smoke)
    if "memory" in parts:
        part_memory(device, dims, list(MEMORY_VARIANTS), args.smoke, int(args.budget * GiB))
    print(f"\n# done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
