"""Files written the way other tools write them, built from the documented layouts with the tools' own libraries
(safetensors, bitsandbytes, gguf-py) and never with ditq's writers, plus independent readers for the references.

Every builder starts from the float32 weights of the official FP8 tiny checkpoint (fused names), read with
`safetensors.torch.load_file` and dequantized by hand.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "model.diffusion_model."
EMBEDDINGS = ("embed_image_indicator.weight",)
SDCPP_RULE = re.compile(r"^layers\..*(adaln_modulation|attention\.o|attention\.qkv|feed_forward).*weight$")
# ComfyUI's int8 repacks keep the conditioning path (adaLN, timestep MLP) in high precision, as ditq does.
COMFY_KEEP = re.compile(r"(adaln_modulation|t_embedding|adaln_proj)")


def official_file(folder: Path, comp: str) -> Path:
    return folder / comp / "diffusion_pytorch_model.safetensors"


def float_state(fp8_file: Path) -> dict[str, torch.Tensor]:
    """Fused-name float32 weights of an official FP8 file: `weight.float() * weight_scale[:, None]`."""
    raw = load_file(fp8_file)
    out = {}
    for key, value in raw.items():
        if key.endswith(".weight_scale"):
            continue
        if value.dtype == torch.float8_e4m3fn:
            scale = raw[key[: -len("weight")] + "weight_scale"].double()
            value = value.double() * scale[:, None]
        out[key] = value.float()
    return out


def linear_weights(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if k.endswith(".weight") and v.ndim == 2 and k not in EMBEDDINGS]


def to_split(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers split names: qkv rows chunked into to_q/to_k/to_v, o renamed to_out.0 (per-row tensors split)."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^(layers\.\d+\.attention\.)qkv\.(.+)$", key)
        if m and value.ndim >= 1 and value.numel() > 1:
            for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{m.group(1)}to_{part}.{m.group(2)}"] = chunk.contiguous()
            continue
        out[key.replace(".attention.o.", ".attention.to_out.0.")] = value
    return out


# ----------------------------------------------------------------------------------------------- official


def write_sharded(src_file: Path, dst: Path, shards: int = 2) -> None:
    """The official FP8 file split into `shards` files with a `diffusion_pytorch_model.safetensors.index.json`."""
    raw = load_file(src_file)
    names = list(raw)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    per = math.ceil(len(names) / shards)
    for i in range(shards):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: raw[n] for n in names[i * per : (i + 1) * per]}
        save_file(part, dst / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in raw.values())},
        "weight_map": weight_map,
    }
    (dst / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


def write_fp8_variant(
    src_file: Path, dst_file: Path, scale_name: str, column: bool, split: bool, prefix: str
) -> None:
    """The official FP8 tensors with scales renamed / reshaped to [N, 1], split names, a prefix: bytes unchanged."""
    raw = load_file(src_file)
    out = {}
    for key, value in raw.items():
        if key.endswith(".weight_scale"):
            key = key[: -len("weight_scale")] + scale_name
            value = value.reshape(-1, 1) if column else value
        out[key] = value
    if split:
        out = to_split(out)
    dst_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in out.items()}, dst_file, metadata={"format": "pt"})


def write_official_nf4(state: dict[str, torch.Tensor], dst_file: Path) -> None:
    """bitsandbytes NF4 as `Linear4bit.state_dict()` serializes it: `quantize_4bit` + `QuantState.as_dict(packed=True)`."""
    from bitsandbytes.functional import quantize_4bit

    out = {}
    for key, value in state.items():
        if key in linear_weights(state) and value.shape[1] % 64 == 0:
            packed, qs = quantize_4bit(value.to(torch.bfloat16).contiguous(), blocksize=64, quant_type="nf4")
            out[key] = packed
            for k, v in qs.as_dict(packed=True).items():
                out[f"{key}.{k}"] = v
        else:
            out[key] = value.to(torch.bfloat16)
    dst_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, dst_file, metadata={"format": "pt"})


def nf4_reference(dst_file: Path) -> dict[str, torch.Tensor]:
    """The float weights an NF4 file holds, dequantized by bitsandbytes itself."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    raw = load_file(dst_file)
    out = {}
    for key, value in raw.items():
        if ".weight." in key:
            continue
        state = {k[len(key) + 1 :]: v for k, v in raw.items() if k.startswith(key + ".")}
        if state:
            qs = QuantState.from_dict(state, device=torch.device("cpu"))
            value = dequantize_4bit(value, qs)
        out[key] = value.float()
    return out


# ------------------------------------------------------------------------------------------------ ComfyUI


def _marker(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def write_comfy_fp8_scaled(state: dict[str, torch.Tensor], dst_file: Path, prefix: str = PREFIX) -> None:
    """ComfyUI's legacy `fp8_scaled`: per-tensor `scale_weight` (absmax / 448), `scale_input` 1, `scaled_fp8` marker."""
    out = {f"{prefix}scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    linears = set(linear_weights(state))
    for key, value in state.items():
        if key in linears:
            module = key[: -len(".weight")]
            scale = (value.abs().max() / 448.0).float()
            out[prefix + key] = (value / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[f"{prefix}{module}.scale_weight"] = scale.reshape(())
            out[f"{prefix}{module}.scale_input"] = torch.tensor(1.0)
        else:
            out[prefix + key] = value.to(torch.bfloat16)
    dst_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, dst_file)


def write_comfy_fp8_mixed(state: dict[str, torch.Tensor], dst_file: Path) -> None:
    """ComfyUI's current FP8 layout: `weight_scale` scalars, `comfy_quant` float8_e4m3fn markers and metadata."""
    out, layers = {}, {}
    linears = set(linear_weights(state))
    for key, value in state.items():
        if key in linears:
            module = key[: -len(".weight")]
            scale = (value.abs().max() / 448.0).float()
            out[key] = (value / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[f"{module}.weight_scale"] = scale.reshape(())
            out[f"{module}.comfy_quant"] = _marker({"format": "float8_e4m3fn"})
            layers[module] = {"format": "float8_e4m3fn"}
        else:
            out[key] = value.to(torch.bfloat16)
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    dst_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, dst_file, metadata=meta)


def fp8_per_tensor_reference(dst_file: Path) -> dict[str, torch.Tensor]:
    """Float weights of a ComfyUI FP8 file as ComfyUI dequantizes them: `weight.to(float) * scale`."""
    raw = load_file(dst_file)
    out = {}
    for key, value in raw.items():
        bare = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if (
            bare.endswith(("scale_weight", "weight_scale", "scale_input", "comfy_quant"))
            or bare == "scaled_fp8"
        ):
            continue
        if value.dtype == torch.float8_e4m3fn:
            module = key[: -len("weight")]
            scale = raw.get(module + "scale_weight", raw.get(module + "weight_scale"))
            value = value.double() * scale.double()
        out[bare] = value.float()
    return out


def regular_hadamard(size: int) -> np.ndarray:
    """H4 ⊗ ... ⊗ H4 / sqrt(size): the regular Hadamard matrix of comfy-kitchen and stable-diffusion.cpp."""
    h4 = np.array([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=np.float64)
    h = h4
    while h.shape[0] < size:
        h = np.kron(h, h4)
    return h / np.sqrt(size)


def write_comfy_int8(
    state: dict[str, torch.Tensor], dst_file: Path, convrot: bool, prefix: str = PREFIX, group: int = 256
) -> dict[str, dict]:
    """ComfyUI INT8 (`int8_tensorwise`, per-row [N, 1] scale, U8 JSON marker, metadata), optionally ConvRot: rows
    rotated by the block Hadamard before quantization where in_features is a multiple of `group`. Returns the
    per-layer configs."""
    out, layers = {}, {}
    h = torch.from_numpy(regular_hadamard(group))
    for key, value in state.items():
        module = key[: -len(".weight")]
        if key in linear_weights(state) and not COMFY_KEEP.search(key):
            w = value.double()
            conf = {"format": "int8_tensorwise"}
            n, k = w.shape
            if convrot and k % group == 0:
                w = (w.reshape(n, k // group, group) @ h.T).reshape(n, k)
                conf.update(convrot=True, convrot_groupsize=group)
            scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-30)
            out[prefix + key] = torch.round(w / scale).clamp(-128, 127).to(torch.int8)
            out[f"{prefix}{module}.weight_scale"] = scale.float()
            out[f"{prefix}{module}.comfy_quant"] = _marker(conf)
            layers[prefix + module] = conf
        else:
            out[prefix + key] = value.to(torch.bfloat16)
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    dst_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, dst_file, metadata=meta)
    return layers


def comfy_int8_reference(path: Path) -> dict[str, torch.Tensor]:
    """Float weights of a ComfyUI INT8 file read as ComfyUI reads it: prefix stripped when more than 5 keys carry it,
    markers parsed, `q * scale`, and ConvRot layers rotated back (W = W_rot H, H symmetric)."""
    raw = load_file(path)
    prefix = PREFIX if sum(k.startswith(PREFIX) for k in raw) > 5 else ""
    raw = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
    out = {}
    for key, value in raw.items():
        if key.endswith((".weight_scale", ".comfy_quant")):
            continue
        module = key[: -len(".weight")]
        if value.dtype == torch.int8:
            conf = json.loads(raw[module + ".comfy_quant"].numpy().tobytes())
            w = value.double() * raw[module + ".weight_scale"].double()
            if conf.get("convrot"):
                g = conf["convrot_groupsize"]
                n, k = w.shape
                w = (w.reshape(n, k // g, g) @ torch.from_numpy(regular_hadamard(g))).reshape(n, k)
            value = w
        out[key] = value.float()
    return out


# ---------------------------------------------------------------------------------------------------- GGUF


def write_sdcpp_gguf(state: dict[str, torch.Tensor], dst_file: Path, qtype: str = "Q8_0") -> None:
    """A GGUF file as stable-diffusion.cpp's `-M convert --tensor-type-rules` writes it from a bf16 checkpoint:
    no metadata, bare fused names, the rule's weights in `qtype`, every other tensor kept BF16."""
    import gguf

    from ditq.gguf import quantize

    dst_file.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(dst_file), arch="ideogram")
    writer.kv_data[0].clear()  # stable-diffusion.cpp writes no key/value metadata
    q = gguf.GGMLQuantizationType[qtype]
    for key, value in state.items():
        if SDCPP_RULE.match(key):
            data = quantize(value.numpy().astype(np.float32), q)
            writer.add_tensor(key, data, raw_dtype=q)
        else:
            data = value.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
            writer.add_tensor(key, data, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_reference(path: Path) -> dict[str, torch.Tensor]:
    """Float weights of a GGUF file decoded by gguf-py (the reference decoder), prefix stripped."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        name = t.name[len(PREFIX) :] if t.name.startswith(PREFIX) else t.name
        shape = tuple(int(d) for d in reversed(t.shape))
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[name] = torch.from_numpy(np.asarray(data, dtype=np.float32).reshape(shape))
    return out


# ---------------------------------------------------------------------------------------------- references


def transformer_from_state(model: torch.nn.Module, fused_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A float32 copy of `model` holding `fused_state` (split by hand into diffusers names)."""
    import copy

    ref = copy.deepcopy(model).float()
    missing, unexpected = ref.load_state_dict(
        to_split({k: v.float() for k, v in fused_state.items()}), strict=True
    )
    assert not missing and not unexpected
    return ref.eval()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ------------------------------------------------------------------------------------------ file surgery


def rewrite_gguf(src: Path, dst: Path, edit=None, arch: str | None = "keep") -> Path:
    """Copy a GGUF file with gguf-py, letting `edit({name: (data, qtype)})` change tensors; `arch` None drops all
    metadata, a string sets `general.architecture`, "keep" keeps the source's."""
    import gguf

    reader = gguf.GGUFReader(src)
    tensors = {t.name: (np.array(t.data), t.tensor_type) for t in reader.tensors}
    if edit is not None:
        edit(tensors)
    field = reader.get_field("general.architecture")
    source_arch = None if field is None else bytes(field.parts[field.data[-1]]).decode()
    writer = gguf.GGUFWriter(str(dst), arch=(source_arch if arch == "keep" else arch) or "none")
    if (source_arch if arch == "keep" else arch) is None:
        writer.kv_data[0].clear()
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def rewrite_safetensors(src: Path, dst: Path, edit=None, edit_metadata=None) -> Path:
    """Copy a safetensors file with `edit(tensors)` / `edit_metadata(metadata)` applied (metadata kept otherwise)."""
    from safetensors import safe_open

    with safe_open(src, framework="pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = load_file(src)
    if edit is not None:
        edit(tensors)
    if edit_metadata is not None:
        edit_metadata(metadata)
    save_file(tensors, dst, metadata=metadata)
    return dst
