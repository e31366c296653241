"""The `ditq` command line: one verb per job. Only this package reads argv or prints.

Each verb lives in its own module here and exposes `add_parser(subparsers)`, which registers the verb's
arguments and sets `func` (called with the parsed namespace, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ditq._version import __version__
from ditq.errors import DitqError

# Verb modules in the order `ditq --help` lists them.
VERB_MODULES = (
    "generate",
    "inspect",
    "plan",
    "calibrate",
    "sensitivity",
    "quantize",
    "convert",
    "captions",
    "run",
    "eval",
    "report",
    "bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ditq", description="Quantize and benchmark Ideogram 4 diffusion transformers."
    )
    parser.add_argument("--version", action="version", version=f"ditq {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(f"ditq.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"ditq.cli.{name}":
                continue
            raise
        module.add_parser(subparsers)
        if name in COMPUTE_VERBS:
            subparsers.choices[name].add_argument(
                "--threads",
                type=int,
                help="CPU threads for torch and ditq's kernels (default: the physical cores; 1 per rank under torchrun)",
            )
    return parser


# Verbs that compute on the CPU: they take --threads and set the thread count before starting.
COMPUTE_VERBS = ("generate", "calibrate", "sensitivity", "quantize", "convert", "run", "eval", "bench")

# Third-party loggers that report optional CUDA kernels missing on CPU machines at import time.
_QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes", "diffusers", "transformers")


def _quiet_imports(verbose: int) -> None:
    if verbose >= 2:
        return
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torchao")


def main(argv: list[str] | None = None) -> int:
    _quiet_imports(sum(a in ("-vv",) for a in (argv if argv is not None else sys.argv[1:])) * 2)
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from ditq.cli.checks import precheck

        precheck(args.verb, args)  # paths and folders, before torch and the models are imported
        if args.verb in COMPUTE_VERBS:
            from ditq.host import set_threads

            args.threads = set_threads(args.threads)
        return int(args.func(args) or 0)
    except DitqError as exc:  # 2: usage or file error; 1: input read but invalid (a caption breaking a rule)
        print(f"ditq {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"ditq {args.verb}: interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 130
    except OSError as exc:  # read-only, disk full, missing parent, permission: one line naming the path
        print(f"ditq {args.verb}: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a crash: never reported as an input or usage error
        import traceback

        traceback.print_exc()
        print(
            f"ditq {args.verb}: internal error (a bug in ditq, not in your input); please report it with the "
            "traceback above",
            file=sys.stderr,
        )
        return CRASH


# Exit status of a crash (sysexits' EX_SOFTWARE), distinct from 1 (invalid input) and 2 (usage or file error).
CRASH = 70


def _os_error(exc: OSError) -> str:
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    what = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {what}" if where else what
