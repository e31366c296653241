"""Golden digests of the tiny model's variants: file tensors (names, dtypes, shapes, data) and image pixels.

Everything is made through the CLI (calibrate, quantize, convert, generate), so the digests follow the behaviour a
user sees, whatever the code behind it. They were recorded with `python tests/test_golden_tiny.py --write` and
change only when a behaviour is changed on purpose (regenerate them in the same commit and say why).

File metadata (recipe JSON, versions) is left out: it records how a file was made, not what it holds. Calibration
statistics, SmoothQuant decisions and images go through floating-point GEMMs whose last bits depend on the CPU's
instruction set, so they are compared only on a CPU with the recorded signature; the tensor data of the
quantizers that are elementwise or integer-exact (FP8 source, GGUF without importance matrix, NF4) is compared
everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "data" / "golden_tiny.json"
PROMPT = "a neon sign that says OPEN above a red door"
# variant -> quantize arguments (after `tiny`); "stats" is replaced by the calibration file
VARIANTS = {
    "int8": ["--recipe", "int8", "--stats", "STATS"],
    "int8-a05": ["--recipe", "int8", "--stats", "STATS", "--alpha", "0.5"],
    "int8-plain": ["--recipe", "int8"],
    "q8_0": ["--recipe", "q8_0"],
    "q4_k": ["--recipe", "q4_k"],
    "q4_k_m": ["--recipe", "q4_k_m", "--stats", "STATS"],
    "nf4": ["--recipe", "nf4"],
}
# digests that do not depend on floating-point reduction order, hence not on the CPU
PORTABLE = ("files/source", "files/q8_0", "files/q4_k", "files/nf4", "files/export-sdcpp-q4_k")
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def cpu_signature() -> str:
    import torch

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    have = ",".join(f for f in _FLAGS if f in flags)
    return f"{platform.machine()}|{have}|torch {torch.__version__}"


def _tensor_digests(path: Path) -> dict[str, str]:
    """name -> "dtype shape sha256" for every tensor of a .safetensors or .gguf file."""
    out = {}
    if path.suffix == ".gguf":
        from gguf import GGUFReader

        for t in GGUFReader(path).tensors:
            data = np.asarray(t.data).tobytes()
            out[t.name] = f"{t.tensor_type.name} {list(map(int, t.shape))} {hashlib.sha256(data).hexdigest()}"
        return out
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            raw = t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
            out[name] = f"{t.dtype} {list(t.shape)} {hashlib.sha256(raw).hexdigest()}"
    return out


def _folder_digests(folder: Path, components=("transformer", "unconditional_transformer")) -> dict:
    out = {}
    for comp in components:
        for f in sorted((folder / comp).iterdir()):
            if f.suffix in (".safetensors", ".gguf"):
                out[f"{comp}/{f.name}"] = _tensor_digests(f)
    return out


def _image_digest(folder: Path) -> str:
    from PIL import Image

    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 1, pngs
    pixels = np.asarray(Image.open(pngs[0]).convert("RGB"))
    return hashlib.sha256(pixels.tobytes()).hexdigest()


def compute(root: Path) -> dict:
    """Build every variant under `root` through the CLI and return the digests."""
    import torch

    from ditq.cli import main
    from ditq.models.loading import ensure_tiny_folder

    torch.set_num_threads(1)

    def cli(*argv: str) -> None:
        code = main([*argv, "--threads", "1"])
        assert code == 0, argv

    source = ensure_tiny_folder()
    stats = root / "stats.safetensors"
    cli("calibrate", "tiny", "--samples", "2", "--steps", "3", "--sample-tokens", "32", "-o", str(stats))
    digests: dict = {"files/source": _folder_digests(source), "stats": _tensor_digests(stats)}
    folders = {"fp8": source}
    for name, extra in VARIANTS.items():
        out = root / "variants" / name
        cli("quantize", "tiny", *[str(stats) if a == "STATS" else a for a in extra], "-o", str(out))
        digests[f"files/{name}"] = _folder_digests(out)
        folders[name] = out
    cli("convert", str(folders["q4_k"]), "--to", "sdcpp", "-o", str(root / "export-sdcpp"))
    cli("convert", str(folders["int8"]), "--to", "comfyui", "-o", str(root / "export-comfyui"))
    digests["files/export-sdcpp-q4_k"] = {
        f.name: _tensor_digests(f) for f in sorted((root / "export-sdcpp").iterdir())
    }
    digests["files/export-comfyui-int8"] = {
        f.name: _tensor_digests(f) for f in sorted((root / "export-comfyui").iterdir())
    }
    for name, folder in folders.items():
        out = root / "images" / name
        cli(
            "generate",
            "--model",
            str(folder),
            "--prompt",
            PROMPT,
            "--seed",
            "0",
            "--steps",
            "3",
            "-o",
            str(out),
        )
        digests[f"image/{name}"] = _image_digest(out)
    return digests


@pytest.mark.slow
def test_golden_tiny_digests(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    got = compute(tmp_path)
    same_cpu = golden["cpu"] == cpu_signature()
    checked = [k for k in golden["digests"] if same_cpu or k in PORTABLE]
    for key in checked:
        assert got[key] == golden["digests"][key], f"{key} differs from the golden digest"
    assert set(got) == set(golden["digests"])


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python tests/test_golden_tiny.py --write")
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DITQ_CACHE"] = str(Path(tmp) / "cache")
        result = {"cpu": cpu_signature(), "digests": compute(Path(tmp))}
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
