"""Loader-rule checkers: would stable-diffusion.cpp, ComfyUI-GGUF and ComfyUI load this Ideogram 4 file?

`check_gguf(path)` and `check_int8(path)` apply the rules those loaders document or enforce in code (docs/LAYOUTS.md
lists the sources and versions) and return a list of `Violation`s; an empty list means every rule holds. Shapes are
checked against an Ideogram 4 configuration: the official one (which stable-diffusion.cpp hard-codes) unless a
`config` (a dict, a `config.json` or a component folder) is given, e.g. for the tiny test model.

GGUF (one file per transformer):
- names: official fused names (`attention.qkv`, `attention.o`), not diffusers' split ones; no prefix for
  stable-diffusion.cpp; for ComfyUI-GGUF all names or none carry `model.diffusion_model.` (it keeps only prefixed
  tensors when any is prefixed).
- detection: stable-diffusion.cpp needs `embed_image_indicator.weight`; ComfyUI-GGUF reads `general.architecture`
  (`ideogram`) and, without it, needs `t_embedding.mlp_in.weight`, `layers.0.attention.qkv.weight` and
  `final_layer.linear.weight`.
- types: only the tensors of stable-diffusion.cpp's Ideogram 4 rule (`layers.*` adaLN modulation, qkv, o and
  feed-forward weights) block-quantized unless `quantize_all`; ComfyUI-GGUF decodes F32/F16/BF16, Q8_0, Q5_0/1,
  Q4_0/1 and Q2_K..Q6_K; 1-D tensors and tensors of at most 1024 elements F32.
- shapes: every tensor of the configuration present with its shape, nothing else.

ComfyUI INT8 safetensors (`comfy_quant`, `int8_tensorwise`):
- every int8 tensor is the 2-D weight of a Linear of the model, with a `weight_scale` F32 [N, 1] (ComfyUI also
  takes a scalar; stable-diffusion.cpp only [N, 1]) and a U8 `comfy_quant` JSON marker (stable-diffusion.cpp needs
  the per-layer marker; ComfyUI also takes the file's `_quantization_metadata`), whose `format` is
  `int8_tensorwise`; `convrot` is a boolean and, when true, `convrot_groupsize` a power of 4 dividing in_features
  (stable-diffusion.cpp: 256); a group size without `convrot` is refused by stable-diffusion.cpp.
- no marker or scale without its weight; markers and `_quantization_metadata` agree; the layers ditq's recipe
  metadata (`ditq.recipe`) keeps in bf16 are not int8 and the ones it quantizes are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ditq.errors import CheckpointError
from ditq.formats.convrot import is_power_of_four
from ditq.formats.keys import COMFY_PREFIXES, detect_layout, find_prefix, fused_module_name
from ditq.interop.layouts import COMFY_MARKER, COMFYUI_GGUF_SIGNATURE, QUANT_METADATA_KEY, SDCPP_SIGNATURE

SDCPP = "stable-diffusion.cpp"
COMFYUI_GGUF = "ComfyUI-GGUF"
COMFYUI = "ComfyUI"
LOADER_NAMES = {"sdcpp": SDCPP, "comfyui": COMFYUI}
# stable-diffusion.cpp's documented Ideogram 4 conversion (docs/ideogram4.md, --tensor-type-rules).
SDCPP_RULE = re.compile(r"^layers\..*(adaln_modulation|attention\.o|attention\.qkv|feed_forward).*weight$")
FLOAT_TYPES = ("F32", "F16", "BF16")
COMFYUI_GGUF_TYPES = (
    *FLOAT_TYPES,
    "Q8_0",
    "Q5_1",
    "Q5_0",
    "Q4_1",
    "Q4_0",
    "Q6_K",
    "Q5_K",
    "Q4_K",
    "Q3_K",
    "Q2_K",
)
COMFYUI_GGUF_ARCH = "ideogram"
SMALL_TENSOR = 1024  # ComfyUI-GGUF keeps tensors of at most this many elements in F32
SDCPP_MARKER_MAX_BYTES = 4096
SDCPP_CONVROT_GROUP = 256
COMFY_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class Violation:
    """One broken rule: which loader it concerns, a short rule id, the tensor (if any) and what is wrong."""

    loader: str
    rule: str
    message: str
    tensor: str | None = None

    def __str__(self) -> str:
        where = f" {self.tensor}:" if self.tensor else ""
        return f"[{self.loader}] {self.rule}:{where} {self.message}"


# ------------------------------------------------------------------------------------------- architecture


def load_config(config: dict | str | Path | None) -> dict:
    """A transformer config dict: given, read from `config.json` (or a folder holding it), or the official one."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    path = Path(config)
    path = path / "config.json" if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the transformer config ({exc})") from None


def expected_tensors(config: dict | str | Path | None = None) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """({fused tensor name: shape}, {fused Linear module names}) of the Ideogram 4 transformer `config` describes."""
    from accelerate import init_empty_weights
    from diffusers import Ideogram4Transformer2DModel
    from torch import nn

    cfg = {k: v for k, v in load_config(config).items() if not k.startswith("_")}
    cfg.pop("quantization_config", None)
    with init_empty_weights():
        model = Ideogram4Transformer2DModel.from_config(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, t in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        fused = f"{fused_module_name(module)}.{leaf}"
        if fused in shapes:  # k and v rows of the fused qkv projection
            rows, *rest = shapes[fused]
            shapes[fused] = (rows + t.shape[0], *rest)
        else:
            shapes[fused] = tuple(t.shape)
    linears = {fused_module_name(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return shapes, linears


def _check_shapes(
    logical: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], loaders: list[str]
) -> list[Violation]:
    out = []
    for name in sorted(set(expected) - set(logical)):
        out += [
            Violation(ld, "missing", f"missing tensor of shape {list(expected[name])}", name)
            for ld in loaders
        ]
    for name in sorted(set(logical) - set(expected)):
        out += [
            Violation(ld, "unexpected", "not a tensor of the Ideogram 4 transformer", name) for ld in loaders
        ]
    for name in sorted(set(logical) & set(expected)):
        if tuple(logical[name]) != tuple(expected[name]):
            msg = f"shape {list(logical[name])}, expected {list(expected[name])} for this configuration"
            out += [Violation(ld, "shape", msg, name) for ld in loaders]
    return out


def _names(names: list[str], loaders: list[str], sdcpp: bool) -> tuple[str, list[Violation]]:
    """Prefix and fused/split rules; returns (prefix, violations)."""
    out = []
    try:
        prefix = find_prefix(names)
    except CheckpointError as exc:
        prefix = ""
        out += [Violation(ld, "prefix", str(exc)) for ld in loaders]
    if sdcpp and prefix:
        out.append(
            Violation(SDCPP, "prefix", f"names carry {prefix!r}; stable-diffusion.cpp reads bare names")
        )
    if prefix and prefix != COMFY_PREFIX:
        msg = f"names carry {prefix!r}; ComfyUI strips only {COMFY_PREFIX!r}"
        out += [Violation(ld, "prefix", msg) for ld in loaders if ld in (COMFYUI, COMFYUI_GGUF)]
    try:
        if detect_layout(names) == "split":
            msg = "diffusers split names (attention.to_q/to_k/to_v/to_out.0); the loaders need attention.qkv / .o"
            out += [Violation(ld, "split-names", msg) for ld in loaders]
    except CheckpointError as exc:
        out += [Violation(ld, "split-names", str(exc)) for ld in loaders]
    return prefix, out


def _bare(name: str) -> str:
    for p in COMFY_PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


# --------------------------------------------------------------------------------------------------- GGUF


def check_gguf(
    path: str | Path,
    loaders: tuple[str, ...] = ("sdcpp", "comfyui"),
    config: dict | str | Path | None = None,
    quantize_all: bool = False,
) -> list[Violation]:
    """Violations of stable-diffusion.cpp's (`sdcpp`) and ComfyUI-GGUF's (`comfyui`) rules by one GGUF file."""
    import gguf

    from ditq.gguf import GGUFFile

    names_of = {"sdcpp": SDCPP, "comfyui": COMFYUI_GGUF}
    who = [names_of[ld] for ld in loaders]
    try:
        with GGUFFile(path) as f:
            tensors = {n: (i.qtype.name, tuple(i.shape)) for n, i in f.tensors.items()}
            metadata = dict(f.metadata)
    except CheckpointError as exc:
        return [Violation(ld, "unreadable", str(exc)) for ld in who]
    out: list[Violation] = []
    if COMFYUI_GGUF in who:
        try:
            reader = gguf.GGUFReader(path)
            if len(reader.tensors) != len(tensors):
                out.append(
                    Violation(COMFYUI_GGUF, "unreadable", "gguf.GGUFReader sees a different tensor count")
                )
        except Exception as exc:  # noqa: BLE001 - any reader failure means the loader fails
            out.append(Violation(COMFYUI_GGUF, "unreadable", f"gguf.GGUFReader fails: {exc}"))
    prefix, found = _names(list(tensors), who, SDCPP in who)
    out += found
    bare = {_bare(n): v for n, v in tensors.items()}
    if SDCPP in who and SDCPP_SIGNATURE not in tensors:
        out.append(
            Violation(
                SDCPP,
                "detect",
                f"no tensor {SDCPP_SIGNATURE!r}: stable-diffusion.cpp detects Ideogram 4 by it",
            )
        )
    if COMFYUI_GGUF in who:
        arch = metadata.get("general.architecture")
        if arch in (None, "pig"):
            lacking = [k for k in COMFYUI_GGUF_SIGNATURE if k not in bare]
            if lacking:
                out.append(
                    Violation(
                        COMFYUI_GGUF,
                        "detect",
                        f"no general.architecture and no {', '.join(lacking)}: the architecture cannot be detected",
                    )
                )
        elif arch != COMFYUI_GGUF_ARCH:
            out.append(
                Violation(
                    COMFYUI_GGUF,
                    "detect",
                    f"general.architecture is {arch!r}; ComfyUI-GGUF's Ideogram 4 support reads {COMFYUI_GGUF_ARCH!r}",
                )
            )
    for name, (qtype, shape) in bare.items():
        stored = prefix + name
        quantized = qtype not in FLOAT_TYPES
        numel = 1
        for d in shape:
            numel *= d
        if quantized and SDCPP in who and not quantize_all and not SDCPP_RULE.match(name):
            out.append(
                Violation(
                    SDCPP,
                    "quantized-outside-rule",
                    f"{qtype}, but sd.cpp's Ideogram 4 rule keeps it float",
                    stored,
                )
            )
        if COMFYUI_GGUF in who:
            if qtype not in COMFYUI_GGUF_TYPES:
                out.append(
                    Violation(COMFYUI_GGUF, "type", f"{qtype} is not a type ComfyUI-GGUF decodes", stored)
                )
            if len(shape) == 1 and qtype != "F32":
                out.append(
                    Violation(COMFYUI_GGUF, "f32", f"1-D tensor stored as {qtype}; expected F32", stored)
                )
            elif numel <= SMALL_TENSOR and qtype != "F32":
                out.append(
                    Violation(
                        COMFYUI_GGUF, "f32", f"{numel} elements stored as {qtype}; expected F32", stored
                    )
                )
    expected, _ = expected_tensors(config)
    out += _check_shapes({n: s for n, (_, s) in bare.items()}, expected, who)
    return out


# --------------------------------------------------------------------------------------------------- INT8


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
    prefix, out = _names(list(meta), who, False)
    bare = {_bare(n): v for n, v in meta.items()}
    expected, linears = expected_tensors(config)

    layers = {}
    raw_layers = source.metadata.get(QUANT_METADATA_KEY)
    if raw_layers:
        try:
            layers = {
                _bare(k): ({"format": v} if isinstance(v, str) else v)
                for k, v in json.loads(raw_layers)["layers"].items()
            }
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            out.append(
                Violation(COMFYUI, "metadata", f"{QUANT_METADATA_KEY} is not {{'layers': {{...}}}} JSON")
            )
    markers: dict[str, dict] = {}
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

    int8 = {n[: -len(".weight")] for n, (d, _) in bare.items() if n.endswith(".weight") and d == "I8"}
    for name, (dtype, _) in bare.items():
        module, _, leaf = name.rpartition(".")
        if dtype == "I8" and leaf != "weight":
            out += [
                Violation(ld, "int8", "int8 tensor that is not a Linear weight", prefix + name) for ld in who
            ]
        weight = bare.get(f"{module}.weight")
        if leaf == "weight_scale" and (weight is None or weight[0] in ("BF16", "F16", "F32")):
            msg = "weight_scale without a quantized weight"
            out += [Violation(ld, "orphan", msg, prefix + name) for ld in who]
        conf = markers.get(module) if leaf == COMFY_MARKER else None
        if conf and conf.get("format") == "int8_tensorwise" and weight is not None and weight[0] != "I8":
            msg = f"marked int8_tensorwise but the weight is {weight[0]}"
            out += [Violation(ld, "marker", msg, prefix + name) for ld in who]
    for module in sorted(int8):
        stored = f"{prefix}{module}.weight"
        dtype, shape = bare[f"{module}.weight"]
        if module not in linears or len(shape) != 2:
            out += [
                Violation(ld, "int8", "int8 weight of a module that is not a Linear", stored) for ld in who
            ]
            continue
        n, k = shape
        scale = bare.get(f"{module}.weight_scale")
        if scale is None:
            out += [Violation(ld, "scale", "int8 weight without weight_scale", stored) for ld in who]
        else:
            s_dtype, s_shape = scale
            if s_dtype != "F32":
                out += [
                    Violation(ld, "scale", f"weight_scale is {s_dtype}; expected F32", stored) for ld in who
                ]
            if tuple(s_shape) != (n, 1):
                if COMFYUI in who and tuple(s_shape) not in ((), (1,)):
                    out.append(
                        Violation(
                            COMFYUI, "scale", f"weight_scale {list(s_shape)}; expected [{n}, 1]", stored
                        )
                    )
                if SDCPP in who:
                    out.append(
                        Violation(
                            SDCPP, "scale", f"weight_scale {list(s_shape)}; sd.cpp needs [{n}, 1]", stored
                        )
                    )
        marker, listed = markers.get(module), layers.get(module)
        if marker is None and SDCPP in who:
            out.append(
                Violation(SDCPP, "marker", "int8 weight without a per-layer comfy_quant marker", stored)
            )
        if marker is None and listed is None and COMFYUI in who:
            out.append(
                Violation(
                    COMFYUI, "marker", f"no comfy_quant marker and no {QUANT_METADATA_KEY} entry", stored
                )
            )
        if marker is not None and listed is not None and marker != listed and COMFYUI in who:
            out.append(
                Violation(
                    COMFYUI,
                    "metadata",
                    f"marker {marker} disagrees with {QUANT_METADATA_KEY} {listed}",
                    stored,
                )
            )
        conf = marker if marker is not None else listed
        if conf is not None:
            out += [v for v in _marker_rules(conf, k, stored) if v.loader in who]
    for module in sorted(set(layers) - int8):
        if COMFYUI in who:
            out.append(
                Violation(COMFYUI, "metadata", f"{QUANT_METADATA_KEY} lists {module}, which is not int8")
            )

    recipe = source.metadata.get("ditq.recipe")
    if recipe:
        try:
            rec = json.loads(recipe)
        except json.JSONDecodeError:
            rec = {}
            out.append(Violation("ditq", "recipe", "ditq.recipe metadata is not JSON"))
        for module, reason in (rec.get("kept_float") or {}).items():
            if fused_module_name(module) in int8:
                out.append(
                    Violation("ditq", "recipe", f"the recipe keeps it bf16 ({reason}) but it is int8", module)
                )
        if "quantized" in rec and set(rec["quantized"]) != int8:
            diff = sorted(set(rec["quantized"]) ^ int8)[:3]
            out.append(
                Violation(
                    "ditq", "recipe", f"the recipe's quantized list differs from the int8 weights ({diff})"
                )
            )

    logical = {n: s for n, (d, s) in bare.items() if not n.endswith(("." + COMFY_MARKER, ".weight_scale"))}
    out += _check_shapes(logical, expected, who)
    return out


def check_file(
    path: str | Path,
    loaders: tuple[str, ...] = ("sdcpp", "comfyui"),
    config: dict | str | Path | None = None,
    quantize_all: bool = False,
) -> list[Violation]:
    """`check_gguf` for `.gguf` files, `check_int8` for safetensors."""
    if Path(path).suffix == ".gguf":
        return check_gguf(path, loaders, config, quantize_all)
    return check_int8(path, loaders, config)
