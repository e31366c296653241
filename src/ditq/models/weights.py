"""Load a component's weights into a model built on the meta device, module by module.

Works for every on-disk layout ditq reads: plain float, FP8 with per-row scales, INT8 (ComfyUI `comfy_quant`),
NF4 (bitsandbytes serialization) and GGUF, with official fused or diffusers split attention keys, with or without a
`model.diffusion_model.` prefix. Each quantized Linear becomes the format's compute module; the weights stay
quantized in memory. Every tensor is checked against the model: name, shape, dtype class and finiteness.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from ditq.errors import CheckpointError
from ditq.formats import load_all_formats
from ditq.formats.base import LinearFormat, all_extra_suffixes, detect_format
from ditq.formats.keys import detect_layout, fused_to_split, strip_prefix

log = logging.getLogger(__name__)


class Source(Protocol):
    path: object

    def keys(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


def _suffixes() -> list[str]:
    return sorted({"weight", "bias", *all_extra_suffixes()}, key=len, reverse=True)


def group_by_module(names: list[str]) -> dict[str, dict[str, str]]:
    """{module name: {suffix: stored key}} using the longest known suffix of each key."""
    suffixes = _suffixes()
    groups: dict[str, dict[str, str]] = {}
    for key in names:
        name = strip_prefix(key)
        for s in suffixes:
            if name.endswith("." + s):
                groups.setdefault(name[: -len(s) - 1], {})[s] = key
                break
        else:
            # Tensors such as `pos_embed` or buffers with unusual names: the whole name is the parameter.
            module, _, leaf = name.rpartition(".")
            groups.setdefault(module, {})[leaf] = key
    return groups


def _check_finite(tensor: torch.Tensor, where: str) -> None:
    if tensor.is_floating_point() and tensor.numel():
        t = tensor.float() if tensor.element_size() == 1 else tensor
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{where}: {bad} non-finite value(s) (NaN or Inf); expected finite weights")


def _module_tensors(source: Source, group: dict[str, str], where: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for suffix, key in group.items():
        t = source.get(key)
        _check_finite(t, f"{where}: tensor {key!r}")
        tensors[suffix] = t
    return tensors


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def load_into(
    model: nn.Module,
    source: Source,
    compute_dtype: torch.dtype,
    device: torch.device | str = "cpu",
    module_prefix: str = "",
    linear_options: Mapping[str, object] | None = None,
) -> dict[str, int]:
    """Fill `model` (built under `init_empty_weights`) from `source`; returns {format name: module count}.

    `module_prefix` is stripped from stored keys (e.g. "model." for a text encoder saved with its wrapper).
    """
    load_all_formats()
    where = str(source.path)
    stored = source.keys()
    if module_prefix:
        stored_names = {k[len(module_prefix) :] if k.startswith(module_prefix) else k: k for k in stored}
    else:
        stored_names = {k: k for k in stored}
    layout = detect_layout(stored_names)
    groups = group_by_module(list(stored_names))
    expected = dict(model.state_dict(keep_vars=True))
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    counts: dict[str, int] = {}

    for fused_name, group in groups.items():
        group = {s: stored_names[k] for s, k in group.items()}
        tensors = _module_tensors(source, group, where)
        fmt = detect_format(tensors)
        if layout == "fused":
            slicer = None if fmt is None else (lambda suf, t, i, n, f=fmt: f.slice_rows(suf, t, i, n))
            parts = fused_to_split({f"{fused_name}.{s}": t for s, t in tensors.items()}, row_slicer=slicer)
            per_module: dict[str, dict[str, torch.Tensor]] = {}
            for full, t in parts.items():
                suffix = next(s for s in tensors if full.endswith("." + s))
                per_module.setdefault(full[: -len(suffix) - 1], {})[suffix] = t
        else:
            per_module = {fused_name: tensors}
        for name, module_tensors in per_module.items():
            _install(
                model,
                modules,
                expected,
                name,
                module_tensors,
                fmt,
                compute_dtype,
                device,
                where,
                loaded,
                linear_options or {},
            )
            counts[fmt.name if fmt else "float"] = counts.get(fmt.name if fmt else "float", 0) + 1

    missing = [k for k, v in expected.items() if k not in loaded and (v is None or v.device.type == "meta")]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing[:3])}{more}")
    return counts


def _install(
    model: nn.Module,
    modules: dict[str, nn.Module],
    expected: dict[str, torch.Tensor],
    name: str,
    tensors: dict[str, torch.Tensor],
    fmt: LinearFormat | None,
    compute_dtype: torch.dtype,
    device,
    where: str,
    loaded: set[str],
    linear_options: Mapping[str, object],
) -> None:
    module = modules.get(name)
    if module is None:
        first = next(iter(tensors))
        raise CheckpointError(
            f"{where}: unexpected tensor {name}.{first}: {type(model).__name__} has no module {name!r}"
        )
    if fmt is not None:
        if not isinstance(module, nn.Linear):
            raise CheckpointError(
                f"{where}: {name} is stored as {fmt.name} but is a {type(module).__name__}, not a Linear"
            )
        want = (module.out_features, module.in_features)
        got = tuple(fmt.weight_shape(tensors))
        if got != want:
            raise CheckpointError(
                f"{where}: {name}.weight is {list(got)} ({fmt.name}), expected {list(want)}"
            )
        if "bias" in tensors:
            _check_shape(where, f"{name}.bias", tensors["bias"], (module.out_features,))
        elif module.bias is not None:
            raise CheckpointError(f"{where}: missing tensor {name}.bias")
        new = fmt.build(tensors, compute_dtype, **linear_options.get(fmt.name, {})).to(device)
        _set_child(model, name, new)
        loaded.update(f"{name}.{p}" for p in ("weight", "bias"))
        return
    for suffix, tensor in tensors.items():
        full = f"{name}.{suffix}"
        target = expected.get(full)
        if target is None:
            raise CheckpointError(
                f"{where}: unexpected tensor {full!r}: not a parameter of {type(model).__name__}"
            )
        _check_shape(where, full, tensor, tuple(target.shape))
        if tensor.is_floating_point() != target.is_floating_point():
            raise CheckpointError(
                f"{where}: tensor {full!r} has dtype {tensor.dtype}, expected {target.dtype}"
            )
        if tensor.element_size() == 1 and tensor.is_floating_point():
            raise CheckpointError(
                f"{where}: tensor {full!r} is {tensor.dtype} without a weight_scale; expected a float weight"
            )
        value = tensor.to(device=device, dtype=compute_dtype if tensor.is_floating_point() else tensor.dtype)
        owner = model.get_submodule(name) if name else model
        if suffix in owner._parameters:
            owner._parameters[suffix] = nn.Parameter(value, requires_grad=False)
        elif suffix in owner._buffers:
            owner._buffers[suffix] = value
        else:
            raise CheckpointError(f"{where}: unexpected tensor {full!r}")
        loaded.add(full)


def _check_shape(where: str, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(
            f"{where}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}"
        )
