"""stable-diffusion.cpp's and ComfyUI-GGUF's rules for one Ideogram 4 GGUF file (see `ditq.interop.checkers`)."""

from __future__ import annotations

from pathlib import Path

from ditq.errors import CheckpointError
from ditq.interop.checkers.common import (
    COMFYUI_GGUF,
    COMFYUI_GGUF_ARCH,
    COMFYUI_GGUF_TYPES,
    FLOAT_TYPES,
    SDCPP,
    SDCPP_RULE,
    SMALL_TENSOR,
    Violation,
    bare_name,
    check_names,
    check_shapes,
    expected_tensors,
)
from ditq.interop.layouts import COMFYUI_GGUF_SIGNATURE, SDCPP_SIGNATURE


def check_gguf(
    path: str | Path,
    loaders: tuple[str, ...] = ("sdcpp", "comfyui"),
    config: dict | str | Path | None = None,
    quantize_all: bool = False,
) -> list[Violation]:
    """Violations of stable-diffusion.cpp's (`sdcpp`) and ComfyUI-GGUF's (`comfyui`) rules by one GGUF file."""
    from ditq.gguf import GGUFFile

    names_of = {"sdcpp": SDCPP, "comfyui": COMFYUI_GGUF}
    who = [names_of[ld] for ld in loaders]
    try:
        with GGUFFile(path) as f:
            tensors = {n: (i.qtype.name, tuple(i.shape)) for n, i in f.tensors.items()}
            metadata = dict(f.metadata)
    except CheckpointError as exc:
        return [Violation(ld, "unreadable", str(exc)) for ld in who]
    out = _gguf_py_reads(path, len(tensors)) if COMFYUI_GGUF in who else []
    prefix, found = check_names(list(tensors), who, SDCPP in who)
    out += found
    bare = {bare_name(n): v for n, v in tensors.items()}
    out += _detection(tensors, bare, metadata, who)
    for name, (qtype, shape) in bare.items():
        out += _type_rules(prefix + name, name, qtype, shape, who, quantize_all)
    expected, _ = expected_tensors(config)
    return out + check_shapes({n: s for n, (_, s) in bare.items()}, expected, who)


def _gguf_py_reads(path, count: int) -> list[Violation]:
    """ComfyUI-GGUF reads files with gguf-py's reader: it must see the same tensors."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the loader fails
        return [Violation(COMFYUI_GGUF, "unreadable", f"gguf.GGUFReader fails: {exc}")]
    if len(reader.tensors) != count:
        return [Violation(COMFYUI_GGUF, "unreadable", "gguf.GGUFReader sees a different tensor count")]
    return []


def _detection(tensors: dict, bare: dict, metadata: dict, who: list[str]) -> list[Violation]:
    """How each loader recognizes an Ideogram 4 transformer: a tensor name, or the architecture key."""
    out = []
    if SDCPP in who and SDCPP_SIGNATURE not in tensors:
        msg = f"no tensor {SDCPP_SIGNATURE!r}: stable-diffusion.cpp detects Ideogram 4 by it"
        out.append(Violation(SDCPP, "detect", msg))
    if COMFYUI_GGUF not in who:
        return out
    arch = metadata.get("general.architecture")
    if arch in (None, "pig"):
        lacking = [k for k in COMFYUI_GGUF_SIGNATURE if k not in bare]
        if lacking:
            msg = f"no general.architecture and no {', '.join(lacking)}: the architecture cannot be detected"
            out.append(Violation(COMFYUI_GGUF, "detect", msg))
    elif arch != COMFYUI_GGUF_ARCH:
        msg = (
            f"general.architecture is {arch!r}; ComfyUI-GGUF's Ideogram 4 support reads {COMFYUI_GGUF_ARCH!r}"
        )
        out.append(Violation(COMFYUI_GGUF, "detect", msg))
    return out


def _type_rules(
    stored: str, name: str, qtype: str, shape, who: list[str], quantize_all: bool
) -> list[Violation]:
    """Which tensors may be block-quantized (sd.cpp's rule) and which types ComfyUI-GGUF decodes."""
    out = []
    numel = 1
    for d in shape:
        numel *= d
    if qtype not in FLOAT_TYPES and SDCPP in who and not quantize_all and not SDCPP_RULE.match(name):
        msg = f"{qtype}, but sd.cpp's Ideogram 4 rule keeps it float"
        out.append(Violation(SDCPP, "quantized-outside-rule", msg, stored))
    if COMFYUI_GGUF not in who:
        return out
    if qtype not in COMFYUI_GGUF_TYPES:
        out.append(Violation(COMFYUI_GGUF, "type", f"{qtype} is not a type ComfyUI-GGUF decodes", stored))
    if len(shape) == 1 and qtype != "F32":
        out.append(Violation(COMFYUI_GGUF, "f32", f"1-D tensor stored as {qtype}; expected F32", stored))
    elif numel <= SMALL_TENSOR and qtype != "F32":
        out.append(
            Violation(COMFYUI_GGUF, "f32", f"{numel} elements stored as {qtype}; expected F32", stored)
        )
    return out
