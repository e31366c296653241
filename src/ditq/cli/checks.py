"""Checks every verb's arguments get before anything heavy is imported, so a mistyped path fails in well under a
second: model sources, input files, LoRA paths, and output folders of another kind.

Only the standard library is imported here. The deeper checks (a folder's layout, a file's header) run later, in
the loaders; these catch what needs no more than `os.stat`.
"""

from __future__ import annotations

import stat
from pathlib import Path

from ditq.errors import ConfigError

# Names a model argument takes that are not paths.
BUILTIN_MODELS = ("tiny", "full")

# What marks each kind of folder a verb writes. A folder is of a kind when it holds one of these names; an empty
# folder (or one holding only hidden files, e.g. a lock) is of every kind.
FOLDER_MARKERS: dict[str, tuple[str, ...]] = {
    "pipeline": ("model_index.json",),
    "run": ("run.json", "manifest.jsonl", "prompts.jsonl"),
    "bench": ("variants", "calibration.safetensors", "run"),
    "report": ("index.html", "report.md"),
}
# Verb -> (attribute holding its output folder, the folder's kind). `generate` writes a folder of images.
OUTPUT_FOLDERS: dict[str, tuple[str, str]] = {
    "generate": ("output", "images"),
    "run": ("output", "run"),
    "bench": ("output", "bench"),
    "report": ("out", "report"),
    "quantize": ("output", "pipeline"),
}
# Verbs whose `model` argument names a model (`captions` has a `--model` too: an LLM's name).
MODEL_VERBS = ("generate", "inspect", "plan", "calibrate", "sensitivity", "quantize", "run", "bench")
# Verb -> attributes holding input files that must exist.
INPUT_FILES: dict[str, tuple[str, ...]] = {
    "generate": ("prompts",),
    "quantize": ("stats", "fragility"),
    "sensitivity": ("stats",),
    "calibrate": ("captions",),
    "convert": ("uncond", "config"),
}
# Verb -> attributes holding input folders that must exist.
INPUT_FOLDERS: dict[str, tuple[str, ...]] = {"eval": ("run",), "report": ("run",)}


def check_model(text: str, flag: str = "--model") -> None:
    """A model argument is `tiny`, `full`, an existing folder, or a hub id `owner/name` (resolved later, in the
    local cache); anything else is a ConfigError now."""
    if text in BUILTIN_MODELS:
        return
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(
                f"{flag} {text}: expected a pipeline folder (with model_index.json), got a file"
            )
        return
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or text.endswith("/"):
        raise ConfigError(f"{flag} {text}: no such folder, and not a hub id of the form owner/name")


def check_input_file(path: str | Path, flag: str) -> None:
    """`path` exists and is a regular file (a FIFO or a device would block or never end)."""
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{flag} {path}: is a folder; expected a file")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{flag} {path}: not a regular file (a FIFO, socket or device); expected a file")


def check_input_folder(path: str | Path, flag: str) -> None:
    if not Path(path).is_dir():
        raise ConfigError(f"{flag} {path}: no such folder")


def check_lora(text: str) -> None:
    """`PATH[:STRENGTH]`: the path part names an existing regular file (a bad STRENGTH is the LoRA parser's to
    report, with the file it belongs to)."""
    if Path(text).exists():
        check_input_file(text, "--lora")
        return
    head, sep, tail = text.rpartition(":")
    if sep and head and (_is_number(tail) or Path(head).exists()):
        check_input_file(head, "--lora")
        return
    raise ConfigError(f"--lora {text}: no such LoRA file (expected PATH or PATH:STRENGTH)")


def folder_kind(path: Path) -> str | None:
    """The kind of ditq folder `path` is (see FOLDER_MARKERS), "empty", or None for a folder of something else."""
    names = {p.name for p in path.iterdir() if not p.name.startswith(".")}
    if not names:
        return "empty"
    for kind, markers in FOLDER_MARKERS.items():
        if any(m in names for m in markers):
            return kind
    if all(n.endswith((".png", ".png.partial")) for n in names):
        return "images"
    return None


def check_output_folder(path: str | Path, kind: str, force: bool, flag: str = "-o") -> None:
    """An existing output folder must be empty or a ditq folder of the same `kind`: writing a run into a pipeline
    folder (or a pipeline over a run) mixes two things and can replace one. `force` writes anyway."""
    path = Path(path)
    if not path.exists() or force:
        return
    if not path.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a folder; choose another output")
    found = folder_kind(path)
    if found in ("empty", kind):
        return
    what = f"a ditq {found} folder" if found else "a folder of other files"
    raise ConfigError(
        f"{flag} {path}: is {what}, not a {kind} folder; choose another output, or pass --force to write into it"
    )


def precheck(verb: str, args) -> None:
    """Every check above that applies to `verb`'s parsed arguments."""
    model = getattr(args, "model", None)
    if verb in MODEL_VERBS and isinstance(model, str):
        check_model(model, "model" if verb in ("inspect", "plan", "quantize") else "--model")
    base = getattr(args, "base", None)
    if verb == "convert" and isinstance(base, str):
        check_model(base, "--base")
    for attr in INPUT_FILES.get(verb, ()):
        value = getattr(args, attr, None)
        if value is not None:
            check_input_file(value, "--" + attr.replace("_", "-"))
    for attr in INPUT_FOLDERS.get(verb, ()):
        value = getattr(args, attr, None)
        if value is not None:
            check_input_folder(value, attr.upper())
    for text in getattr(args, "lora", None) or []:
        check_lora(text)
    outputs = dict(OUTPUT_FOLDERS)
    if verb == "convert" and getattr(args, "from_layout", None):  # an import writes a pipeline folder
        outputs["convert"] = ("output", "pipeline")
    if verb in outputs:
        attr, kind = outputs[verb]
        value = getattr(args, attr, None)
        if value is not None:
            check_output_folder(value, kind, bool(getattr(args, "force", False)))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
