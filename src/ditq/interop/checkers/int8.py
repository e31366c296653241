"""ComfyUI's and stable-diffusion.cpp's rules for one ComfyUI INT8 (`comfy_quant`) file (see
`ditq.interop.checkers`)."""

from __future__ import annotations

import json
from pathlib import Path

from ditq.errors import CheckpointError
from ditq.formats.convrot import is_power_of_four
from ditq.formats.keys import fused_module_name
from ditq.interop.checkers.common import (
    COMFYUI,
    LOADER_NAMES,
    SDCPP,
    SDCPP_CONVROT_GROUP,
    SDCPP_MARKER_MAX_BYTES,
    Violation,
    bare_name,
    check_names,
    check_shapes,
    expected_tensors,
)
from ditq.interop.layouts import COMFY_MARKER, QUANT_METADATA_KEY


def _marker_rules(conf: dict, k: int, where: str) -> list[Violation]:
    out = []
    fmt = conf.get("format")
    if not isinstance(fmt, str):
        return [
            Violation(ld, "marker", "comfy_quant has no string 'format'", where) for ld in (COMFYUI, SDCPP)
        ]
    if fmt != "int8_tensorwise":
        return [
            Violation(ld, "marker", f"format {fmt!r} on an int8 weight", where) for ld in (COMFYUI, SDCPP)
        ]
    convrot = conf.get("convrot", False)
    if not isinstance(convrot, bool):
        out += [
            Violation(ld, "marker", f"convrot is {convrot!r}, not a boolean", where)
            for ld in (COMFYUI, SDCPP)
        ]
    elif convrot:
        size = conf.get("convrot_groupsize", 256)
        if not isinstance(size, int) or isinstance(size, bool) or not is_power_of_four(size) or k % size:
            msg = f"convrot_groupsize {size!r} must be a power of 4 dividing in_features {k}"
            out += [Violation(ld, "marker", msg, where) for ld in (COMFYUI, SDCPP)]
        elif size != SDCPP_CONVROT_GROUP or "convrot_groupsize" not in conf:
            out.append(
                Violation(
                    SDCPP, "marker", f"sd.cpp needs an explicit convrot_groupsize of 256, got {size}", where
                )
            )
    elif "convrot_groupsize" in conf:
        out.append(Violation(SDCPP, "marker", "declares convrot_groupsize without convrot", where))
    return out


def check_int8(
    path: str | Path,
    loaders: tuple[str, ...] = ("comfyui", "sdcpp"),
    config: dict | str | Path | None = None,
) -> list[Violation]:
    """Violations of ComfyUI's (`comfyui`) and stable-diffusion.cpp's (`sdcpp`) rules by a ComfyUI INT8 file."""
    from ditq.io.safetensors_io import DTYPE_NAMES, TensorSource

    who = [LOADER_NAMES[ld] for ld in loaders]
    try:
        source = TensorSource(path)
    except CheckpointError as exc:
        return [Violation(ld, "unreadable", str(exc)) for ld in who]
    meta = {n: (DTYPE_NAMES[source.info(n).dtype], tuple(source.info(n).shape)) for n in source.keys()}
    prefix, out = check_names(list(meta), who, False)
    bare = {bare_name(n): v for n, v in meta.items()}
    expected, linears = expected_tensors(config)
    layers, found = _quant_layers(source.metadata)
    out += found
    markers, found = _markers(source, bare, prefix, who)
    out += found
    out += _orphans(bare, markers, prefix, who)
    int8 = {n[: -len(".weight")] for n, (d, _) in bare.items() if n.endswith(".weight") and d == "I8"}
    for module in sorted(int8):
        out += _int8_weight(module, bare, linears, markers, layers, prefix, who)
    if COMFYUI in who:
        out += [
            Violation(COMFYUI, "metadata", f"{QUANT_METADATA_KEY} lists {m}, which is not int8")
            for m in sorted(set(layers) - int8)
        ]
    out += _recipe_agrees(source.metadata.get("ditq.recipe"), int8)
    logical = {n: s for n, (d, s) in bare.items() if not n.endswith(("." + COMFY_MARKER, ".weight_scale"))}
    return out + check_shapes(logical, expected, who)


def _quant_layers(metadata: dict) -> tuple[dict[str, dict], list[Violation]]:
    """The file's `_quantization_metadata` layers (bare names), and a violation when it is malformed."""
    raw = metadata.get(QUANT_METADATA_KEY)
    if not raw:
        return {}, []
    try:
        layers = {
            bare_name(k): ({"format": v} if isinstance(v, str) else v)
            for k, v in json.loads(raw)["layers"].items()
        }
        return layers, []
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return {}, [Violation(COMFYUI, "metadata", f"{QUANT_METADATA_KEY} is not {{'layers': {{...}}}} JSON")]


def _markers(source, bare: dict, prefix: str, who: list[str]) -> tuple[dict[str, dict], list[Violation]]:
    """{module: parsed comfy_quant marker} and the violations of the marker tensors themselves."""
    markers: dict[str, dict] = {}
    out: list[Violation] = []
    for name, (dtype, shape) in bare.items():
        module, _, leaf = name.rpartition(".")
        stored = prefix + name
        if leaf != COMFY_MARKER:
            continue
        if dtype != "U8" or len(shape) != 1:
            out += [
                Violation(ld, "marker", f"marker is {dtype} {list(shape)}; expected U8 [L]", stored)
                for ld in who
            ]
            continue
        if shape[0] > SDCPP_MARKER_MAX_BYTES and SDCPP in who:
            out.append(
                Violation(SDCPP, "marker", f"marker of {shape[0]} bytes; sd.cpp reads at most 4096", stored)
            )
        try:
            conf = json.loads(bytes(source.get(stored).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            out += [Violation(ld, "marker", f"not UTF-8 JSON ({exc})", stored) for ld in who]
            continue
        if not isinstance(conf, dict):
            out += [Violation(ld, "marker", "not a JSON object", stored) for ld in who]
            continue
        markers[module] = conf
        if f"{module}.weight" not in bare:
            out += [Violation(ld, "orphan", "marker without a weight", stored) for ld in who]
    return markers, out


def _orphans(bare: dict, markers: dict, prefix: str, who: list[str]) -> list[Violation]:
    """int8 tensors that are not weights, scales without a quantized weight, int8 markers on float weights."""
    out = []
    for name, (dtype, _) in bare.items():
        module, _, leaf = name.rpartition(".")
        if dtype == "I8" and leaf != "weight":
            out += [
                Violation(ld, "int8", "int8 tensor that is not a Linear weight", prefix + name) for ld in who
            ]
        weight = bare.get(f"{module}.weight")
        if leaf == "weight_scale" and (weight is None or weight[0] in ("BF16", "F16", "F32")):
            out += [
                Violation(ld, "orphan", "weight_scale without a quantized weight", prefix + name)
                for ld in who
            ]
        conf = markers.get(module) if leaf == COMFY_MARKER else None
        if conf and conf.get("format") == "int8_tensorwise" and weight is not None and weight[0] != "I8":
            msg = f"marked int8_tensorwise but the weight is {weight[0]}"
            out += [Violation(ld, "marker", msg, prefix + name) for ld in who]
    return out


def _int8_weight(module, bare, linears, markers, layers, prefix, who) -> list[Violation]:
    """The rules one int8 weight must satisfy: a Linear of the model, its scale, its marker or metadata entry."""
    stored = f"{prefix}{module}.weight"
    _, shape = bare[f"{module}.weight"]
    if module not in linears or len(shape) != 2:
        return [Violation(ld, "int8", "int8 weight of a module that is not a Linear", stored) for ld in who]
    n, k = shape
    out = _scale_rules(bare.get(f"{module}.weight_scale"), n, stored, who)
    marker, listed = markers.get(module), layers.get(module)
    if marker is None and SDCPP in who:
        out.append(Violation(SDCPP, "marker", "int8 weight without a per-layer comfy_quant marker", stored))
    if marker is None and listed is None and COMFYUI in who:
        out.append(
            Violation(COMFYUI, "marker", f"no comfy_quant marker and no {QUANT_METADATA_KEY} entry", stored)
        )
    if marker is not None and listed is not None and marker != listed and COMFYUI in who:
        msg = f"marker {marker} disagrees with {QUANT_METADATA_KEY} {listed}"
        out.append(Violation(COMFYUI, "metadata", msg, stored))
    conf = marker if marker is not None else listed
    if conf is not None:
        out += [v for v in _marker_rules(conf, k, stored) if v.loader in who]
    return out


def _scale_rules(scale, n: int, stored: str, who: list[str]) -> list[Violation]:
    if scale is None:
        return [Violation(ld, "scale", "int8 weight without weight_scale", stored) for ld in who]
    out = []
    s_dtype, s_shape = scale
    if s_dtype != "F32":
        out += [Violation(ld, "scale", f"weight_scale is {s_dtype}; expected F32", stored) for ld in who]
    if tuple(s_shape) != (n, 1):
        if COMFYUI in who and tuple(s_shape) not in ((), (1,)):
            out.append(
                Violation(COMFYUI, "scale", f"weight_scale {list(s_shape)}; expected [{n}, 1]", stored)
            )
        if SDCPP in who:
            out.append(
                Violation(SDCPP, "scale", f"weight_scale {list(s_shape)}; sd.cpp needs [{n}, 1]", stored)
            )
    return out


def _recipe_agrees(recipe: str | None, int8: set[str]) -> list[Violation]:
    """ditq's own recipe metadata (`ditq.recipe`) agrees with which weights are int8."""
    if not recipe:
        return []
    try:
        rec = json.loads(recipe)
    except json.JSONDecodeError:
        return [Violation("ditq", "recipe", "ditq.recipe metadata is not JSON")]
    out = []
    for module, reason in (rec.get("kept_float") or {}).items():
        if fused_module_name(module) in int8:
            out.append(
                Violation("ditq", "recipe", f"the recipe keeps it bf16 ({reason}) but it is int8", module)
            )
    if "quantized" in rec and set(rec["quantized"]) != int8:
        diff = sorted(set(rec["quantized"]) ^ int8)[:3]
        out.append(
            Violation("ditq", "recipe", f"the recipe's quantized list differs from the int8 weights ({diff})")
        )
    return out
