"""The JSON files of a pipeline folder, checked before diffusers or transformers read them.

diffusers (`from_pretrained`, `load_config`) and transformers (`AutoConfig`, `AutoTokenizer`) read configs
themselves and fail on a corrupt one with their own exceptions (`OSError`, `JSONDecodeError`, `AttributeError` on a
list where an object belongs...). `check_folder_json` reads every JSON file they will read first, so a corrupt or
wrongly typed one is a `CheckpointError` naming it; `library_errors` turns what the libraries still raise on content
of a shape they do not accept into a `CheckpointError` naming the folder and the library's first line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ditq.errors import CheckpointError, DitqError, ModelSourceError
from ditq.io.jsonfile import get_field, kind_name, read_json

PIPELINE_CLASS = "Ideogram4Pipeline"
# component folder -> its config file (the tokenizer folder's JSON files are checked as they come)
CONFIG_FILES = {
    "transformer": "config.json",
    "unconditional_transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
    "prompt_enhancer_head": "config.json",
}
# The exceptions diffusers and transformers raise on a config or tokenizer file of the wrong shape (plus
# huggingface_hub's StrictDataclassError, which transformers' typed configs raise on a field of the wrong type).
LIBRARY_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError)


def read_model_index(folder: Path, required: tuple[str, ...]) -> dict[str, Any]:
    """`model_index.json` as an object naming an Ideogram4Pipeline whose `required` components each have a
    [library, class] entry and a folder."""
    path = folder / "model_index.json"
    if not path.is_file():
        raise ModelSourceError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    index = read_json(path, "a diffusers pipeline index")
    name = get_field(index, "_class_name", str, str(path))
    if name != PIPELINE_CLASS:
        raise ModelSourceError(f"{path}: _class_name is {name!r}, expected {PIPELINE_CLASS!r}")
    for comp in required:
        if comp not in index or not (folder / comp).is_dir():
            raise ModelSourceError(f"{folder}: component {comp!r} is missing (expected a {comp}/ folder)")
        entry = index[comp]
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(s, str) for s in entry)):
            raise CheckpointError(
                f"{path}: component {comp!r} is a JSON {kind_name(entry)} ({str(entry)[:60]}), "
                "expected [library, class name]"
            )
    return index


def check_folder_json(folder: Path, index: dict[str, Any]) -> None:
    """Read every JSON file the libraries will read from `folder`: each component's config (an object whose
    `_class_name`, when present, is a string), the tokenizer's *.json files, and every shard index."""
    from ditq.io.safetensors_io import read_shard_index

    for comp, name in CONFIG_FILES.items():
        if comp not in index or not (folder / comp).is_dir():
            continue
        path = folder / comp / name
        if not path.is_file():
            raise ModelSourceError(f"{folder / comp}: no {name}")
        config = read_json(path, f"the {comp} config")
        get_field(config, "_class_name", str, str(path), default=None)
        get_field(config, "architectures", list, str(path), default=None)
        for index_path in sorted((folder / comp).glob("*.index.json")):
            if index_path.name.endswith(".safetensors.index.json"):
                read_shard_index(index_path)  # weight_map of str -> file inside the folder
            else:
                weight_map = get_field(
                    read_json(index_path, "a shard index"), "weight_map", dict, str(index_path)
                )
                _check_weight_map(index_path, weight_map)
    tokenizer = folder / "tokenizer"
    if tokenizer.is_dir():
        for path in sorted(tokenizer.glob("*.json")):
            read_json(path, "a tokenizer file")


def _check_weight_map(path: Path, weight_map: dict[str, Any]) -> None:
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CheckpointError(f"{path}: weight_map entry {name!r} is {file!r}, expected a file name")


@contextlib.contextmanager
def library_errors(folder: Path, what: str, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Around one diffusers / transformers call that reads `folder`: what it raises on content it does not accept
    becomes a CheckpointError naming the folder, what was being loaded, and the library's first line. `also` adds
    exception types one library raises (the tokenizers library raises a plain `Exception` on a tokenizer.json of
    the wrong shape); keep the block to the library call alone."""
    import torch
    from huggingface_hub.errors import StrictDataclassError

    default_dtype = torch.get_default_dtype()
    try:
        yield
    except (*LIBRARY_ERRORS, StrictDataclassError, *also) as exc:
        if isinstance(exc, DitqError):
            raise
        raise CheckpointError(f"{folder}: cannot load {what}: {first_line(exc)}") from None
    finally:
        # transformers sets torch's default dtype while it builds a model in `torch_dtype`; a build that fails
        # midway leaves it set, and every float tensor made later in the process would be bf16.
        torch.set_default_dtype(default_dtype)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line[:300]}" if line else type(exc).__name__


__all__ = ["CONFIG_FILES", "check_folder_json", "library_errors", "read_model_index"]
