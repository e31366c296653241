"""Checkpoint layouts of an Ideogram 4 transformer, recognized from a file's header (names, dtypes, shapes, metadata).

| layout         | container            | what identifies it                                                        |
|----------------|----------------------|---------------------------------------------------------------------------|
| `official-fp8` | safetensors (shards) | F8_E4M3 weights, one fp32 scale per row (`weight_scale` [N] / [N, 1] / `scale_weight`) |
| `official-nf4` | safetensors          | bitsandbytes `weight.quant_state.bitsandbytes__nf4` + `weight.absmax` + `weight.quant_map` |
| `comfyui-fp8`  | safetensors          | ComfyUI `fp8_scaled`: `scaled_fp8` marker + `scale_weight`, or `comfy_quant` `float8_e4m3fn` markers |
| `comfyui-int8` | safetensors          | ComfyUI `comfy_quant` `int8_tensorwise` (optionally ConvRot) markers, int8 weights, `weight_scale` |
| `sdcpp-gguf`   | GGUF                 | fused names with `embed_image_indicator.weight` (stable-diffusion.cpp) or ComfyUI-GGUF's keys |

Every layout may use the official fused names or diffusers' split names, with or without a `model.diffusion_model.`
prefix; `read_checkpoint` + `detect` say which layout a file is in and `validate` refuses what no loader would read
(a partial prefix, fused and split names mixed, a scale without its weight or a quantized weight without its scale).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditq.errors import CheckpointError
from ditq.formats.keys import COMFY_PREFIXES, detect_layout, find_prefix

SCALE_SUFFIXES = ("weight_scale", "scale_weight")
NF4_STATE = ".weight.quant_state.bitsandbytes__nf4"
COMFY_MARKER = "comfy_quant"
QUANT_METADATA_KEY = "_quantization_metadata"
SCALED_FP8_MARKER = "scaled_fp8"
# Names stable-diffusion.cpp and ComfyUI-GGUF recognize an Ideogram 4 transformer by (after prefix stripping).
SDCPP_SIGNATURE = "embed_image_indicator.weight"
COMFYUI_GGUF_SIGNATURE = (
    "t_embedding.mlp_in.weight",
    "layers.0.attention.qkv.weight",
    "final_layer.linear.weight",
)
_NF4_EXTRA = re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..*)$")


@dataclass(frozen=True)
class TensorMeta:
    """One stored tensor: dtype as the container names it (safetensors `F8_E4M3`, GGML `Q4_K`), logical shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Checkpoint:
    """The header view of one transformer checkpoint (a file, or a folder of safetensors shards)."""

    path: Path
    container: str  # "safetensors" or "gguf"
    tensors: dict[str, TensorMeta]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return find_prefix(self.tensors)

    def bare(self) -> dict[str, TensorMeta]:
        """Tensors keyed by their names without the prefix."""
        p = self.prefix
        return {name[len(p) :]: meta for name, meta in self.tensors.items()}

    def quant_layers(self) -> dict[str, dict]:
        """`_quantization_metadata` layers (bare module name -> per-layer config), {} when absent."""
        raw = self.metadata.get(QUANT_METADATA_KEY)
        if not raw:
            return {}
        try:
            layers = json.loads(raw).get("layers", {})
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError(
                f"{self.path}: metadata {QUANT_METADATA_KEY} is not a JSON object"
            ) from None
        out = {}
        for name, conf in layers.items():
            conf = {"format": conf} if isinstance(conf, str) else conf
            for prefix in COMFY_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix) :]
            out[name] = conf if isinstance(conf, dict) else {}
        return out


def checkpoint_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint path: one file, or the safetensors / GGUF files of a component folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        return ggufs[:1]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors or .gguf file")
    return files


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Parse the header(s) of a safetensors file, sharded folder or GGUF file (no tensor data is read)."""
    path = Path(path)
    files = checkpoint_files(path)
    if files[0].suffix == ".gguf":
        from ditq.gguf import GGUFFile

        with GGUFFile(files[0]) as f:
            tensors = {n: TensorMeta(n, i.qtype.name, tuple(i.shape)) for n, i in f.tensors.items()}
            return Checkpoint(files[0], "gguf", tensors, dict(f.metadata))
    from ditq.io.safetensors_io import DTYPE_NAMES, TensorSource

    source = TensorSource(path)
    tensors = {}
    for name in source.keys():
        info = source.info(name)
        tensors[name] = TensorMeta(name, DTYPE_NAMES[info.dtype], tuple(info.shape))
    return Checkpoint(path, "safetensors", tensors, dict(source.metadata))


def parse_marker_bytes(raw: bytes, where: str) -> dict:
    try:
        conf = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: comfy_quant marker is not UTF-8 JSON ({exc})") from None
    if not isinstance(conf, dict):
        raise CheckpointError(f"{where}: comfy_quant marker is not a JSON object")
    return conf


def read_markers(ckpt: Checkpoint) -> dict[str, dict]:
    """{bare module name: comfy_quant config} from the per-layer marker tensors of a safetensors checkpoint."""
    markers = {n: m for n, m in ckpt.bare().items() if n.endswith("." + COMFY_MARKER)}
    if not markers:
        return {}
    from ditq.io.safetensors_io import TensorSource

    source = TensorSource(ckpt.path)
    prefix = ckpt.prefix
    out = {}
    for name in markers:
        raw = bytes(source.get(prefix + name).reshape(-1).tolist())
        out[name[: -len(COMFY_MARKER) - 1]] = parse_marker_bytes(raw, f"{ckpt.path}: {prefix + name}")
    return out


def comfy_configs(ckpt: Checkpoint) -> dict[str, dict]:
    """Per-layer ComfyUI quantization configs: `_quantization_metadata` first, per-layer markers override it."""
    return {**ckpt.quant_layers(), **read_markers(ckpt)}


# ---------------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout: `missing(ckpt)` lists what the file lacks to be in it (empty: it is)."""

    name: str
    format: str  # the ditq format the layout imports as
    description: str
    missing: Callable[[Checkpoint], list[str]]


def _weights(ckpt: Checkpoint, dtype: str) -> list[str]:
    return [n for n, m in ckpt.bare().items() if n.endswith(".weight") and m.dtype == dtype]


def _missing_official_fp8(ckpt: Checkpoint) -> list[str]:
    if ckpt.container != "safetensors":
        return ["not a safetensors file (it is GGUF)"]
    bare = ckpt.bare()
    fp8 = _weights(ckpt, "F8_E4M3")
    if not fp8:
        return ["no F8_E4M3 Linear weights"]
    out = []
    if SCALED_FP8_MARKER in bare or any(n.endswith("." + COMFY_MARKER) for n in bare):
        out.append("ComfyUI markers (scaled_fp8 / comfy_quant) present: that is comfyui-fp8")
    for w in fp8:
        module = w[: -len(".weight")]
        scale = next((bare[f"{module}.{s}"] for s in SCALE_SUFFIXES if f"{module}.{s}" in bare), None)
        if scale is not None and scale.numel == 1 and bare[w].shape[0] != 1:
            out.append(f"per-tensor scales ({module} has one): that is comfyui-fp8")
            break
    return out


def _missing_comfy_fp8(ckpt: Checkpoint) -> list[str]:
    if ckpt.container != "safetensors":
        return ["not a safetensors file (it is GGUF)"]
    bare = ckpt.bare()
    if not _weights(ckpt, "F8_E4M3"):
        return ["no F8_E4M3 Linear weights"]
    has_marker = SCALED_FP8_MARKER in bare
    fp8_layers = [n for n, c in ckpt.quant_layers().items() if c.get("format") == "float8_e4m3fn"]
    has_comfy = fp8_layers or any(n.endswith("." + COMFY_MARKER) for n in bare)
    if not (has_marker or has_comfy):
        return ["no `scaled_fp8` marker tensor and no comfy_quant `float8_e4m3fn` layer markers"]
    return []


def _missing_comfy_int8(ckpt: Checkpoint) -> list[str]:
    if ckpt.container != "safetensors":
        return ["not a safetensors file (it is GGUF)"]
    bare = ckpt.bare()
    if not _weights(ckpt, "I8"):
        return ["no I8 (int8) Linear weights"]
    layers = set(ckpt.quant_layers())
    markers = {n[: -len(COMFY_MARKER) - 1] for n in bare if n.endswith("." + COMFY_MARKER)}
    if not (layers | markers):
        return ["no comfy_quant markers and no _quantization_metadata entry for the int8 layers"]
    return []


def _missing_nf4(ckpt: Checkpoint) -> list[str]:
    if ckpt.container != "safetensors":
        return ["not a safetensors file (it is GGUF)"]
    if not any(n.endswith(NF4_STATE) for n in ckpt.bare()):
        return ["no bitsandbytes `weight.quant_state.bitsandbytes__nf4` tensors"]
    return []


def _missing_gguf(ckpt: Checkpoint) -> list[str]:
    if ckpt.container != "gguf":
        return ["not a GGUF file"]
    bare = ckpt.bare()
    arch = ckpt.metadata.get("general.architecture")
    if (
        SDCPP_SIGNATURE in bare
        or all(k in bare for k in COMFYUI_GGUF_SIGNATURE)
        or arch in ("ideogram", "ideogram4")
    ):
        return []
    return [
        f"no tensor {SDCPP_SIGNATURE} (stable-diffusion.cpp) and not all of {', '.join(COMFYUI_GGUF_SIGNATURE)} (ComfyUI-GGUF)"
    ]


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("sdcpp-gguf", "gguf", "GGUF: stable-diffusion.cpp / ComfyUI-GGUF / ditq", _missing_gguf),
        Layout(
            "comfyui-int8",
            "int8",
            "ComfyUI comfy_quant int8_tensorwise (ConvRot or not)",
            _missing_comfy_int8,
        ),
        Layout("comfyui-fp8", "fp8", "ComfyUI fp8_scaled (per-tensor FP8 scales)", _missing_comfy_fp8),
        Layout("official-nf4", "nf4", "bitsandbytes NF4 (ideogram-ai/ideogram-4-nf4)", _missing_nf4),
        Layout(
            "official-fp8",
            "fp8",
            "FP8 with per-row scales (ideogram-ai/ideogram-4-fp8)",
            _missing_official_fp8,
        ),
    )
}


def detect(ckpt: Checkpoint) -> Layout:
    """The first layout the checkpoint is in; otherwise a CheckpointError naming what each layout was missing."""
    tried = []
    for layout in LAYOUTS.values():
        missing = layout.missing(ckpt)
        if not missing:
            return layout
        tried.append(f"{layout.name}: {'; '.join(missing)}")
    weights: dict[str, int] = {}
    for name, meta in ckpt.bare().items():
        if name.endswith(".weight") and len(meta.shape) == 2:
            weights[meta.dtype] = weights.get(meta.dtype, 0) + 1
    found = (
        "weights: " + ", ".join(f"{n} {d}" for d, n in sorted(weights.items()))
        if weights
        else "no 2-D weights"
    )
    formats = set()
    if ckpt.container == "safetensors":
        formats = {str(c.get("format")) for c in comfy_configs(ckpt).values()}
    if formats:
        found += (
            f"; comfy_quant formats: {', '.join(sorted(formats))} (ditq reads int8_tensorwise, float8_e4m3fn)"
        )
    raise CheckpointError(
        f"{ckpt.path}: not an Ideogram 4 transformer in any layout ditq reads ({found}). Tried "
        + " | ".join(tried)
    )


def validate(ckpt: Checkpoint) -> None:
    """Refuse what no loader reads: a partial prefix, mixed fused/split names, orphan scales, unscaled weights."""
    bare = ckpt.bare()  # raises on a partial prefix
    detect_layout(bare)  # raises on fused + split names
    for name, meta in bare.items():
        module, _, leaf = name.rpartition(".")
        if leaf in SCALE_SUFFIXES and f"{module}.weight" not in bare:
            raise CheckpointError(f"{ckpt.path}: {name} has no weight {module}.weight to scale")
        if leaf == COMFY_MARKER and f"{module}.weight" not in bare:
            raise CheckpointError(f"{ckpt.path}: comfy_quant marker {name} has no weight {module}.weight")
        if _NF4_EXTRA.search(name):
            owner = name[: name.index(".weight.")]
            if f"{owner}.weight" not in bare:
                raise CheckpointError(f"{ckpt.path}: {name} has no packed weight {owner}.weight")
        if leaf == "weight" and meta.dtype in ("F8_E4M3", "I8"):
            if not any(f"{module}.{s}" in bare for s in SCALE_SUFFIXES):
                raise CheckpointError(
                    f"{ckpt.path}: {name} is {meta.dtype} but has no {module}.weight_scale (or scale_weight)"
                )
        if leaf == "weight" and meta.dtype == "U8" and ckpt.container == "safetensors":
            if f"{module}{NF4_STATE}" not in bare and f"{module}.{COMFY_MARKER}" not in bare:
                raise CheckpointError(
                    f"{ckpt.path}: {name} is packed U8 but has no {module}{NF4_STATE} quantization state"
                )
