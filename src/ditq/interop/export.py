"""Export a ditq pipeline folder's transformers as the single files stable-diffusion.cpp and ComfyUI load.

| target    | source folder format      | output (per pipeline)                                                        |
|-----------|---------------------------|------------------------------------------------------------------------------|
| `sdcpp`   | GGUF (or any, `recipe=`)  | `<name>.gguf`, `<name>_unconditional.gguf`: bare fused names                 |
| `comfyui` | GGUF (or any, `recipe=`)  | the same GGUF files, optionally with the `model.diffusion_model.` prefix     |
| `comfyui` | INT8                      | `<name>.safetensors`, `<name>_unconditional.safetensors`: comfy_quant INT8,  |
|           |                           | `model.diffusion_model.` prefix unless `prefix=""`                           |
| `sdcpp`   | INT8                      | the same INT8 safetensors without prefix (stable-diffusion.cpp reads them)   |

Default names: `ideogram4-<recipe>` for GGUF (e.g. `ideogram4-q4_k.gguf`), `ideogram4_int8` for INT8. Tensors are
copied byte for byte (only names and the name-bearing metadata change), one tensor at a time. Every written file is
run through the loader-rule checker; `Export.violations` lists what failed (empty when all rules hold).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from ditq.errors import CheckpointError, ConfigError
from ditq.formats.keys import detect_layout, strip_prefix
from ditq.interop.checkers import Violation, check_gguf, check_int8
from ditq.interop.layouts import QUANT_METADATA_KEY, read_checkpoint

log = logging.getLogger(__name__)

TARGETS = ("sdcpp", "comfyui")
COMFY_PREFIX = "model.diffusion_model."
TRANSFORMERS = ("transformer", "unconditional_transformer")
SUFFIX = {"transformer": "", "unconditional_transformer": "_unconditional"}
_NUMPY = {
    GGUFValueType.UINT8: np.uint8,
    GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32,
    GGUFValueType.INT32: np.int32,
    GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT32: np.float32,
    GGUFValueType.FLOAT64: np.float64,
}


@dataclass
class Export:
    """What an export wrote: {component: file} and the loader-rule violations found in the files."""

    target: str
    files: dict[str, Path] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)


def _component_format(folder: Path) -> str:
    if any(folder.glob("*.gguf")):
        return "gguf"
    ckpt = read_checkpoint(folder)
    dtypes = {m.dtype for m in ckpt.tensors.values()}
    if "I8" in dtypes:
        return "int8"
    if "F8_E4M3" in dtypes:
        return "fp8"
    return "float"


def export(
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    target: str,
    name: str | None = None,
    prefix: str | None = None,
    recipe: str | None = None,
    config: dict | str | Path | None = None,
    check: bool = True,
    quantize_all: bool = False,
) -> Export:
    """Export both transformers of pipeline folder `model` for `target` ("sdcpp" or "comfyui") into `out_dir`.

    GGUF components are re-packed; with `recipe` (q8_0, q4_k, ...) FP8 / bf16 folders are encoded straight into
    the output files. INT8 components become ComfyUI comfy_quant files. A per-branch mix (`int8+q4_k`) exports each
    transformer in its own format (both tools take the unconditional file separately). `prefix` defaults to none
    for GGUF and for stable-diffusion.cpp, and to `model.diffusion_model.` for ComfyUI INT8; `config` is passed to
    the checker (default: each component's own config.json). `quantize_all` encodes (with `recipe`) and accepts
    quantized tensors outside stable-diffusion.cpp's Ideogram 4 rule; a copied GGUF made that way says so in its
    recipe.
    """
    from ditq.models.loading import check_folder, resolve_source

    if target not in TARGETS:
        raise ConfigError(f"--to {target!r}: expected one of {', '.join(TARGETS)}")
    folder = resolve_source(str(model))
    check_folder(folder)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    formats = {comp: _component_format(folder / comp) for comp in TRANSFORMERS}
    if recipe is not None and any(f in ("int8", "gguf") for f in formats.values()):
        raise ConfigError(f"{folder} is already quantized; --recipe encodes GGUF from an FP8 or bf16 folder")
    result = Export(target)
    for comp, fmt in formats.items():
        if fmt == "gguf" or recipe is not None:
            dst = _export_gguf(folder / comp, out_dir, comp, target, name, prefix, recipe, quantize_all)
            if check:
                loaders = ("sdcpp", "comfyui") if not prefix else ("comfyui",)
                made_all = quantize_all or _gguf_quantize_all(folder / comp, recipe)
                result.violations += check_gguf(dst, loaders, config or folder / comp, made_all)
        elif fmt == "int8":
            comp_prefix = prefix if prefix is not None else COMFY_PREFIX if target == "comfyui" else ""
            dst = out_dir / f"{name or 'ideogram4_int8'}{SUFFIX[comp]}.safetensors"
            copy_int8(folder / comp, dst, comp_prefix)
            if check:
                result.violations += check_int8(dst, ("comfyui", "sdcpp"), config or folder / comp)
        else:
            raise ConfigError(
                f"{folder}: {comp} is {fmt}; export needs a GGUF or INT8 folder, or --recipe to encode GGUF"
            )
        result.files[comp] = dst
    for v in result.violations:
        log.warning("%s", v)
    return result


def _export_gguf(component, out_dir, comp, target, name, prefix, recipe, quantize_all) -> Path:
    if target == "sdcpp" and prefix:
        raise ConfigError("stable-diffusion.cpp reads bare names; --prefix applies to ComfyUI targets only")
    made = _gguf_recipe(component) if recipe is None else {}
    base = name or f"ideogram4-{recipe or made.get('name', 'gguf')}"
    dst = out_dir / f"{base}{SUFFIX[comp]}.gguf"
    if recipe is None:
        copy_gguf(next(component.glob("*.gguf")), dst, prefix or "")
    else:
        encode_gguf(component, dst, recipe, prefix or "", quantize_all)
    return dst


def _gguf_quantize_all(component: Path, recipe: str | None) -> bool:
    """Whether a ditq GGUF file was made with every 2-D weight quantized (outside sd.cpp's rule)."""
    if recipe is not None:
        return False
    made = _gguf_recipe(component)
    return bool(made.get("quantize_all")) or made.get("tensors") == "all"


def _gguf_recipe(component: Path) -> dict:
    """The `ditq.recipe` metadata of a component's GGUF file ({} when absent)."""
    from ditq.gguf import GGUFFile

    with GGUFFile(next(component.glob("*.gguf"))) as f:
        raw = f.metadata.get("ditq.recipe")
    try:
        recipe = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    return recipe if isinstance(recipe, dict) else {}


def _metadata_value(value, vtype: GGUFValueType):
    if vtype in _NUMPY:
        return _NUMPY[vtype](value)
    return value


def copy_gguf(src: Path, dst: Path, prefix: str = "") -> Path:
    """Re-pack a GGUF file with `prefix + bare name` tensor names; data and metadata bytes unchanged otherwise."""
    from ditq.gguf import GGUFFile, GGUFStreamWriter, TensorSpec

    with GGUFFile(src) as f:
        names = list(f.tensors)
        if detect_layout(names) == "split":
            raise CheckpointError(f"{src}: diffusers split names; GGUF loaders need the official fused names")
        renamed = {n: prefix + strip_prefix(n) for n in names}
        specs = [TensorSpec(renamed[n], f.tensors[n].shape, f.tensors[n].qtype) for n in names]
        metadata = {k: _metadata_value(v, f.metadata_types[k]) for k, v in f.metadata.items()}
        # a copy of bytes made elsewhere: no ditq rule produced them, so none is recorded
        with GGUFStreamWriter(dst, specs, metadata, record_rule=False) as w:
            for n in names:
                w.write_raw(renamed[n], np.ascontiguousarray(f.raw(n)).reshape(-1))
    return dst


def encode_gguf(
    component: Path, dst: Path, recipe: str, prefix: str = "", quantize_all: bool = False
) -> Path:
    """Encode an FP8 / bf16 component folder straight into one GGUF file (the ditq GGUF recipe rules)."""
    from dataclasses import replace

    from ditq.errors import ConfigError
    from ditq.quant.recipes import GGUFRecipe, parse_recipe
    from ditq.quant.recipes.gguf import write_transformer_gguf

    spec = parse_recipe(recipe)
    if not isinstance(spec, GGUFRecipe):
        raise ConfigError(f"--recipe {recipe!r} is not a GGUF recipe (q8_0, q6_k, q5_k, q4_k, q4_k_m, ...)")
    if quantize_all:
        spec = replace(spec, tensors="all")
    target = dst if not prefix else dst.with_name(dst.name + ".bare")
    write_transformer_gguf(component, target, spec, progress=False)
    if prefix:
        copy_gguf(target, dst, prefix)
        target.unlink()
    return dst


def copy_int8(component: Path, dst: Path, prefix: str) -> Path:
    """Write a ComfyUI INT8 single file from an INT8 component folder, names and `_quantization_metadata` prefixed."""
    from ditq.io.safetensors_io import StreamingSafetensorsWriter, TensorSource

    source = TensorSource(component)
    names = list(source.keys())
    if detect_layout(names) == "split":
        raise CheckpointError(
            f"{component}: diffusers split names; ComfyUI's Ideogram 4 model uses fused names"
        )
    renamed = {n: prefix + strip_prefix(n) for n in names}
    specs = {renamed[n]: (source.info(n).dtype, tuple(source.info(n).shape)) for n in names}
    metadata = dict(source.metadata)
    if QUANT_METADATA_KEY in metadata:
        quant = json.loads(metadata[QUANT_METADATA_KEY])
        quant["layers"] = {prefix + strip_prefix(k): v for k, v in quant.get("layers", {}).items()}
        metadata[QUANT_METADATA_KEY] = json.dumps(quant)
    metadata.setdefault("format", "pt")
    with StreamingSafetensorsWriter(dst, specs, metadata) as w:
        for n in names:
            w.write(renamed[n], source.get(n))
    return dst
