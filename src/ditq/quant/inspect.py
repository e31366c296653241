"""What `ditq inspect` reports: predicted sizes from shapes (`ditq.quant.sizes`) and real sizes from files and
memory."""

from __future__ import annotations

import json
from pathlib import Path

from ditq.models.sizes import files_on_disk, full_size_components, resident_bytes
from ditq.quant.sizes import component_table, predicted_folder_bytes

COMPONENTS = ("transformer", "unconditional_transformer", "text_encoder", "vae")


def meta_components(folder: Path) -> dict:
    """The components of a pipeline folder built on the meta device from their configs (shapes only)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLFlux2, Ideogram4Transformer2DModel
    from transformers import AutoConfig, Qwen3VLModel

    from ditq.models.folder_json import library_errors

    comps = {}
    with init_empty_weights(include_buffers=True):  # a config of a shape the library refuses names its folder
        for name in ("transformer", "unconditional_transformer"):
            with library_errors(folder / name, f"the {name} config"):
                comps[name] = Ideogram4Transformer2DModel.from_config(
                    Ideogram4Transformer2DModel.load_config(folder / name)
                )
        with library_errors(folder / "text_encoder", "the text encoder config"):
            comps["text_encoder"] = Qwen3VLModel._from_config(
                AutoConfig.from_pretrained(folder / "text_encoder")
            )
        with library_errors(folder / "vae", "the VAE config"):
            comps["vae"] = AutoencoderKLFlux2.from_config(AutoencoderKLFlux2.load_config(folder / "vae"))
    return comps


def inspect_model(source: str, load: bool = False) -> dict:
    """{"source", "variant", "formats", "components": {name: {parameters, bytes{column}, files?, predicted_bytes?,
    resident_bytes?}}}."""
    from ditq.models.loading import check_folder, read_record, resolve_source

    if source == "full":
        comps = full_size_components()
        return {
            "source": "full",
            "variant": None,
            "components": {n: component_table(m, n) for n, m in comps.items()},
        }
    folder = resolve_source(source)
    check_folder(folder)
    record = read_record(folder)
    comps = meta_components(folder)
    report: dict = {
        "source": source,
        "folder": str(folder),
        "variant": record.variant if record else "fp8",
        "formats": record.formats
        if record
        else dict.fromkeys(("transformer", "unconditional_transformer"), "fp8"),
        "recipes": record.recipes if record else {},
        "components": {},
    }
    formats = list(dict.fromkeys(report["formats"].values()))
    report["format"] = "+".join(formats)
    for name, model in comps.items():
        row = component_table(model, name)
        row["files"] = files_on_disk(folder / name)
        recipe = record.recipes.get(name) if record else None
        summary = record.summary.get(name) if record else None
        imported = recipe is None and report["formats"].get(name, "fp8") not in ("fp8", "bf16")
        # a folder imported from another tool has no recipe to predict from
        row["predicted_bytes"] = None if imported else predicted_folder_bytes(model, name, recipe, summary)
        report["components"][name] = row
    if load:
        from ditq.models.loading import load_pipeline

        pipe = load_pipeline(str(folder))
        for name in COMPONENTS:
            report["components"][name]["resident_bytes"] = resident_bytes(getattr(pipe, name))
    json.dumps(report)  # must stay serializable
    return report
