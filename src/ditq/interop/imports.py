"""Import transformer checkpoints made by other tools into ditq pipeline folders.

`build_pipeline(src, base, out)` writes a complete `Ideogram4Pipeline` folder: the transformer weights from `src`
(and `uncond`), every other component (scheduler, tokenizer, text encoder, VAE, prompt-enhancer head) and the
transformer configs from `base` (e.g. the official FP8 folder), plus `ditq.json` saying where the weights came from.

What lands in `transformer/` per layout:
- `official-fp8`, `official-nf4`: the file(s) as they are (hard-linked where possible), shards and index included.
- `sdcpp-gguf`: the GGUF file as it is, named `diffusion_pytorch_model.gguf`.
- `comfyui-fp8`: rewritten losslessly into the official FP8 layout: the E4M3 bytes unchanged, each per-tensor
  scale repeated into a `weight_scale` [N], the `scaled_fp8` marker, `comfy_quant` markers and ComfyUI's activation
  scales (`scale_input` / `input_scale`, used by FP8 matmuls) dropped, prefix removed.
- `comfyui-int8`: rewritten losslessly: prefix removed, a `comfy_quant` marker for every int8 layer (taken from
  `_quantization_metadata` where the file has no per-layer marker). ConvRot layers keep their rotated weights and
  run with the rotation applied to activations (`ditq.formats.convrot`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from ditq._version import __version__
from ditq.errors import CheckpointError, ConfigError
from ditq.interop.layouts import (
    COMFY_MARKER,
    LAYOUTS,
    QUANT_METADATA_KEY,
    SCALE_SUFFIXES,
    SCALED_FP8_MARKER,
    Checkpoint,
    Layout,
    checkpoint_files,
    comfy_configs,
    detect,
    read_checkpoint,
    validate,
)
from ditq.io.files import link_or_copy, link_or_copy_tree, write_json_atomic
from ditq.models.record import RECORD_FILE, VariantRecord

log = logging.getLogger(__name__)

TRANSFORMERS = ("transformer", "unconditional_transformer")
WEIGHTS = "diffusion_pytorch_model"
ACTIVATION_SCALES = ("scale_input", "input_scale")
UNCOND_SUFFIXES = ("_unconditional", "_uncond")


@dataclass(frozen=True)
class Imported:
    """One imported transformer: the layout it was read as and the files written."""

    source: Path
    layout: str
    files: tuple[str, ...]
    dropped: tuple[str, ...] = ()


def inspect_source(src: str | os.PathLike, layout: str = "auto") -> tuple[Checkpoint, Layout]:
    """Read a checkpoint's header, check it and resolve its layout (`auto` detects it)."""
    ckpt = read_checkpoint(Path(src))
    validate(ckpt)
    if layout == "auto":
        return ckpt, detect(ckpt)
    if layout not in LAYOUTS:
        raise ConfigError(f"--from {layout!r}: unknown layout; known: auto, {', '.join(LAYOUTS)}")
    spec = LAYOUTS[layout]
    missing = spec.missing(ckpt)
    if missing:
        raise CheckpointError(f"{ckpt.path}: not in the {layout} layout: {'; '.join(missing)}")
    return ckpt, spec


def import_transformer(src: str | os.PathLike, dst: str | os.PathLike, layout: str = "auto") -> Imported:
    """Write the weights of one transformer checkpoint into component folder `dst` in a layout ditq loads."""
    ckpt, spec = inspect_source(src, layout)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if spec.name == "sdcpp-gguf":
        _check_gguf_types(ckpt)
        link_or_copy(ckpt.path, dst / f"{WEIGHTS}.gguf")
        return Imported(ckpt.path, spec.name, (f"{WEIGHTS}.gguf",))
    if spec.name in ("official-fp8", "official-nf4"):
        return Imported(ckpt.path, spec.name, _place_safetensors(Path(src), dst))
    if spec.name == "comfyui-fp8":
        return _rewrite_comfy_fp8(ckpt, dst / f"{WEIGHTS}.safetensors")
    return _rewrite_comfy_int8(ckpt, dst / f"{WEIGHTS}.safetensors")


def _place_safetensors(src: Path, dst: Path) -> tuple[str, ...]:
    if src.is_file():
        link_or_copy(src, dst / f"{WEIGHTS}.safetensors")
        return (f"{WEIGHTS}.safetensors",)
    files = checkpoint_files(src)
    names = []
    for index in src.glob("*.safetensors.index.json"):
        link_or_copy(index, dst / index.name)
        names.append(index.name)
    for f in files:
        link_or_copy(f, dst / f.name)
        names.append(f.name)
    return tuple(names)


def _check_gguf_types(ckpt: Checkpoint) -> None:
    from ditq.gguf import LOADABLE_TYPES

    decodable = {q.name for q in LOADABLE_TYPES}
    for name, meta in ckpt.tensors.items():
        if meta.dtype not in decodable:
            raise CheckpointError(
                f"{ckpt.path}: tensor {name!r} is {meta.dtype}; ditq decodes {', '.join(sorted(decodable))}"
            )


@dataclass(frozen=True)
class _Out:
    """One output tensor of a rewrite: read `source` (a stored name; None for a constant) and apply `make`."""

    source: str | None
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[torch.Tensor | None], torch.Tensor]


def _copied(ckpt: Checkpoint, stored: str) -> _Out:
    from ditq.io.safetensors_io import DTYPES

    meta = ckpt.tensors[stored]
    return _Out(stored, DTYPES[meta.dtype], meta.shape, lambda t: t)


def _constant(tensor: torch.Tensor) -> _Out:
    return _Out(None, tensor.dtype, tuple(tensor.shape), lambda _: tensor)


def _rewrite(ckpt: Checkpoint, out: Path, plan: dict[str, _Out], metadata: dict[str, str]) -> None:
    """Stream `plan` ({output name: _Out}) into safetensors file `out`, one tensor at a time."""
    from ditq.io.safetensors_io import StreamingSafetensorsWriter, TensorSource

    source = TensorSource(ckpt.path)
    specs = {name: (o.dtype, tuple(o.shape)) for name, o in plan.items()}
    with StreamingSafetensorsWriter(out, specs, metadata) as writer:
        for name, o in plan.items():
            writer.write(name, o.make(None if o.source is None else source.get(o.source)))


def _rewrite_comfy_fp8(ckpt: Checkpoint, out: Path) -> Imported:
    prefix = ckpt.prefix
    bare = ckpt.bare()
    configs = comfy_configs(ckpt)
    for module, conf in configs.items():
        if conf.get("format") not in ("float8_e4m3fn", None):
            raise CheckpointError(
                f"{ckpt.path}: layer {module} is marked {conf.get('format')!r}; the comfyui-fp8 layout holds "
                "float8_e4m3fn layers only"
            )
    plan: dict[str, _Out] = {}
    dropped = []
    for name, meta in bare.items():
        module, _, leaf = name.rpartition(".")
        if name == SCALED_FP8_MARKER or leaf == COMFY_MARKER or leaf in ACTIVATION_SCALES:
            dropped.append(prefix + name)
            continue
        if leaf not in SCALE_SUFFIXES:
            plan[name] = _copied(ckpt, prefix + name)
            continue
        rows = bare[f"{module}.weight"].shape[0]
        if meta.numel not in (1, rows):
            raise CheckpointError(
                f"{ckpt.path}: {prefix + name} has shape {list(meta.shape)}; expected a scalar or {rows} values"
            )
        # one scale per row: a per-tensor scale repeated, a [N, 1] one flattened
        plan[f"{module}.weight_scale"] = _Out(
            prefix + name,
            torch.float32,
            (rows,),
            lambda t, rows=rows: t.float().reshape(-1).expand(rows).clone(),
        )
    if dropped:
        log.info("%s: dropped %d ComfyUI marker / activation-scale tensors", ckpt.path, len(dropped))
    metadata = {
        "format": "pt",
        "ditq.imported_from": json.dumps({"layout": "comfyui-fp8", "file": ckpt.path.name}),
    }
    _rewrite(ckpt, out, plan, metadata)
    return Imported(ckpt.path, "comfyui-fp8", (out.name,), tuple(dropped))


def _rewrite_comfy_int8(ckpt: Checkpoint, out: Path) -> Imported:
    from ditq.formats.int8 import marker_tensor

    prefix = ckpt.prefix
    bare = ckpt.bare()
    configs = comfy_configs(ckpt)
    int8 = {n[: -len(".weight")] for n, m in bare.items() if n.endswith(".weight") and m.dtype == "I8"}
    for module in sorted(int8):
        conf = configs.get(module)
        if conf is None:
            raise CheckpointError(
                f"{ckpt.path}: {prefix}{module}.weight is int8 but has no comfy_quant marker and no "
                f"{QUANT_METADATA_KEY} entry; its scale and rotation are unknown"
            )
        if conf.get("format") != "int8_tensorwise":
            raise CheckpointError(
                f"{ckpt.path}: layer {module} is marked {conf.get('format')!r}; ditq reads int8_tensorwise"
            )
    plan: dict[str, _Out] = {}
    for name in bare:
        module, _, leaf = name.rpartition(".")
        if leaf == COMFY_MARKER:
            continue
        plan[name] = _copied(ckpt, prefix + name)
        if leaf == "weight" and module in int8:
            plan[f"{module}.{COMFY_MARKER}"] = _constant(marker_tensor(configs[module]))
    metadata = {
        k: v for k, v in ckpt.metadata.items() if k not in (QUANT_METADATA_KEY,) and isinstance(v, str)
    }
    metadata["ditq.imported_from"] = json.dumps({"layout": "comfyui-int8", "file": ckpt.path.name})
    metadata[QUANT_METADATA_KEY] = json.dumps(
        {"format_version": "1.0", "layers": {m: configs[m] for m in sorted(int8)}}
    )
    _rewrite(ckpt, out, plan, metadata)
    rotated = sorted(m for m in int8 if configs[m].get("convrot"))
    if rotated:
        log.info("%s: %d ConvRot layers run with rotated activations", ckpt.path, len(rotated))
    return Imported(ckpt.path, "comfyui-int8", (out.name,))


def unconditional_names(stem: str) -> list[str]:
    """Stems the unconditional twin of `stem` may have: ditq's `<stem>_unconditional`, `<stem>_uncond`, and the
    marker after the first word, as in stable-diffusion.cpp's `ideogram4_uncond-Q8_0` for `ideogram4-Q8_0` or
    `ideogram4_unconditional_fp8_scaled` for `ideogram4_fp8_scaled`."""
    names = [f"{stem}{suffix}" for suffix in UNCOND_SUFFIXES]
    for sep in ("-", "_"):
        if sep in stem:
            head, tail = stem.split(sep, 1)
            names += [f"{head}{suffix}{sep}{tail}" for suffix in UNCOND_SUFFIXES]
    return names


def find_unconditional(src: Path) -> Path | None:
    """The unconditional twin next to `src` (see `unconditional_names`), if exactly one exists."""
    found = [src.with_name(n + src.suffix) for n in unconditional_names(src.stem)]
    found = [p for p in dict.fromkeys(found) if p.exists() and p != src]
    if len(found) > 1:
        raise ConfigError(
            f"{src}: several unconditional twins ({', '.join(p.name for p in found)}); pass --uncond"
        )
    return found[0] if found else None


def build_pipeline(
    src: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    layout: str = "auto",
    uncond: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Write pipeline folder `out`: transformers from `src` / `uncond`, everything else from `base`.

    Without `uncond`, a twin named `<stem>_unconditional<ext>` next to `src` is used; failing that the base's
    unconditional transformer is kept (logged).
    """
    from ditq.models.loading import check_folder, resolve_source

    src, out = Path(src), Path(out)
    base_dir = resolve_source(str(base))
    index = check_folder(base_dir)
    if uncond is None:
        uncond = find_unconditional(src) if src.is_file() else None
    # Check both sources before writing anything.
    inspect_source(src, layout)
    if uncond is not None:
        inspect_source(uncond, layout)
    if out.exists():
        if not force:
            raise ConfigError(f"{out}: exists; choose a new output folder or pass --force")
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _link_base(base_dir, tmp)
        imported = {
            comp: _import_component(base_dir, tmp, comp, path, layout, out)
            for comp, path in (("transformer", src), ("unconditional_transformer", uncond))
        }
        write_json_atomic(tmp / RECORD_FILE, _import_record(src, base_dir, imported).to_json())
        missing = [c for c in index if not c.startswith("_") and not (tmp / c).exists()]
        if missing:
            raise CheckpointError(f"{base_dir}: components {missing} are listed but missing")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out)
    return out


def _link_base(base_dir: Path, tmp: Path) -> None:
    for item in sorted(base_dir.iterdir()):
        if item.name in (*TRANSFORMERS, RECORD_FILE) or item.name.startswith("."):
            continue
        if item.is_dir():
            link_or_copy_tree(item, tmp / item.name)
        else:
            link_or_copy(item, tmp / item.name)


def _import_component(base_dir: Path, tmp: Path, comp: str, path, layout: str, out: Path) -> Imported | None:
    (tmp / comp).mkdir()
    shutil.copy2(base_dir / comp / "config.json", tmp / comp / "config.json")
    if path is None:
        log.warning("%s: no unconditional transformer given; keeping the one of %s", out, base_dir)
        for f in (base_dir / comp).iterdir():
            if f.is_file() and f.name != "config.json":
                link_or_copy(f, tmp / comp / f.name)
        return None
    return import_transformer(path, tmp / comp, layout)


def _import_record(src: Path, base_dir: Path, imported: dict[str, Imported | None]) -> VariantRecord:
    base = VariantRecord.load(base_dir)
    formats = {}
    for comp, imp in imported.items():
        formats[comp] = LAYOUTS[imp.layout].format if imp else (base.formats.get(comp, "fp8") if base else "fp8")
    return VariantRecord(
        variant=imported["transformer"].layout,
        formats=formats,
        source=str(src),
        source_folder=str(base_dir),
        imported={
            comp: None if imp is None else {"source": str(imp.source), "layout": imp.layout, "files": list(imp.files)}
            for comp, imp in imported.items()
        },
        ditq_version=__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
