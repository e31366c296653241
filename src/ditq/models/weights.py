"""Load a component's weights into a model built on the meta device, module by module.

Works for every on-disk layout ditq reads: plain float, FP8 with per-row scales, INT8 (ComfyUI `comfy_quant`),
NF4 (bitsandbytes serialization) and GGUF, with official fused or diffusers split attention keys, with or without a
`model.diffusion_model.` prefix. Each quantized Linear becomes the format's compute module; the weights stay
quantized in memory. Every tensor is checked against the model and its layout: name, shape, dtype and finiteness.

Dtypes are checked from the file's header before any tensor is converted: a header that says F16 where the layout
stores BF16 (or I8 where it stores F8_E4M3) keeps the sizes right and silently changes every number, so it is
refused with the file, the tensor and both dtypes named.

- A quantized Linear's own tensors (`weight`, `weight_scale`, `comfy_quant`, ...) have the exact dtypes its
  format declares (`LinearFormat.stored_dtypes`: E4M3 + fp32 scales for FP8, int8 + fp32 + uint8 for INT8, ...).
- Every other floating tensor of a component (norms, biases, embeddings, modulation, float Linears) is an
  unquantized tensor, and all of them share one dtype, the component's float dtype (`check_float_dtypes`). In a
  component that holds quantized layers, or one written by ditq (a `ditq.*` metadata entry), that dtype is
  bfloat16: the official FP8 and NF4 checkpoints, ComfyUI's repacks of them and every ditq writer store it so. In
  a plain float component (`save_pretrained` in float32, float16 or bfloat16) it is the dtype most of its float
  tensors have. GGUF files follow their own rule (`GGUFSource.check_float_dtypes`: small tensors F32). 1-byte
  floats are left to the FP8 checks (an E4M3 weight without its scale is refused as such).
- An integer tensor of the model (a buffer) has the model's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Protocol

import torch
from torch import nn

from ditq.errors import CheckpointError
from ditq.formats import load_all_formats
from ditq.formats.base import LINEAR_FORMATS, LinearFormat, all_extra_suffixes, detect_format, dtype_name
from ditq.formats.keys import detect_layout, fused_to_split, split_module_name, strip_prefix

log = logging.getLogger(__name__)


class Source(Protocol):
    """Named tensors. A source should also say a tensor's dtype without reading it, with `dtype(name)` (as
    `GGUFSource`) or `info(name).dtype` (as `TensorSource`), directly or through the source it wraps (`.source`);
    one that cannot has every tensor read once more up front to learn its dtype."""

    path: object

    def keys(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


def _inner_sources(source: Source):
    """`source` and the sources it wraps (`.source`), outermost first."""
    seen = 0
    while source is not None and seen < 8:
        yield source
        source, seen = getattr(source, "source", None), seen + 1


def stored_dtypes(source: Source, keys: list[str]) -> dict[str, torch.dtype]:
    """{key: dtype as stored} from the source's header (see `Source`)."""
    for s in _inner_sources(source):
        if callable(getattr(s, "dtype", None)):
            return {k: s.dtype(k) for k in keys}
        if callable(getattr(s, "info", None)):
            return {k: s.info(k).dtype for k in keys}
    log.debug("%s: no header dtypes; reading every tensor to learn them", source.path)
    return {k: source.get(k).dtype for k in keys}


def _file_of(source: Source, key: str) -> str:
    """The file that holds `key` (the shard, for a sharded folder), else the source's path."""
    for s in _inner_sources(source):
        info = getattr(s, "info", None)
        if callable(info) and not callable(getattr(s, "dtype", None)):
            file = getattr(info(key), "file", None)
            if file is not None:
                return str(file)
    return str(source.path)


def _written_by_ditq(source: Source) -> bool:
    for s in _inner_sources(source):
        metadata = getattr(s, "metadata", None)
        if isinstance(metadata, dict):
            return any(str(k).startswith("ditq.") for k in metadata)
    return False


def check_float_dtypes(
    source: Source,
    groups: dict[str, dict[str, str]],
    dtypes: dict[str, torch.dtype],
    expected: Collection[str],
) -> None:
    """Refuse an unquantized floating tensor whose dtype is not the component's float dtype (module docstring).

    `groups` is `group_by_module` of the stored keys ({module: {suffix: stored key}}), `dtypes` the header dtype
    of every stored key, `expected` the model's state-dict names: a tensor that is none of them is left to the
    loader, which refuses it as unexpected."""
    extras = all_extra_suffixes()
    floats: dict[str, torch.dtype] = {}
    quantized = False
    for module, group in groups.items():
        own = any(s in extras for s in group)
        quantized |= own
        for suffix, key in group.items():
            dtype = dtypes[key]
            if not dtype.is_floating_point or dtype.itemsize == 1:
                continue
            if (own and suffix != "bias") or suffix in extras:
                continue
            if any(f"{m}.{suffix}".lstrip(".") in expected for m in split_module_name(module)):
                floats[key] = dtype
    if not floats:
        return
    gguf_rule = getattr(source, "check_float_dtypes", None)
    if callable(gguf_rule):
        gguf_rule(list(floats))
        return
    values = list(floats.values())
    if quantized or _written_by_ditq(source):
        want = torch.bfloat16
        if any(d == torch.float8_e4m3fn for d in dtypes.values()):
            reason = "the official FP8 layout stores bfloat16 (BF16)"
        else:
            reason = (
                "a quantized or ditq-written checkpoint stores its unquantized tensors in bfloat16 (BF16)"
            )
    else:
        want = max(dict.fromkeys((torch.bfloat16, *values)), key=values.count)
        reason = (
            f"the other {values.count(want)} floating tensors of this component are {dtype_name(want)}, and a "
            "component stores its unquantized tensors in one dtype"
        )
    for key, dtype in floats.items():
        if dtype != want:
            raise CheckpointError(f"{_file_of(source, key)}: tensor {key} is {dtype_name(dtype)}; {reason}")


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


def _module_tensors(source: Source, group: dict[str, str]) -> dict[str, torch.Tensor]:
    """{suffix: tensor as stored} of one module (read, not converted: dtypes are checked before values)."""
    return {suffix: source.get(key) for suffix, key in group.items()}


def _refuse_unmatched(group: dict[str, str], dtypes: dict[str, torch.dtype], file: str) -> None:
    """A weight stored beside a format's tensors (a `weight_scale`, ...) that no format recognizes: its dtype is
    none that those formats store (an E4M3 weight relabelled E5M2 or F16). Named with the dtypes they use."""
    extras = set(group) - {"weight", "bias"}
    if not extras or "weight" not in group or not extras <= all_extra_suffixes():
        return
    fmts = [LINEAR_FORMATS.get(n) for n in LINEAR_FORMATS]
    fmts = [f for f in fmts if extras <= set(f.extra_suffixes) and "weight" in f.stored_dtypes]
    if not fmts:
        return
    wants = ", or ".join(
        f"{' or '.join(dtype_name(d) for d in f.stored_dtypes['weight'])} in {f.layout or f.name}"
        for f in fmts
    )
    raise CheckpointError(
        f"{file}: tensor {group['weight']} is {dtype_name(dtypes[group['weight']])}; a weight stored with "
        f"{', '.join(sorted(extras))} is {wants}"
    )


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
    dtypes = stored_dtypes(source, stored)
    expected = dict(model.state_dict(keep_vars=True))
    stored_groups = {m: {s: stored_names[k] for s, k in g.items()} for m, g in groups.items()}
    check_float_dtypes(source, stored_groups, dtypes, expected)
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    counts: dict[str, int] = {}

    for fused_name, group in groups.items():
        group = {s: stored_names[k] for s, k in group.items()}
        tensors = _module_tensors(source, group)
        fmt = detect_format(tensors)
        file = _file_of(source, group.get("weight", next(iter(group.values()))))
        if fmt is not None:
            fmt.check_dtypes({s: dtypes[k] for s, k in group.items()}, group, file)
        else:
            _refuse_unmatched(group, dtypes, file)
        for suffix, key in group.items():
            _check_finite(tensors[suffix], f"{where}: tensor {key!r}")
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
        if tensor.is_floating_point() != target.is_floating_point() or (
            not tensor.is_floating_point() and tensor.dtype != target.dtype
        ):
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
