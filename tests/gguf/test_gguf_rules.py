"""Both make_qkx3_quants rules against C bytes on inputs where they differ, and the rule recorded by the writer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

import ditq.gguf as G
from ditq.errors import ConfigError

DATA = Path(__file__).parent / "data" / "qkx3"
OLD_VECTORS = Path(__file__).parent.parent / "data" / "kquants"
TYPES = ["Q2_K", "Q4_K", "Q5_K"]
RULE_FILES = {"llama.cpp-01243c58": "01243c58", "ggml-d99724f": "d99724f"}


@pytest.fixture(scope="module")
def corner() -> tuple[np.ndarray, np.ndarray]:
    return np.load(DATA / "input.npy"), np.load(DATA / "imatrix.npy")


def _c_bytes(qtype: str, rule: str, rows: int) -> np.ndarray:
    name = qtype[:-1].lower() + "K"
    return np.fromfile(DATA / f"{name}.{RULE_FILES[rule]}.bin", np.uint8).reshape(rows, -1)


def test_rule_table_and_default():
    assert set(G.KQUANT_RULES) == set(RULE_FILES)
    assert G.DEFAULT_RULE == "llama.cpp-01243c58"
    assert {q.name for q in G.RULE_TYPES} == set(TYPES)


@pytest.mark.parametrize("qtype", TYPES)
def test_the_two_rules_differ_on_the_corner_inputs(qtype, corner):
    x, imatrix = corner
    new, old = (_c_bytes(qtype, r, x.shape[0]) for r in RULE_FILES)
    differing = np.flatnonzero((new != old).any(axis=1))
    assert differing.size > 0
    assert (differing < 24).all()  # the typical-weight rows 24..31 encode the same under both rules


@pytest.mark.parametrize("rule", list(RULE_FILES))
@pytest.mark.parametrize("qtype", TYPES)
def test_each_rule_matches_its_c_build(qtype, rule, corner):
    x, imatrix = corner
    ours = G.quantize(x, qtype, imatrix, rule=rule)
    ref = _c_bytes(qtype, rule, x.shape[0])
    rows = np.flatnonzero((ours != ref).any(axis=1))
    assert rows.size == 0, f"{qtype} {rule}: rows {rows.tolist()} differ"


@pytest.mark.parametrize("qtype", TYPES)
def test_default_rule_is_the_current_one(qtype, corner):
    x, imatrix = corner
    assert np.array_equal(G.quantize(x, qtype, imatrix), _c_bytes(qtype, G.DEFAULT_RULE, x.shape[0]))


@pytest.mark.parametrize("qtype", TYPES)
def test_old_rule_still_matches_the_d99724f_vectors(qtype):
    x = np.load(OLD_VECTORS / "input.npy")
    imatrix = np.load(OLD_VECTORS / "imatrix.npy")
    ref = np.fromfile(OLD_VECTORS / f"{qtype[:-1].lower()}K.imat.bin", np.uint8).reshape(x.shape[0], -1)
    assert np.array_equal(G.quantize(x, qtype, imatrix, rule="ggml-d99724f"), ref)


@pytest.mark.parametrize("qtype", TYPES)
def test_rule_does_not_touch_plain_encoding(qtype, corner):
    x, _ = corner
    assert np.array_equal(G.quantize(x, qtype, rule="ggml-d99724f"), G.quantize(x, qtype))


def test_unknown_rule_is_a_config_error(corner):
    x, imatrix = corner
    with pytest.raises(ConfigError, match=r"unknown k-quant rule 'ggml-latest'.*llama\.cpp-01243c58"):
        G.quantize(x, "Q4_K", imatrix, rule="ggml-latest")


def test_writer_records_and_follows_the_rule(tmp_path, corner):
    x, imatrix = corner
    spec = [G.TensorSpec("w", x.shape, "Q4_K")]
    for rule in RULE_FILES:
        path = tmp_path / f"{RULE_FILES[rule]}.gguf"
        with G.GGUFStreamWriter(path, spec, rule=rule) as w:
            w.write_tensor("w", x, imatrix=imatrix)
        reader = gguf.GGUFReader(path)
        assert reader.fields[G.RULE_KEY].contents() == rule
        assert np.array_equal(np.asarray(reader.tensors[0].data), _c_bytes("Q4_K", rule, x.shape[0]))

    # the metadata's rule is followed when none is passed (re-writing an old-rule file keeps its rule)
    path = tmp_path / "from-metadata.gguf"
    with G.GGUFStreamWriter(path, spec, {G.RULE_KEY: "ggml-d99724f"}) as w:
        w.write_tensor("w", x, imatrix=imatrix)
    assert np.array_equal(G.GGUFFile(path).raw("w"), _c_bytes("Q4_K", "ggml-d99724f", x.shape[0]))
    with pytest.raises(ConfigError, match="contradicts"):
        G.GGUFStreamWriter(tmp_path / "x.gguf", spec, {G.RULE_KEY: "ggml-d99724f"}, rule=G.DEFAULT_RULE)
    with pytest.raises(ConfigError, match="expected a k-quant rule name"):
        G.GGUFStreamWriter(tmp_path / "x.gguf", spec, {G.RULE_KEY: 3})


def test_writer_records_no_rule_for_rule_free_types_or_raw_copies(tmp_path):
    path = tmp_path / "q8.gguf"
    with G.GGUFStreamWriter(path, [G.TensorSpec("w", (2, 32), "Q8_0")]) as w:
        w.write_tensor("w", np.ones((2, 32), np.float32))
    assert G.RULE_KEY not in gguf.GGUFReader(path).fields
    copy = tmp_path / "copy.gguf"
    data = G.quantize(np.ones((2, 256), np.float32), "Q4_K")
    with G.GGUFStreamWriter(copy, [G.TensorSpec("w", (2, 256), "Q4_K")], record_rule=False) as w:
        w.write_raw("w", data)
    assert G.RULE_KEY not in gguf.GGUFReader(copy).fields
