"""Peak memory and time of the streaming INT8 converter on a full-size Ideogram 4 transformer.

Builds a synthetic checkpoint with the real shapes (`Ideogram4Transformer2DModel` config defaults: 9.28B parameters,
official fused names, random E4M3 weights with fp32 row scales, ~9.3 GB), written tensor by tensor, plus synthetic
calibration statistics with outlier channels; then converts it with SmoothQuant (α searched per group) in a child
process and reports that process's wall time and peak RSS (`resource.getrusage` in that process; the checkpoint is written by another child, so the parent
stays small: a forked child inherits its parent's peak RSS). Everything lives under --workdir and is deleted
afterwards unless --keep.

    python benchmarks/bench_int8_convert.py [--workdir /tmp/ditq-int8-bench] [--layers N] [--alpha auto|0.5|none]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def full_config(layers: int | None) -> dict:
    """Keyword overrides of the `Ideogram4Transformer2DModel` defaults (the full-size model)."""
    return {"num_layers": layers} if layers else {}


def build_meta(cfg: dict):
    from accelerate import init_empty_weights
    from diffusers import Ideogram4Transformer2DModel

    with init_empty_weights():
        return Ideogram4Transformer2DModel(**cfg)


def write_checkpoint(folder: Path, cfg: dict) -> int:
    """Random FP8 checkpoint in the official layout, one tensor at a time; returns its parameter count."""
    import torch
    from torch import nn

    from ditq.formats.fp8 import quantize_fp8_rowwise
    from ditq.formats.keys import split_to_fused
    from ditq.io.safetensors_io import StreamingSafetensorsWriter

    model = build_meta(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for key, p in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in linears and leaf == "weight":
            specs[key] = (torch.float8_e4m3fn, tuple(p.shape))
            specs[f"{module}.weight_scale"] = (torch.float32, (p.shape[0],))
        else:
            specs[key] = (torch.bfloat16, tuple(p.shape))
    fused = split_to_fused(
        specs, row_joiner=lambda suffix, parts: (parts[0][0], (3 * parts[0][1][0], *parts[0][1][1:]))
    )
    gen = torch.Generator().manual_seed(0)
    params = 0
    with StreamingSafetensorsWriter(
        folder / "diffusion_pytorch_model.safetensors", fused, {"format": "pt"}
    ) as w:
        pending = {}
        for name, (dtype, shape) in fused.items():
            if name in pending:
                w.write(name, pending.pop(name))
                continue
            if dtype == torch.float8_e4m3fn:
                rows = []
                for r0 in range(0, shape[0], 4096):
                    chunk = torch.randn(min(4096, shape[0] - r0), shape[1], generator=gen) / shape[1] ** 0.5
                    rows.append(quantize_fp8_rowwise(chunk))
                q = torch.cat([r[0] for r in rows])
                pending[name.replace(".weight", ".weight_scale")] = torch.cat([r[1] for r in rows])
                w.write(name, q)
                params += q.numel()
                del q, rows
            elif name.endswith(".weight_scale"):
                w.write(name, pending.pop(name))
            else:
                t = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=gen) * 0.02
                w.write(name, t.to(dtype))
                params += t.numel()
    return params


def write_stats(path: Path, cfg: dict, sample_tokens: int = 64) -> None:
    """Synthetic statistics: Gaussian activations with a few channels 20-100x larger, 4 timestep buckets."""
    import torch

    from ditq.quant.calibration import QUANTILES, CalibrationStats, ModuleStats, fingerprint, linear_shapes

    model = build_meta(cfg)
    shapes = linear_shapes(model)
    aliases = {}
    for name in shapes:
        for a, b in (("to_k", "to_q"), ("to_v", "to_q"), ("w3", "w1")):
            if name.endswith("." + a):
                aliases[name] = name[: -len(a)] + b
    gen = torch.Generator().manual_seed(1)
    modules = {}
    for name, (_, k) in shapes.items():
        if name in aliases:
            continue
        x = torch.randn(sample_tokens, k, generator=gen)
        x[:, :4] *= torch.tensor([20.0, 40.0, 70.0, 100.0])
        absmax = x.abs().amax(0).repeat(4, 1) * 1.2
        modules[name] = ModuleStats(
            absmax=absmax,
            sumsq=(x.double() ** 2).sum(0).repeat(4, 1),
            count=torch.full((4,), sample_tokens, dtype=torch.int64),
            token_absmax_quantiles=torch.ones(4, len(QUANTILES)),
            samples=x.to(torch.bfloat16),
        )
    meta = {
        "samples": 0,
        "captions_sha256": "synthetic",
        "models": {"transformer": {"fingerprint": fingerprint(shapes)}},
    }
    CalibrationStats(
        buckets=(0.0, 0.25, 0.5, 0.75, 1.0),
        modules={"transformer": modules},
        aliases={"transformer": aliases},
        meta=meta,
    ).save(path)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def generate(args) -> None:
    import torch

    t0 = time.perf_counter()
    cfg = full_config(args.layers)
    params = write_checkpoint(args.workdir / "fp8" / "transformer", cfg)
    if args.alpha != "none":
        write_stats(args.workdir / "stats.safetensors", cfg)
    size = (args.workdir / "fp8" / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    print(
        json.dumps(
            {"params": params, "bytes": size, "seconds": time.perf_counter() - t0, "torch": torch.__version__}
        )
    )


def child(args) -> None:
    from ditq.quant.int8 import Int8W8A8Config, SmoothQuantConfig, convert_transformer_int8

    if args.alpha == "none":
        config, stats = Int8W8A8Config(), None
    else:
        config = SmoothQuantConfig(alpha=None if args.alpha == "auto" else float(args.alpha))
        stats = args.workdir / "stats.safetensors"
    t0 = time.perf_counter()
    report = convert_transformer_int8(
        args.workdir / "fp8" / "transformer",
        args.workdir / "int8" / "transformer",
        stats,
        config,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss": peak,
                "bytes": report.bytes_written,
                "quantized": len(report.quantized),
                "kept": len(report.kept_float),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ditq-int8-bench"))
    ap.add_argument("--layers", type=int, help="override num_layers (default: the full 34)")
    ap.add_argument("--alpha", default="auto", help="auto (search), a number, or none (plain W8A8)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the output")
    ap.add_argument("--child", choices=("generate", "convert"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "generate":
        return generate(args)
    if args.child == "convert":
        return child(args)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    base = [sys.executable, __file__, "--workdir", str(args.workdir), "--alpha", args.alpha]
    if args.layers:
        base += ["--layers", str(args.layers)]
    try:
        gen = _run([*base, "--child", "generate"])
        print(f"# {platform.machine()}, {os.cpu_count()} cpus, torch {gen['torch']}, git {commit}")
        print(
            f"synthetic FP8 checkpoint: {gen['params'] / 1e9:.2f}B parameters, {gen['bytes'] / 1e9:.2f} GB, "
            f"written in {gen['seconds']:.0f} s"
        )
        res = _run([*base, "--child", "convert"])
        print(
            f"convert (alpha={args.alpha}): {res['seconds']:.0f} s, peak RSS {res['peak_rss'] / 2**30:.2f} GiB, "
            f"output {res['bytes'] / 1e9:.2f} GB ({res['quantized']} int8 modules, {res['kept']} kept bf16)"
        )
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


def _run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
