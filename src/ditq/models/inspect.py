"""What `ditq inspect` reports: predicted sizes from shapes and real sizes from files and memory."""

from __future__ import annotations

import json
from pathlib import Path

from ditq.models.sizes import component_table, files_on_disk, full_size_components, resident_bytes

COMPONENTS = ("transformer", "unconditional_transformer", "text_encoder", "vae")
# ditq.json "format" -> the column of the size table that predicts it
FORMAT_COLUMN = {"fp8": "fp8", "int8": "int8", "nf4": "nf4", "bf16": "bf16"}


def _meta_components(folder: Path) -> dict:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLFlux2, Ideogram4Transformer2DModel
    from transformers import AutoConfig, Qwen3VLModel

    comps = {}
    with init_empty_weights(include_buffers=True):
        for name in ("transformer", "unconditional_transformer"):
            comps[name] = Ideogram4Transformer2DModel.from_config(
                Ideogram4Transformer2DModel.load_config(folder / name)
            )
        comps["text_encoder"] = Qwen3VLModel._from_config(AutoConfig.from_pretrained(folder / "text_encoder"))
        comps["vae"] = AutoencoderKLFlux2.from_config(AutoencoderKLFlux2.load_config(folder / "vae"))
    return comps


def predict_gguf_bytes(model, recipe_name: str) -> int:
    """Bytes of the tensors a GGUF recipe writes for `model` (built on meta), from the recipe's own type rule."""
    from ditq.formats.keys import split_to_fused
    from ditq.gguf import tensor_bytes
    from ditq.quant.recipes.gguf import GGUFRecipe, storage_type

    recipe = GGUFRecipe(name=recipe_name)
    fused = split_to_fused(dict(model.state_dict()))
    return sum(
        tensor_bytes(storage_type(n, tuple(t.shape), recipe)[0], tuple(t.shape) or (1,))
        for n, t in fused.items()
    )


def inspect_model(source: str, load: bool = False) -> dict:
    """{"source", "format", "components": {name: {parameters, bytes{fmt}, files?, predicted_bytes?, resident_bytes?}}}."""
    from ditq.models.loading import check_folder, read_recipe, resolve_source

    if source == "full":
        comps = full_size_components()
        return {
            "source": "full",
            "format": None,
            "components": {n: component_table(m, n) for n, m in comps.items()},
        }
    folder = resolve_source(source)
    check_folder(folder)
    recipe = read_recipe(folder) or {}
    fmt = recipe.get("format", "fp8")
    column = FORMAT_COLUMN.get(fmt, fmt if fmt.startswith("q") else None)
    comps = _meta_components(folder)
    report: dict = {
        "source": source,
        "folder": str(folder),
        "format": fmt,
        "recipe": recipe.get("recipe"),
        "components": {},
    }
    for name, model in comps.items():
        row = component_table(model, name)
        row["files"] = files_on_disk(folder / name)
        recipe_name = (recipe.get("recipe") or {}).get("name", "")
        if fmt == "gguf" and name.endswith("transformer") and recipe_name:
            row["predicted_bytes"] = predict_gguf_bytes(model, recipe_name)
        elif not name.endswith("transformer"):  # text encoder and VAE are reused from the FP8 reference
            row["predicted_bytes"] = row["bytes"]["fp8"]
        elif column in row["bytes"]:
            row["predicted_bytes"] = row["bytes"][column]
        report["components"][name] = row
    if load:
        from ditq.models.loading import load_pipeline

        pipe = load_pipeline(str(folder))
        for name in COMPONENTS:
            report["components"][name]["resident_bytes"] = resident_bytes(getattr(pipe, name))
    json.dumps(report)  # must stay serializable
    return report
