"""The coordinates a quantized layer computes in, when they are not those the LoRA was trained in.

SmoothQuant with the smoothing folded into a neighbour (`ditq.quant.int8.smoothquant`) moves layers into scaled
coordinates: the layers of a folded group receive x / s instead of x (and store W diag(s)), and the producer whose
rows absorbed 1/s (attention.to_v for attention.o, feed_forward.w3 for w2) returns its output divided by s. A LoRA
trained on the reference model adds scale · B A x there; in the layer's frame that is

    (A diag(input_scale)) (x / input_scale),  then multiplied by diag(1 / output_scale),

so the branch runs with A diag(input_scale) and diag(1 / output_scale) B (`LayerFrame`), folded into its fused
factors once, at no cost per call. Weight-only formats, ConvRot (the layer rotates its own input) and INT8 with the
smoothing applied inside the layer (`Int8Linear.smoothing`) compute in the reference coordinates: no frame.

`smoothing_frames(groups, vectors)` builds the frames of a transformer from its INT8 recipe's `groups` (in the
folder's `ditq.json`: `summary[<transformer>]["recipe"]["groups"]`, group name -> {"mode", "fold"}) and the
smoothing vector s [K] of each folded group. The group names are those of `ditq.quant.int8.smoothquant.smooth_groups`
(`layers.{i}.attention.qkv`, `layers.{i}.attention.o`, `layers.{i}.feed_forward.w1+w3`, `layers.{i}.feed_forward.w2`,
`llm_cond_proj`). `read_smoothing` reads them from `smoothing.safetensors` at the pipeline folder's top level,
which ditq's INT8 writer puts there (one float32 tensor s [K] per folded group, named `<transformer>.<group>`, e.g.
`transformer.layers.0.attention.qkv`). It is not inside the transformer folders, whose
every `*.safetensors` file the loader reads as weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ditq.errors import CheckpointError

SMOOTHING_FILE = "smoothing.safetensors"
_QKV = re.compile(r"^(layers\.\d+\.attention\.)qkv$")
_O = re.compile(r"^(layers\.\d+\.attention\.)o$")
_W13 = re.compile(r"^(layers\.\d+\.feed_forward\.)w1\+w3$")


@dataclass(frozen=True, eq=False)
class LayerFrame:
    """A layer receives x / input_scale [in_features] and returns its reference output / output_scale
    [out_features] (either None: 1)."""

    input_scale: torch.Tensor | None = None
    output_scale: torch.Tensor | None = None


def group_members(group: str) -> tuple[str, ...]:
    """The Linears (diffusers split names) of a smoothing group named as in the INT8 recipe."""
    if m := _QKV.match(group):
        return tuple(f"{m.group(1)}to_{p}" for p in "qkv")
    if m := _O.match(group):
        return (f"{m.group(1)}to_out.0",)
    if m := _W13.match(group):
        return (f"{m.group(1)}w1", f"{m.group(1)}w3")
    return (group,)


def folded_groups(groups: Mapping[str, Mapping]) -> dict[str, str]:
    """{group name: fold ("norm:<module>" or "rows:<producing Linear>")} of the groups stored folded."""
    return {
        name: str(g.get("fold") or "")
        for name, g in groups.items()
        if isinstance(g, Mapping) and g.get("mode") == "folded"
    }


def affected_layers(groups: Mapping[str, Mapping]) -> dict[str, str]:
    """{layer: folded group} of every Linear whose frame a folded group changes: its members, and the producer
    that absorbed 1/s into its rows."""
    out: dict[str, str] = {}
    for name, fold in folded_groups(groups).items():
        for member in group_members(name):
            out[member] = name
        kind, _, target = fold.partition(":")
        if kind == "rows" and target:
            out[target] = name
    return out


def smoothing_frames(
    groups: Mapping[str, Mapping], vectors: Mapping[str, torch.Tensor]
) -> dict[str, LayerFrame]:
    """{layer: LayerFrame} of a transformer from its folded groups and their smoothing vectors s [K]; the layers
    of a folded group without a vector get no frame (`ditq.lora.apply_lora` refuses a LoRA on them)."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    for name, fold in folded_groups(groups).items():
        if name not in vectors:
            continue
        s = vectors[name].detach().float().reshape(-1)
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            raise CheckpointError(f"smoothing vector of {name} holds values that are not finite and positive")
        for member in group_members(name):
            inputs[member] = s
        kind, _, target = fold.partition(":")
        if kind == "rows" and target:
            outputs[target] = s
    return {n: LayerFrame(inputs.get(n), outputs.get(n)) for n in sorted(set(inputs) | set(outputs))}


def read_smoothing(folder: str | Path, transformer: str) -> dict[str, torch.Tensor] | None:
    """{group: s} of one transformer from a pipeline folder's `smoothing.safetensors`, None when absent."""
    from ditq.io.safetensors_io import TensorSource

    path = Path(folder) / SMOOTHING_FILE
    if not path.is_file():
        return None
    src = TensorSource(path)
    try:
        prefix = transformer + "."
        found = {k[len(prefix) :]: src.get(k).float() for k in src.keys() if k.startswith(prefix)}
        return found or None
    finally:
        src.close()
