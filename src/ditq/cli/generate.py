"""`ditq generate`: images from one prompt or a prompts file, with settings recorded in PNG text chunks."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ditq.errors import ConfigError


def add_common_model_args(p) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' (default), a pipeline folder or a hub id")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1 ...")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="compute dtype (default bf16)")
    add_execution_args(p)
    add_lora_args(p)


def add_execution_args(p, offload: bool = True) -> None:
    """--fp8-compute, --compile, --attention and (with `offload`) --offload: how a pipeline runs."""
    from ditq.names import OFFLOAD

    p.add_argument(
        "--fp8-compute",
        default="dequant",
        choices=("dequant", "scaled_mm"),
        help="FP8 layers: dequantize per layer (default, any GPU) or torch._scaled_mm (FP8 tensor cores, sm_89+)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile both transformers (the first step pays the compile)",
    )
    p.add_argument(
        "--attention",
        default="sdpa",
        choices=("sdpa", "int8"),
        help="attention kernel: sdpa (default) or int8 (comfy-kitchen's INT8 attention, CUDA)",
    )
    if offload:
        add_offload_arg(p, OFFLOAD, "auto")


def add_offload_arg(p, choices, default: str) -> None:
    p.add_argument(
        "--offload",
        default=default,
        choices=choices,
        help=f"where components live while generating (default {default}): none (all on the device), encoder "
        "(encode every prompt first, then free the text encoder), group (also stream the transformers block by "
        "block), model / sequential (diffusers' CPU offload), auto (the fastest policy the planner says fits the "
        "device; none on a CPU). Images are the same under every policy",
    )


def add_lora_args(p) -> None:
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:STRENGTH]",
        help="apply a LoRA (.safetensors: diffusers/peft, kohya, ComfyUI layouts) beside every variant's layers at "
        "STRENGTH (default 1.0); repeatable",
    )
    p.add_argument(
        "--lora-strict", action="store_true", help="refuse a LoRA file with keys ditq does not apply"
    )


def execution_from_args(args):
    """`ExecutionOptions` from the flags of `add_common_model_args` / `add_execution_args`."""
    from ditq.models.execution import ExecutionOptions

    return ExecutionOptions(
        device=str(args.device),
        dtype=args.dtype,
        fp8_compute=getattr(args, "fp8_compute", "dequant"),
        compile=bool(getattr(args, "compile", False)),
        attention=getattr(args, "attention", "sdpa"),
        offload=getattr(args, "offload", "none"),
    )


def loras_from_args(args) -> tuple:
    """The `--lora PATH[:STRENGTH]` flags as `LoraSpec`s (files checked now, before any model is loaded)."""
    from ditq.lora.spec import parse_lora_arg

    specs = tuple(parse_lora_arg(text) for text in getattr(args, "lora", None) or [])
    names = [s.label for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--lora: two LoRAs named {twice[0]!r} (files with the same stem); rename one")
    return specs


def add_sampling_args(p) -> None:
    p.add_argument(
        "--preset", default="default20", help="sampler preset: quality48, default20 (default), turbo12"
    )
    p.add_argument(
        "--steps", type=int, help="number of steps (overrides the preset; the tiny model defaults to 8)"
    )
    p.add_argument(
        "--guidance", help="guidance: a number, or a schedule like '18x7,2x3' (overrides the preset)"
    )
    p.add_argument("--height", type=int, help="image height (default: 1024; 64 for the tiny model)")
    p.add_argument("--width", type=int, help="image width (default: 1024; 64 for the tiny model)")
    p.add_argument("--mu", type=float, help="logit-normal schedule mean (overrides the preset)")
    p.add_argument("--std", type=float, help="logit-normal schedule std (overrides the preset)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate images", description=__doc__)
    add_common_model_args(p)
    add_sampling_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (a raw string or a JSON caption)")
    src.add_argument(
        "--prompts", type=Path, help="a .txt file (one prompt per line) or .jsonl (caption/prompt field)"
    )
    p.add_argument(
        "--raw",
        action="store_true",
        help="use each prompt as raw text; without it, a prompt that starts with '{' must be a caption that "
        "follows the official rules (ditq captions rules)",
    )
    p.add_argument("--seed", default="0", help="seed, or comma-separated seeds (default 0)")
    p.add_argument("-o", "--output", type=Path, default=Path("out"), help="output folder (default ./out)")
    p.add_argument("--force", action="store_true", help="replace images already in the output folder")
    p.set_defaults(func=run)


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def settings_from_args(args, info):
    """Sampling settings from the CLI flags over a model's defaults (`PipelineInfo` or `ModelDefaults`)."""
    from ditq.models.sampling import SamplingSettings, parse_guidance

    overrides = {
        "height": args.height or info.default_size,
        "width": args.width or info.default_size,
        "max_sequence_length": info.max_sequence_length,
    }
    base = SamplingSettings.from_preset(args.preset, **overrides)
    steps = args.steps or getattr(info, "default_steps", None) or base.steps
    if args.guidance:
        schedule = tuple(parse_guidance(args.guidance, steps))
    elif steps != base.steps:
        # keep the preset's shape: the last ~10% of the steps at the low guidance
        low = (
            max(1, round(steps * sum(g < 7 for g in base.guidance_schedule) / base.steps)) if steps > 1 else 0
        )
        schedule = (7.0,) * (steps - low) + (3.0,) * low
    else:
        schedule = base.guidance_schedule
    return SamplingSettings(
        height=overrides["height"],
        width=overrides["width"],
        steps=steps,
        guidance_schedule=schedule,
        mu=base.mu if args.mu is None else args.mu,
        std=base.std if args.std is None else args.std,
        max_sequence_length=overrides["max_sequence_length"],
    )


def read_prompts(path: Path, flag: str = "--prompts") -> list[str]:
    """Prompts from a .txt file (one per line) or a .jsonl file (see `read_jsonl_prompts`)."""
    from ditq.io.jsonfile import read_bytes

    if path.suffix == ".jsonl":
        return read_jsonl_prompts(path, flag)
    raw = read_bytes(path, f"{flag} file", ConfigError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}); expected one prompt per line"
        ) from None
    return [line for line in text.splitlines() if line.strip()]


def read_jsonl_prompts(path: Path, flag: str) -> list[str]:
    """Each line an object with a `caption` (text, or a JSON object) or a `prompt`."""
    from ditq.io.jsonfile import read_jsonl

    out = []
    for i, rec in read_jsonl(path, f"{flag} file", ConfigError):
        text = rec.get("caption") or rec.get("prompt")
        if isinstance(text, dict):
            text = json.dumps(text, ensure_ascii=False, separators=(",", ":"))
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{path}:{i}: expected a non-empty 'caption' or 'prompt' string")
        out.append(text)
    return out


def check_prompts(prompts: list[str], where: list[str]) -> None:
    """A prompt that starts with `{` is meant as a JSON caption: it must parse and follow the official caption
    rules (CaptionError names the rule), so a missing brace is never generated as raw text without a word."""
    from ditq.prompts.validate import check_caption

    for prompt, at in zip(prompts, where, strict=True):
        if prompt.lstrip().startswith("{"):
            check_caption(prompt, where=f"{at} (pass --raw to use it as raw text)")


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seed {text!r}: expected an integer or comma-separated integers") from None


def run(args) -> int:
    from tqdm import tqdm

    from ditq.io.files import naming
    from ditq.lora import lora_records
    from ditq.models.loading import model_defaults, pipeline_info, resolve_source
    from ditq.models.sampling import check_size, generate, png_metadata
    from ditq.runs.placed import placed_pipeline

    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    if not args.raw:
        where = (
            ["--prompt"]
            if args.prompt is not None
            else [f"{args.prompts} prompt {i + 1}" for i in range(len(prompts))]
        )
        check_prompts(prompts, where)
    seeds = parse_seeds(args.seed)
    loras = loras_from_args(args)
    opts = execution_from_args(args)
    settings = settings_from_args(args, model_defaults(resolve_source(args.model)))
    taken = [
        n for i in range(len(prompts)) for s in seeds if (args.output / (n := f"{i:03d}_s{s}.png")).exists()
    ]
    if taken and not args.force:  # before anything loads: an earlier image is never replaced by accident
        from ditq.errors import ConfigError

        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise ConfigError(
            f"{args.output}: {taken[0]}{more} already exist; choose another -o, or --force to replace them"
        )
    pipe, conds, policy = placed_pipeline(
        args.model, prompts, settings, opts, loras=loras, lora_strict=args.lora_strict
    )
    info = pipeline_info(pipe)
    check_size(pipe, settings)
    extra = {"loras": lora_records(loras)} if loras else {}
    if opts.attention != "sdpa":
        extra["attention"] = opts.attention
    args.output.mkdir(parents=True, exist_ok=True)
    jobs = [(i, p, s) for i, p in enumerate(prompts) for s in seeds]
    for i, prompt, seed in tqdm(jobs, desc="generate", unit="img", disable=len(jobs) < 2):
        image = generate(pipe, prompt, seed, settings, cond=conds.get(prompt))
        path = args.output / f"{i:03d}_s{seed}.png"  # checked above: new, or --force
        meta = png_metadata(
            prompt=prompt,
            seed=seed,
            model=args.model,
            variant=info.variant,
            settings=settings.to_dict(),
            dtype=args.dtype,
            device=str(args.device),
            offload=policy,
            **extra,
        )
        tmp = path.with_name(path.name + ".partial")
        with naming(path):
            image.save(tmp, format="PNG", pnginfo=meta)
            os.replace(tmp, path)
        print(path)
    return 0
