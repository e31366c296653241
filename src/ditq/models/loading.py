"""`load_pipeline(source)`: the Ideogram 4 pipeline from a hub id, a local folder, `tiny` or `full`.

- hub id (`ideogram-ai/ideogram-4-fp8`): resolved in the local Hugging Face cache first; downloaded only when the
  network allows it; otherwise a clear error.
- folder: a diffusers pipeline folder in any layout ditq reads (official FP8, ditq INT8 / GGUF / NF4, plain bf16).
- `tiny`: the built-in tiny random-weight pipeline, written once in the official FP8 layout to a cache folder and
  loaded through the same path as the real checkpoint.
- `full`: the full-size configuration on the `meta` device (shapes and bytes only; it cannot generate).
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ditq.errors import CheckpointError, ConfigError, ModelSourceError
from ditq.io.jsonfile import get_field, read_json
from ditq.io.safetensors_io import TensorSource
from ditq.models.folder_json import check_folder_json, library_errors, read_model_index
from ditq.models.record import VariantRecord
from ditq.models.weights import load_into

log = logging.getLogger(__name__)

TRANSFORMERS = ("transformer", "unconditional_transformer")
REQUIRED = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer", "unconditional_transformer")
OFFICIAL_FP8 = "ideogram-ai/ideogram-4-fp8"
# Bump when the tiny factory changes, so cached tiny folders are rebuilt.
TINY_BUILDER_VERSION = 2


@dataclass
class PipelineInfo:
    """What was loaded: where from, which layers of each component are in which format (module counts), the
    folder's `ditq.json` record, and the model's defaults (the tiny model's are small)."""

    source: str
    folder: Path | None
    formats: dict[str, dict[str, int]] = field(default_factory=dict)
    record: VariantRecord | None = None
    max_sequence_length: int = 2048
    default_size: int = 1024
    default_steps: int | None = None

    @property
    def variant(self) -> str:
        if self.record is not None:
            return self.record.variant
        fmts = {f for c in TRANSFORMERS for f in self.formats.get(c, {}) if f != "float"}
        return "+".join(sorted(fmts)) or "bf16"


_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ModelDefaults:
    """Sampling defaults of a model folder: the real model's, or the tiny model's from its `ditq_tiny.json`."""

    max_sequence_length: int = 2048
    default_size: int = 1024
    default_steps: int | None = None


def model_defaults(folder: Path) -> ModelDefaults:
    path = Path(folder) / "ditq_tiny.json"
    if not path.is_file():
        return ModelDefaults()
    tiny = read_json(path, "a tiny-model marker")
    where = str(path)
    steps = get_field(tiny, "default_steps", int, where, default=None)
    length = get_field(tiny, "max_sequence_length", int, where, default=2048)
    size = get_field(tiny, "default_size", int, where, default=1024)
    if length < 1 or size < 1 or (steps is not None and steps < 1):
        raise CheckpointError(f"{path}: max_sequence_length, default_size and default_steps must be >= 1")
    return ModelDefaults(length, size, steps)


def pipeline_info(pipe, default: PipelineInfo | None = None) -> PipelineInfo:
    """The `PipelineInfo` of a pipeline `load_pipeline` returned; for any other pipeline `default`, or a
    ConfigError when no default is given."""
    info = _INFO.get(pipe)
    if info is None and default is not None:
        return default
    if info is None:
        raise ConfigError(f"{type(pipe).__name__} was not loaded by ditq.load_pipeline: no ditq information")
    return info


def cache_dir() -> Path:
    return Path(os.environ.get("DITQ_CACHE", Path.home() / ".cache" / "ditq"))


def resolve_source(source: str) -> Path:
    """A local folder for `source` (folder path, hub id in the cache, or `tiny`)."""
    if source == "tiny":
        return ensure_tiny_folder()
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"{path}: expected a pipeline folder (with model_index.json), got a file")
        return path
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise ModelSourceError(f"model {source!r}: no such folder, and not a hub id of the form owner/name")
    return _from_hub(source)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as cached_exc:  # noqa: BLE001 - hub errors vary; all mean "not in the cache"
        log.debug("not in cache: %s", cached_exc)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelSourceError(
            f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"download it first (`hf download {repo_id}`) or pass a local folder"
        )
    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelSourceError(
            f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded ({reason}); "
            f"download it where the network allows (`hf download {repo_id}`) or pass a local folder"
        ) from None


def ensure_tiny_folder(seed: int = 0) -> Path:
    """The tiny pipeline in the official FP8 layout, written once under the ditq cache."""
    from ditq.models.official import save_official_fp8
    from ditq.models.tiny import build_tiny_pipeline

    folder = cache_dir() / f"tiny-fp8-seed{seed}"
    marker = folder / "ditq_tiny.json"
    if marker.is_file() and _tiny_builder(marker) == TINY_BUILDER_VERSION:
        return folder
    log.info("building the tiny pipeline in %s", folder)
    marker = {
        "builder": TINY_BUILDER_VERSION,
        "seed": seed,
        "max_sequence_length": 512,
        "default_size": 64,
        "default_steps": 8,
    }
    save_official_fp8(build_tiny_pipeline(seed=seed), folder, tiny_marker=marker)
    return folder


def _tiny_builder(marker: Path) -> object:
    """The builder version a cached tiny folder records; None for a marker that cannot be read (rebuilt)."""
    try:
        return read_json(marker, "a tiny-model marker").get("builder")
    except CheckpointError as exc:
        log.warning("%s; building the tiny pipeline again", exc)
        return None


def check_folder(folder: Path) -> dict:
    """`model_index.json` of a pipeline folder, after checking that every component is there and that every JSON
    file ditq or the libraries read from it (configs, tokenizer files, shard indexes, `ditq.json`,
    `ditq_tiny.json`) parses and has the expected shape; else ModelSourceError / CheckpointError naming it."""
    index = read_model_index(folder, REQUIRED)
    check_folder_json(folder, index)
    VariantRecord.load(folder)
    model_defaults(folder)
    return index


def _load_components(folder: Path, dtype, device, fp8_compute: str, parts: str, info: PipelineInfo) -> dict:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer

    options = {"fp8": {"compute": fp8_compute}}
    comps: dict = dict.fromkeys((*TRANSFORMERS, "text_encoder", "prompt_enhancer_head"))
    if parts != "encoder":
        for name in TRANSFORMERS:
            comps[name], info.formats[name] = load_transformer(folder / name, dtype, device, options)
    if parts != "denoiser":
        comps["text_encoder"], info.formats["text_encoder"] = load_text_encoder(
            folder / "text_encoder", dtype, device
        )
    with library_errors(folder / "vae", "the VAE"):
        vae = AutoencoderKLFlux2.from_pretrained(folder / "vae", torch_dtype=dtype)
    comps["vae"] = vae.to(device if parts != "encoder" else "cpu").eval()
    with library_errors(folder / "tokenizer", "the tokenizer", also=(Exception,)):
        comps["tokenizer"] = AutoTokenizer.from_pretrained(folder / "tokenizer")
    with library_errors(folder / "scheduler", "the scheduler"):
        comps["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    if parts == "all" and (folder / "prompt_enhancer_head").is_dir():
        from diffusers.pipelines.ideogram4.prompt_enhancer import Ideogram4PromptEnhancerHead

        with library_errors(folder / "prompt_enhancer_head", "the prompt enhancer head"):
            head = Ideogram4PromptEnhancerHead.from_pretrained(
                folder / "prompt_enhancer_head", torch_dtype=dtype
            )
        comps["prompt_enhancer_head"] = head.to(device).eval()
    return comps


def read_record(folder: Path) -> VariantRecord | None:
    """The folder's `ditq.json` record, None for a folder ditq did not write (the official FP8 checkpoint)."""
    return VariantRecord.load(folder)


def load_transformer(
    folder: Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    linear_options: dict | None = None,
):
    """One `Ideogram4Transformer2DModel` from a component folder in any layout ditq reads."""
    from accelerate import init_empty_weights
    from diffusers import Ideogram4Transformer2DModel

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"{folder}: no config.json")
    read_json(config_path, "a transformer config")
    with library_errors(folder, "the transformer config"), init_empty_weights():
        config = Ideogram4Transformer2DModel.load_config(folder)
        model = Ideogram4Transformer2DModel.from_config(config)
    source = open_weights(folder)
    counts = load_into(model, source, dtype, device, linear_options=linear_options)
    from ditq.formats.fused import fuse_int8_projections_

    fuse_int8_projections_(model)  # q/k/v and w1/w3 of INT8 layers: one quantization, one GEMM
    return model.eval(), counts


def open_weights(folder: Path):
    """A tensor source for a component folder: safetensors (single or sharded) or one GGUF file, never both (a
    stray file must not silently replace the weights the folder holds)."""
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) > 1:
        raise CheckpointError(
            f"{folder}: {len(ggufs)} GGUF files ({', '.join(p.name for p in ggufs)}); a component holds one"
        )
    if ggufs:
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        if others:
            raise CheckpointError(
                f"{folder}: both GGUF ({ggufs[0].name}) and safetensors weights ({', '.join(others)}); "
                "a component holds one format: remove the one that does not belong"
            )
        from ditq.formats.gguf import GGUFSource

        return GGUFSource(ggufs[0])
    return TensorSource(folder)


class _WithoutVision:
    """A tensor source without the vision tower's tensors (`visual.*`, with or without a `model.` prefix)."""

    def __init__(self, source) -> None:
        self.source, self.path = source, source.path
        self._keys = [k for k in source.keys() if not k.removeprefix("model.").startswith("visual.")]

    def keys(self) -> list[str]:
        return list(self._keys)

    def get(self, name: str) -> torch.Tensor:
        return self.source.get(name)


def load_text_encoder(folder: Path, dtype: torch.dtype, device):
    """The Qwen3-VL text encoder; FP8 weight-only checkpoints load through ditq's module-by-module path.

    Only the language model is loaded: the pipeline reads the hidden states of its decoder layers and never runs the
    vision tower (0.58 GB of Qwen3-VL-8B's 8.78 GB in FP8), so `visual` is dropped before loading and its tensors
    are never read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, Qwen3VLModel

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"{folder}: no config.json")
    raw = read_json(config_path, "the text encoder config")
    with library_errors(folder, "the text encoder config"), init_empty_weights():
        config = AutoConfig.from_pretrained(folder)
        model = Qwen3VLModel._from_config(config)
    del model.visual
    source = _WithoutVision(TensorSource(folder))
    prefix = "model." if any(k.startswith("model.language_model.") for k in source.keys()) else ""
    counts = load_into(model, source, dtype, device, module_prefix=prefix)
    if raw.get("ideogram_fp8_weight_only") and "fp8" not in counts:
        log.warning("%s: config says FP8 weight-only but no FP8 weights were found", folder)
    return model.eval(), counts


PARTS = ("all", "encoder", "denoiser")


def load_pipeline(
    source: str | os.PathLike = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    fp8_compute: str = "dequant",
    compile: bool = False,
    attention: str = "sdpa",
    parts: str = "all",
):
    """Load an `Ideogram4Pipeline` (a plain diffusers pipeline); `pipeline_info(pipe)` says what was loaded.

    `compile` applies `torch.compile` to both transformers; `attention` is "sdpa" or "int8" (comfy-kitchen's INT8
    attention, CUDA). `parts` loads all components, only what encodes prompts ("encoder": text encoder, tokenizer;
    the VAE's config on the CPU), or only what denoises and decodes ("denoiser": no text encoder; generation then
    takes conditionings encoded earlier), for the offload policies that keep the two off the device together."""
    source = str(source)
    if source == "full":
        raise ModelSourceError(
            "'full' is the meta-device model for sizes only (ditq inspect full); it cannot run"
        )
    if parts not in PARTS:
        raise ConfigError(f"parts must be one of {PARTS}, got {parts!r}")
    folder = resolve_source(source)
    check_folder(folder)
    info = PipelineInfo(source=source, folder=folder, record=read_record(folder))
    comps = _load_components(folder, dtype, device, fp8_compute, parts, info)
    from diffusers import Ideogram4Pipeline

    pipe = Ideogram4Pipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    if attention != "sdpa" and parts != "encoder":
        from ditq.models.attention import set_attention

        set_attention(pipe, attention)
    if compile and parts != "encoder":
        from ditq.models.execution import compile_transformers

        compile_transformers(pipe)
    defaults = model_defaults(folder)
    info.max_sequence_length = defaults.max_sequence_length
    info.default_size, info.default_steps = defaults.default_size, defaults.default_steps
    _INFO[pipe] = info
    return pipe
