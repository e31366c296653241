"""Applying LoRAs to a pipeline or a model, changing their strengths, unloading them.

    applied = apply_lora(pipe, "style.safetensors", strength=0.8)     # both transformers, as the file says
    apply_loras(pipe, [parse_lora_spec("a.safetensors:0.5"), ...], strict=True)
    set_lora_strength(pipe, "style", 0.5)
    unload_lora(pipe, "style")   /   unload_lora(pipe)                 # one, or all
    applied_loras(pipe)                                                # {name: AppliedLora}

The target is an `Ideogram4Pipeline` (its `transformer` and `unconditional_transformer` each get the part of the
file named for them) or any `nn.Module` (it gets the part named by `branch`). Everything is checked before
anything changes: a file that does not fit leaves the model as it was.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ditq.errors import CheckpointError, ConfigError
from ditq.lora.adapters import KERNELS, BranchEntry, attach, branch_of, detach
from ditq.lora.files import LoraFile, read_lora
from ditq.lora.frames import LayerFrame, affected_layers, read_smoothing, smoothing_frames
from ditq.lora.names import BRANCHES, COND
from ditq.lora.spec import LoraSpec
from ditq.lora.targets import LayerFactor, linear_shapes, resolve

log = logging.getLogger(__name__)
_SHOWN = 8  # unknown keys named in a message before "and N more"


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA as applied: its name, file, strength, the layers it adapts per transformer, and the keys of the
    file that were not applied (with the reason)."""

    name: str
    source: str
    strength: float
    layers: Mapping[str, tuple[str, ...]]
    unknown: tuple[str, ...] = ()


_APPLIED: weakref.WeakKeyDictionary[nn.Module, dict[str, AppliedLora]] = weakref.WeakKeyDictionary()


def _models(target, branch: str) -> dict[str, nn.Module]:
    """{transformer name: model} of a pipeline, or {branch: target} for a bare model."""
    if isinstance(target, nn.Module):
        if branch not in BRANCHES:
            raise ConfigError(f"branch must be one of {BRANCHES}, got {branch!r}")
        return {branch: target}
    models = {b: getattr(target, b, None) for b in BRANCHES}
    models = {b: m for b, m in models.items() if isinstance(m, nn.Module)}
    if not models:
        raise ConfigError(f"{type(target).__name__} has no transformer to apply a LoRA to")
    return models


def _strength(value) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"LoRA strength must be a number, got {value!r}") from None
    if not math.isfinite(s):
        raise ConfigError(f"LoRA strength must be finite, got {value!r}")
    return s


def _list(keys: Sequence[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def recorded_frames(target, branch: str) -> dict[str, LayerFrame] | None:
    """Frames of a transformer loaded by `ditq.load_pipeline` from an INT8 folder with folded SmoothQuant,
    built from its record and the folder's `smoothing.safetensors`; None without folded groups or vectors."""
    from ditq.models.loading import pipeline_info

    info = pipeline_info(target, default=None) if not isinstance(target, nn.Module) else None
    groups = _recorded_groups(info, branch)
    if not groups or not affected_layers(groups) or info.folder is None:
        return None
    vectors = read_smoothing(info.folder, branch)
    return None if vectors is None else smoothing_frames(groups, vectors)


def _recorded_groups(info, branch: str) -> Mapping | None:
    return None if info is None else _record_groups(info.record, branch)


def _record_groups(record, branch: str) -> Mapping | None:
    """The INT8 recipe's smoothing groups of one transformer in a folder's record (`ditq.json`), if any."""
    if record is None:
        return None
    summary = record.summary.get(branch)
    recipe = summary.get("recipe") if isinstance(summary, Mapping) else None
    groups = recipe.get("groups") if isinstance(recipe, Mapping) else None
    return groups if isinstance(groups, Mapping) else None


def _check_frames(target, branch: str, layers, frames: Mapping[str, LayerFrame] | None) -> None:
    """Refuse a LoRA on layers a folded SmoothQuant moved into scaled coordinates when their frames are unknown."""
    from ditq.models.loading import pipeline_info

    if isinstance(target, nn.Module):
        return
    groups = _recorded_groups(pipeline_info(target, default=None), branch)
    moved = affected_layers(groups or {})
    blind = [n for n in layers if n in moved and (frames is None or n not in frames)]
    if blind:
        raise ConfigError(
            f"{branch} layer {blind[0]} is INT8 with SmoothQuant folded into its neighbours (group "
            f"{moved[blind[0]]}): it computes in smoothed coordinates, and the folder records no smoothing vectors "
            "to map the LoRA there. Merge the LoRA before quantizing (ditq.lora.merge_lora_folder, "
            "`ditq quantize --lora`), use an INT8 variant quantized with smoothquant=False, or pass frames="
        )


def check_folder_loras(folder: str | Path, specs: Sequence[LoraSpec], variant: str) -> None:
    """Refuse, before anything is loaded, LoRAs that `apply_loras` would refuse on the pipeline at `folder`: layers
    that a folded SmoothQuant moved into scaled coordinates, with no smoothing vectors recorded to map them."""
    from ditq.lora.targets import config_linear_shapes
    from ditq.models.loading import read_record

    folder = Path(folder)
    record = read_record(folder)
    for b in BRANCHES:
        groups = _record_groups(record, b)
        moved = affected_layers(groups or {})
        if not moved:
            continue
        vectors = read_smoothing(folder, b)
        frames = smoothing_frames(groups, vectors) if vectors is not None else {}
        shapes = config_linear_shapes(folder / b)
        for spec in specs:
            factors, _ = resolve(read_lora(spec.path, unprefixed=spec.unprefixed), b, shapes)
            blind = [n for n in sorted(factors) if n in moved and n not in frames]
            if blind:
                raise ConfigError(
                    f"variant {variant}: LoRA {spec.path} adapts {b} layer {blind[0]}, which is INT8 with "
                    f"SmoothQuant folded into its neighbours, and {folder} records no smoothing vectors to map "
                    "the LoRA there; leave the variant out, or merge the LoRA before quantizing "
                    "(`ditq quantize --lora`)"
                )


def _resolve_all(target, lora: LoraFile, branch: str, frames) -> tuple[dict, dict, list[str]]:
    models = _models(target, branch)
    resolved: dict[str, dict[str, LayerFactor]] = {}
    layer_frames: dict[str, Mapping[str, LayerFrame] | None] = {}
    unknown = [f"{k} ({why})" for k, why in lora.unknown]
    for b, model in models.items():
        factors, missing = resolve(lora, b, linear_shapes(model))
        unknown += [f"{k} (no such layer in the {b})" for k in missing]
        given = (frames or {}).get(b)
        layer_frames[b] = given if given is not None else recorded_frames(target, b)
        _check_frames(target, b, factors, layer_frames[b])
        resolved[b] = factors
    skipped = [b for b in lora.branches if b not in models]
    if skipped:
        log.info("%s: weights for %s not applied (the target has no such transformer)", lora.source, skipped)
    if not any(resolved.values()):
        raise CheckpointError(
            f"{lora.source}: no LoRA factor fits the {' / '.join(models)}"
            + (f"; keys not applied: {_list(unknown)}" if unknown else " (the file holds no LoRA factors)")
        )
    return models, {"factors": resolved, "frames": layer_frames}, unknown


def apply_lora(
    target,
    lora: str | Path | LoraFile | LoraSpec,
    strength: float = 1.0,
    *,
    name: str | None = None,
    strict: bool = False,
    branch: str = COND,
    unprefixed: str = "transformer",
    frames: Mapping[str, Mapping[str, LayerFrame]] | None = None,
) -> AppliedLora:
    """Add a LoRA as a low-rank branch beside every layer it names, in whatever format the layer is stored.

    `lora` is a path, a `LoraFile` or a `LoraSpec` (whose strength, name and unprefixed rule then apply).
    `strict=True` refuses a file with keys ditq does not apply (otherwise they are logged and listed in the
    result). `branch` picks the file's transformer for a bare-model target. `frames` ({transformer: {layer:
    LayerFrame}}) maps the LoRA into layers that compute in other coordinates (`ditq.lora.frames`).
    """
    if isinstance(lora, LoraSpec):
        strength, name, unprefixed = lora.strength, name or lora.name, lora.unprefixed
        lora = lora.path
    strength = _strength(strength)
    lora = read_lora(lora, unprefixed=unprefixed)
    label = name or lora.name
    models, plan, unknown = _resolve_all(target, lora, branch, frames)
    taken = [b for b, m in models.items() if label in _APPLIED.get(m, {})]
    if taken:
        raise ConfigError(
            f"a LoRA named {label!r} is already applied to the {taken[0]}; unload it or pass name="
        )
    if unknown and strict:
        raise CheckpointError(f"{lora.source}: {len(unknown)} key(s) not applied (strict): {_list(unknown)}")
    if unknown:
        log.warning("%s: %d key(s) not applied: %s", lora.source, len(unknown), _list(unknown))
    layers: dict[str, tuple[str, ...]] = {}
    for b, model in models.items():
        factors, layer_frames = plan["factors"][b], plan["frames"][b] or {}
        modules = dict(model.named_modules())
        for layer_name, factor in factors.items():
            layer = modules[layer_name]
            br = attach(layer, layer_frames.get(layer_name))
            br.entries[label] = BranchEntry(factor, strength)
            br.rebuild(layer)
        if factors:
            layers[b] = tuple(sorted(factors))
    applied = AppliedLora(label, lora.source, strength, layers, tuple(unknown))
    for b in layers:
        _APPLIED.setdefault(models[b], {})[label] = applied
    log.info("applied LoRA %s at %g: %s", label, strength, {b: len(v) for b, v in layers.items()})
    return applied


def apply_loras(target, specs: Sequence[LoraSpec | str], *, strict: bool = False) -> list[AppliedLora]:
    """`apply_lora` for each spec (a `LoraSpec` or a `PATH[:STRENGTH]` string), in order; on an error the ones
    applied by this call are unloaded again."""
    from ditq.lora.spec import parse_lora_spec

    done: list[AppliedLora] = []
    try:
        for spec in specs:
            spec = parse_lora_spec(spec) if isinstance(spec, str) else spec
            done.append(apply_lora(target, spec, strict=strict))
    except BaseException:
        for applied in reversed(done):
            unload_lora(target, applied.name)
        raise
    return done


def _each_branch(target, name: str | None):
    """(model, layer, branch) for every layer of the target carrying a branch with `name` (any with None)."""
    for model in _models(target, COND).values() if not isinstance(target, nn.Module) else [target]:
        for _, layer in list(model.named_modules()):
            br = branch_of(layer)
            if br is not None and (name is None or name in br.entries):
                yield model, layer, br


def applied_loras(target) -> dict[str, AppliedLora]:
    """{name: AppliedLora} of the LoRAs applied to a pipeline's transformers or to a model."""
    out: dict[str, AppliedLora] = {}
    models = [target] if isinstance(target, nn.Module) else list(_models(target, COND).values())
    for model in models:
        for label, applied in _APPLIED.get(model, {}).items():
            prev = out.get(label)
            out[label] = (
                applied
                if prev is None
                else AppliedLora(
                    label,
                    applied.source,
                    applied.strength,
                    {**prev.layers, **applied.layers},
                    applied.unknown,
                )
            )
    return out


def _known(target, name: str) -> None:
    names = applied_loras(target)
    if name not in names:
        raise ConfigError(f"no LoRA named {name!r} is applied; applied: {sorted(names) or 'none'}")


def set_lora_strength(target, name: str, strength: float) -> None:
    """Change an applied LoRA's strength (the fused factors of its layers are rebuilt)."""
    strength = _strength(strength)
    _known(target, name)
    for _, layer, br in _each_branch(target, name):
        br.entries[name].strength = strength
        br.rebuild(layer)
    models = [target] if isinstance(target, nn.Module) else list(_models(target, COND).values())
    for model in models:
        old = _APPLIED.get(model, {}).get(name)
        if old is not None:
            _APPLIED[model][name] = AppliedLora(old.name, old.source, strength, old.layers, old.unknown)


def unload_lora(target, name: str | None = None) -> None:
    """Remove one LoRA (`name`), or all of them; a layer left without LoRAs gets its hook and child removed,
    so it computes exactly as before any was applied."""
    if name is not None:
        _known(target, name)
    for _, layer, br in list(_each_branch(target, name)):
        if name is None:
            br.entries.clear()
        else:
            del br.entries[name]
        if br.entries:
            br.rebuild(layer)
        else:
            detach(layer)
    models = [target] if isinstance(target, nn.Module) else list(_models(target, COND).values())
    for model in models:
        registry = _APPLIED.get(model)
        if registry is None:
            continue
        if name is None:
            registry.clear()
        else:
            registry.pop(name, None)


def set_branch_kernel(target, kernel: str) -> int:
    """Run every LoRA branch of the target with `kernel` ("auto", "torch" or "numba"); returns how many."""
    if kernel not in KERNELS:
        raise ConfigError(f"LoRA branch kernel must be one of {KERNELS}, got {kernel!r}")
    branches = [br for _, _, br in _each_branch(target, None)]
    for br in branches:
        br.kernel = kernel
    return len(branches)
