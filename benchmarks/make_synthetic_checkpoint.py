"""A synthetic full-size Ideogram 4 transformer in the official FP8 layout, for conversion benchmarks.

    python benchmarks/make_synthetic_checkpoint.py [--out /tmp/ditq-synthetic/transformer-fp8] [--seed 0]

Writes a transformer component folder (`config.json` + `diffusion_pytorch_model.safetensors`, ~9.3 GB) with the
real shapes of one `Ideogram4Transformer2DModel` (default config, 9,279,288,448 parameters) under the official fused
names (669 tensors): every Linear weight `float8_e4m3fn` [N, K] from Gaussian values with its fp32 per-row
`weight_scale` [N] (row absmax / 448); biases, norms and the image-indicator embedding bf16. The weights are random:
the file is for measuring conversion time and memory, not for generating images.

The file is written tensor by tensor (peak memory about one float32 row chunk plus one FP8 tensor) into a temporary
folder next to `--out`, then renamed into place, so a reader never sees a partial checkpoint. An existing folder
with a matching `synthetic.json` marker is reused; two writers racing keep whichever finished first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path("/tmp/ditq-synthetic/transformer-fp8")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
MARKER = "synthetic.json"
# Bump when the contents change, so stale folders are rebuilt.
VERSION = 1
FP8_MAX = 448.0
CHUNK_ELEMENTS = 1 << 24  # float32 values generated at a time (64 MiB)


def full_size_model():
    """The default-config `Ideogram4Transformer2DModel` on the meta device (shapes only, no memory)."""
    from accelerate import init_empty_weights
    from diffusers import Ideogram4Transformer2DModel

    with init_empty_weights(include_buffers=True):
        return Ideogram4Transformer2DModel()


def tensor_specs(model) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Official fused name -> (dtype, shape) of every tensor of the FP8 checkpoint, weight before its scale."""
    from torch import nn

    from ditq.formats.keys import split_to_fused

    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    split: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in linears and leaf == "weight":
            split[key] = torch.empty(value.shape, dtype=torch.float8_e4m3fn, device="meta")
            split[f"{module}.weight_scale"] = torch.empty(value.shape[0], dtype=torch.float32, device="meta")
        else:
            split[key] = torch.empty(value.shape, dtype=torch.bfloat16, device="meta")
    fused = split_to_fused(split)  # meta tensors: q/k/v rows are concatenated without touching memory
    return {name: (t.dtype, tuple(t.shape)) for name, t in fused.items()}


def _fp8_weight(shape: tuple[int, int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian weights (std 0.02) as E4M3 [N, K] plus fp32 per-row scales [N], generated in row chunks."""
    rows, cols = shape
    q = torch.empty(shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, dtype=torch.float32)
    step = max(1, CHUNK_ELEMENTS // cols)
    for r in range(0, rows, step):
        x = torch.randn((min(step, rows - r), cols), generator=gen, dtype=torch.float32).mul_(0.02)
        s = x.abs().amax(dim=1).clamp_min_(1e-12).div_(FP8_MAX)
        q[r : r + x.shape[0]] = x.div_(s[:, None]).to(torch.float8_e4m3fn)
        scale[r : r + x.shape[0]] = s
    return q, scale


def _float_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith(".weight") and ("norm" in name):
        x = 1.0 + 0.1 * x  # norm gains around 1
    else:
        x = 0.02 * x  # biases and the indicator embedding
    return x.to(torch.bfloat16)


def write_checkpoint(folder: Path, seed: int) -> None:
    """Write the component folder `folder` (which must not exist yet)."""
    from ditq.io.safetensors_io import StreamingSafetensorsWriter

    model = full_size_model()
    specs = tensor_specs(model)
    folder.mkdir(parents=True)
    model.save_config(folder)  # config.json, as diffusers writes it
    gen = torch.Generator().manual_seed(seed)
    total = sum(torch.empty((), dtype=d).element_size() * _numel(s) for d, s in specs.values())
    done = 0
    start = time.perf_counter()
    with StreamingSafetensorsWriter(folder / WEIGHTS_NAME, specs, {"format": "pt"}) as writer:
        for name, (dtype, shape) in specs.items():
            if name.endswith(".weight_scale"):
                continue  # written right after its weight
            if dtype == torch.float8_e4m3fn:
                q, scale = _fp8_weight(shape, gen)
                writer.write(name, q)
                writer.write(f"{name[: -len('.weight')]}.weight_scale", scale)
                done += q.numel() + 4 * scale.numel()
                del q, scale
            else:
                t = _float_tensor(name, shape, gen)
                writer.write(name, t)
                done += 2 * t.numel()
            print(f"\r{done / 1e9:6.2f} / {total / 1e9:.2f} GB", end="", flush=True)
    print(f"\rwrote {total / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s")
    marker = {"version": VERSION, "seed": seed, "tensors": len(specs), "bytes": total}
    (folder / MARKER).write_text(json.dumps(marker))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def is_complete(folder: Path, seed: int) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("version") == VERSION and marker.get("seed") == seed


def ensure_checkpoint(out: Path = DEFAULT_OUT, seed: int = 0, force: bool = False) -> Path:
    """The synthetic checkpoint at `out`, written if missing (atomically: temporary folder, then rename)."""
    out = Path(out)
    if is_complete(out, seed) and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write_checkpoint(tmp / "component", seed)
        if out.exists():
            if is_complete(out, seed) and not force:
                return out  # another writer finished first
            shutil.rmtree(out)
        try:
            (tmp / "component").rename(out)
        except OSError:
            if not is_complete(out, seed):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="component folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rewrite even if a complete folder exists")
    args = p.parse_args()
    print(ensure_checkpoint(args.out, args.seed, args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
