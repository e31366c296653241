"""`ditq convert`: move Ideogram 4 transformers between ditq and the layouts other tools read and write.

Export (a ditq pipeline folder -> single files):
  ditq convert FOLDER --to sdcpp|comfyui -o OUT [--name NAME] [--prefix | --no-prefix] [--recipe q4_k]
Import (another tool's file -> a ditq pipeline folder):
  ditq convert FILE --from auto|official-fp8|official-nf4|comfyui-fp8|comfyui-int8|sdcpp-gguf --base FOLDER
               [--uncond FILE] -o OUT
Check a file against the loaders' rules:
  ditq convert FILE --check [--loaders sdcpp,comfyui] [--config config.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ditq.errors import ConfigError

IMPORT_LAYOUTS = ("auto", "official-fp8", "official-nf4", "comfyui-fp8", "comfyui-int8", "sdcpp-gguf")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="import / export transformers in stable-diffusion.cpp, ComfyUI and official layouts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "source", help="a pipeline folder (export) or a transformer file / folder (import, --check)"
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--to", choices=("sdcpp", "comfyui"), help="export for this tool")
    mode.add_argument("--from", dest="from_layout", choices=IMPORT_LAYOUTS, help="import from this layout")
    mode.add_argument(
        "--check", action="store_true", help="check a .gguf or INT8 .safetensors file, write nothing"
    )
    p.add_argument("-o", "--output", type=Path, help="output folder")
    p.add_argument("--name", help="export: file name stem (default ideogram4-<recipe> / ideogram4_int8)")
    pre = p.add_mutually_exclusive_group()
    pre.add_argument(
        "--prefix",
        action="store_const",
        const="model.diffusion_model.",
        help="export: add model.diffusion_model.",
    )
    pre.add_argument("--no-prefix", dest="prefix", action="store_const", const="", help="export: bare names")
    p.add_argument("--recipe", help="export: encode GGUF with this recipe from an FP8 / bf16 folder")
    p.add_argument("--base", help="import: pipeline folder (or hub id / tiny) giving the other components")
    p.add_argument("--uncond", type=Path, help="import: the unconditional transformer's file")
    p.add_argument("--force", action="store_true", help="import: replace an existing output folder")
    p.add_argument("--loaders", default="sdcpp,comfyui", help="--check: loaders to check for (sdcpp,comfyui)")
    p.add_argument(
        "--config", type=Path, help="--check / export: transformer config.json the shapes must match"
    )
    p.add_argument(
        "--quantize-all",
        action="store_true",
        help="export --recipe: also quantize 2-D weights outside sd.cpp's rule; --check: allow them",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    if args.check:
        return _check(args)
    if args.output is None:
        raise ConfigError("-o/--output is required")
    if args.to:
        return _export(args)
    return _import(args)


def _print_violations(violations) -> None:
    for v in violations:
        print(f"  {v}")


def _export(args) -> int:
    from ditq.interop.export import export

    result = export(
        args.source,
        args.output,
        args.to,
        name=args.name,
        prefix=args.prefix,
        recipe=args.recipe,
        config=args.config,
        quantize_all=args.quantize_all,
    )
    for comp, path in result.files.items():
        print(f"{comp}: {path}")
    if result.violations:
        print(f"{len(result.violations)} loader-rule violation(s):")
        _print_violations(result.violations)
        return 1
    print("loader rules: all hold")
    return 0


def _import(args) -> int:
    from ditq.interop.imports import build_pipeline

    if not args.base:
        raise ConfigError("--from needs --base FOLDER: the pipeline giving the text encoder, VAE and configs")
    out = build_pipeline(args.source, args.base, args.output, args.from_layout, args.uncond, force=args.force)
    print(out)
    return 0


def _check(args) -> int:
    from ditq.interop.checkers import check_file

    loaders = tuple(x.strip() for x in args.loaders.split(",") if x.strip())
    unknown = [x for x in loaders if x not in ("sdcpp", "comfyui")]
    if unknown:
        raise ConfigError(f"--loaders {args.loaders!r}: expected sdcpp and/or comfyui")
    violations = check_file(args.source, loaders, args.config, args.quantize_all)
    if violations:
        print(f"{args.source}: {len(violations)} loader-rule violation(s):")
        _print_violations(violations)
        return 1
    print(f"{args.source}: all {', '.join(loaders)} loader rules hold")
    return 0
