"""`ditq inspect`: exact parameter counts and bytes per format consistent with the shapes."""

from __future__ import annotations

import json

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
