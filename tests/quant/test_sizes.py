"""`ditq inspect`: exact parameter counts and bytes per format consistent with the shapes."""

from __future__ import annotations

import json

import pytest

from ditq.cli import main
from ditq.quant.inspect import inspect_model


def _ideogram4_linear_shapes(layers=34, hidden=4608, inter=12288, adaln=512, llm=53248, cin=128):
    """(out, in, has_bias) of every Linear of the full transformer, written out from the architecture."""
    block = [(3 * hidden, hidden, False)] * 0 + [(hidden, hidden, False)] * 4  # to_q, to_k, to_v, to_out
    block += [(inter, hidden, False), (hidden, inter, False), (inter, hidden, False)]  # w1, w2, w3
    block += [(4 * hidden, adaln, True)]  # adaln_modulation
    top = [(hidden, cin, True), (hidden, llm, True), (hidden, hidden, True), (hidden, hidden, True)]
    top += [(adaln, hidden, True), (cin, hidden, True), (hidden, adaln, True)]
    return block * layers + top


def test_inspect_full_exact_counts_and_bytes():
    report = inspect_model("full")
    tr = report["components"]["transformer"]
    assert tr["parameters"] == 9_279_288_448
    assert report["components"]["unconditional_transformer"]["parameters"] == 9_279_288_448
    linears = _ideogram4_linear_shapes()
    weight_elems = sum(o * i for o, i, _ in linears)
    rows = sum(o for o, _, _ in linears)
    other = tr["parameters"] - weight_elems
    assert tr["bytes"]["bf16"] == 2 * tr["parameters"]
    assert tr["bytes"]["fp8"] == weight_elems + 4 * rows + 2 * other
    assert tr["bytes"]["nf4"] == weight_elems // 2 + 4 * (weight_elems // 64) + 2 * other
    # Q4_K: 144 bytes per 256 weights for block qkv/o/ffn/adaLN weights (all rows are multiples of 256)
    blocks = [(o, i) for o, i, _ in linears[: 8 * 34]]
    q4 = sum(o * i for o, i in blocks)
    rest_2d = weight_elems - q4
    one_d = (
        tr["parameters"] - weight_elems
    )  # biases, norms, indicator embedding (2 x 4608 is > 1024 elements)
    small = sum(1 for _ in range(0))
    assert tr["bytes"]["q4_k"] >= q4 // 256 * 144 + 2 * rest_2d + small
    assert tr["bytes"]["q4_k"] <= q4 // 256 * 144 + 2 * rest_2d + 4 * one_d
    assert tr["bytes"]["q4_k"] < tr["bytes"]["fp8"] < tr["bytes"]["bf16"]


def test_inspect_folder_reports_files_next_to_prediction(tiny_fp8_dir, capsys):
    assert main(["inspect", str(tiny_fp8_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    tr = report["components"]["transformer"]
    size = tr["files"]["diffusion_pytorch_model.safetensors"]
    # file = predicted tensor bytes + the safetensors header (small)
    assert tr["predicted_bytes"] < size < tr["predicted_bytes"] + 64 * 1024
    assert report["format"] == "fp8"


@pytest.mark.slow
def test_inspect_predicts_protected_and_mixed_variants_exactly(tiny_fp8_dir, tmp_path):
    """The size rule the writers use: a SmoothQuant INT8 variant with fragile layers protected by a byte budget, and
    a per-branch mix (INT8 conditional, Q4_K unconditional), predicted to the byte of every tensor written (the
    files' data sections, headers aside)."""
    from ditq.io.safetensors_io import TensorSource
    from ditq.models.loading import load_pipeline
    from ditq.quant.calibration import calibrate_pipeline
    from ditq.quant.recipes import parse_recipe
    from ditq.quant.writer import quantize_pipeline

    captions = ["a red fox in the snow", "a jazz poster that reads BLUE NOTE"]
    stats = calibrate_pipeline(
        load_pipeline(tiny_fp8_dir), captions, height=64, width=64, steps=2, progress=False
    )
    path = stats.save(tmp_path / "stats.safetensors")
    protected = parse_recipe("int8", alpha=0.5, protect_budget="bytes=200KB")
    folders = {
        "int8-200kb": quantize_pipeline(
            str(tiny_fp8_dir), protected, tmp_path / "p", stats=path, progress=False
        ),
        "int8+q4_k": quantize_pipeline(
            str(tiny_fp8_dir), "int8", tmp_path / "m", uncond_recipe="q4_k", stats=path, progress=False
        ),
    }
    for name, folder in folders.items():
        report = inspect_model(str(folder))
        for tr in ("transformer", "unconditional_transformer"):
            row = report["components"][tr]
            ggufs = list((folder / tr).glob("*.gguf"))
            if ggufs:
                from gguf import GGUFReader

                (gguf_path,) = ggufs
                written = sum(int(t.n_bytes) for t in GGUFReader(gguf_path).tensors)
            else:
                written = TensorSource(folder / tr).total_bytes()
            assert row["predicted_bytes"] == written, (name, tr, row["predicted_bytes"], written)
    kept = json.loads((folders["int8-200kb"] / "ditq.json").read_text())["summary"]["transformer"][
        "kept_bf16"
    ]
    plain = json.loads((folders["int8+q4_k"] / "ditq.json").read_text())["summary"]["transformer"][
        "kept_bf16"
    ]
    assert len(kept) > len(plain)  # the budget protected layers beyond the default set
