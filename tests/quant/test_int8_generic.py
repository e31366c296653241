"""INT8 W8A8 + SmoothQuant on models that are not Ideogram 4, through the public API with no Ideogram argument.

A hand-built block whose groups are known exactly (a LayerNorm feeding two Linears, a Linear feeding a Linear, a
GELU, a post-norm residual), a float64 check of the LayerNorm fold, and all-MiniLM-L6-v2 with its real weights:
calibrate_model with a probe, SmoothQuantConfig() quantizes every Linear, the traced groups, the embedding cosine
against plain W8A8, explicit groups honoured and refused by name, the warnings, and measure_fragility with a probe.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from ditq.errors import ConfigError
from ditq.formats.int8 import Int8Linear
from ditq.quant.api import quantization_record, quantize_
from ditq.quant.calibration import calibrate_model
from ditq.quant.int8 import Int8W8A8Config, SmoothQuantConfig, measure_fragility, trace_groups
from ditq.quant.int8.groups import apply_fold_
from ditq.quant.int8.smoothquant import SmoothGroup

K = 64


class Block(nn.Module):
    """ln -> {v, gate} (one input); out reads v's output (a rows fold); tail reads GELU of a sum (no fold);
    ln2 -> proj, with ln2's output also the residual (post-norm: no fold)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(K)
        self.v = nn.Linear(K, K)
        self.gate = nn.Linear(K, K)
        self.out = nn.Linear(K, K)
        self.tail = nn.Linear(K, K)
        self.ln2 = nn.LayerNorm(K)
        self.proj = nn.Linear(K, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        y = self.out(self.v(h)) + self.gate(h)
        z = self.ln2(self.tail(nn.functional.gelu(y)))
        return z + self.proj(z)


def block(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    m = Block().eval()
    with torch.no_grad():
        for ln in (m.ln, m.ln2):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
            ln.weight[:3] *= torch.tensor([20.0, 50.0, 100.0])  # outlier channels, as trained models have
    return m


def inputs(seed: int) -> torch.Tensor:
    return torch.randn(2, 12, K, generator=torch.Generator().manual_seed(seed))


def test_hand_built_groups_are_exactly_the_known_ones():
    m = block()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = inputs(0)
    trace = trace_groups(m, lambda mod: mod(x))
    assert trace.groups == [
        SmoothGroup("v+gate", ("v", "gate"), ("norm", "ln")),
        SmoothGroup("out", ("out",), ("rows", "v")),
        SmoothGroup("tail", ("tail",), None),
        SmoothGroup("proj", ("proj",), None),
    ]
    assert trace.sources == {"v+gate": "ln", "proj": "ln2"}
    assert set(trace.refused) == {"tail", "proj"} and "norm:ln2" in trace.refused["proj"]
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # the checks restored every bit


def test_layernorm_fold_into_weight_and_bias_is_exact_in_float64():
    m = block().double()
    x = inputs(1).double()
    ref = m(x)
    s = torch.exp2(torch.linspace(-3, 3, K, dtype=torch.float64))
    apply_fold_(m, ("v", "gate"), ("norm", "ln"), s)
    apply_fold_(m, ("out",), ("rows", "v"), torch.linspace(0.2, 5.0, K, dtype=torch.float64))
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)
    # the reference written out: LN(x; w/s, b/s) @ (W s)^T == LN(x; w, b) @ W^T
    w0, b0 = block().double().ln.weight.detach(), block().double().ln.bias.detach()
    torch.testing.assert_close(m.ln.weight.detach(), w0 / s, rtol=1e-15, atol=0)
    torch.testing.assert_close(m.ln.bias.detach(), b0 / s, rtol=1e-15, atol=0)


def test_hand_built_smoothquant_folds_into_the_layernorm_bias():
    ref = block()
    stats = calibrate_model(ref, lambda mod: [mod(inputs(i)) for i in range(4)])
    assert stats.groups["model"][0] == {"name": "v+gate", "linears": ["v", "gate"], "fold": "norm:ln"}
    q = quantize_(copy.deepcopy(ref), SmoothQuantConfig(alpha=0.5), stats=stats)
    groups = quantization_record(q).details["groups"]
    assert groups["v+gate"]["mode"] == "folded" and groups["out"]["mode"] == "folded"
    s = ref.ln.weight.detach() / q.ln.weight.detach()  # the smoothing vector, read back from the folded norm
    assert float(s.max() / s.min()) > 2  # the outlier channels moved into the weights
    torch.testing.assert_close(q.ln.bias.detach(), ref.ln.bias.detach() / s, rtol=1e-5, atol=1e-7)
    x = inputs(9)
    with torch.no_grad():
        y, r = q(x), ref(x)
    assert float((y - r).norm() / r.norm()) < 0.05


def test_hand_built_prepare_and_convert_trace_the_groups_on_the_first_call():
    ref = block()
    model = quantize_(copy.deepcopy(ref), SmoothQuantConfig(step="prepare"))
    with torch.no_grad():
        for i in range(4):
            model(inputs(i))
    quantize_(model, SmoothQuantConfig(alpha=0.5))
    groups = quantization_record(model).details["groups"]
    assert {n: g["fold"] for n, g in groups.items()} == {
        "v+gate": "norm:ln",
        "out": "rows:v",
        "tail": None,
        "proj": None,
    }
    assert isinstance(model.v, Int8Linear) and model.v.smoothing is None  # folded: nothing left to apply
    assert model.proj.smoothing is not None  # post-norm: smoothing fused into its activation quantization
    with torch.no_grad():
        y, r = model(inputs(9)), ref(inputs(9))
    assert float((y - r).norm() / r.norm()) < 0.05


def test_hand_built_explicit_fold_that_changes_the_model_is_refused():
    """With the first call at hand (prepare, then convert), an explicit fold is checked like a traced one."""
    model = quantize_(block(), SmoothQuantConfig(step="prepare"))
    with torch.no_grad():
        model(inputs(0))
    bad = SmoothQuantConfig(alpha=0.5, groups=[{"name": "p", "linears": ["proj"], "fold": "norm:ln2"}])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="group 'p' cannot fold into norm:ln2"):
        quantize_(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=96,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def test_pre_norm_llama_blocks_get_the_smoothquant_groups():
    """A pre-norm block (random Llama weights): every group folds, as SmoothQuant's paper folds Llama."""
    model = llama()
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    trace = trace_groups(model, lambda m: m(input_ids=ids, use_cache=False))
    want = [("lm_head", ("lm_head",), ("norm", "model.norm"))]
    for i in (1, 0):
        b = f"model.layers.{i}"
        want[:0] = [
            (
                f"{b}.self_attn.q_proj+k_proj+v_proj",
                tuple(f"{b}.self_attn.{p}_proj" for p in "qkv"),
                ("norm", f"{b}.input_layernorm"),
            ),
            (f"{b}.self_attn.o_proj", (f"{b}.self_attn.o_proj",), ("rows", f"{b}.self_attn.v_proj")),
            (
                f"{b}.mlp.gate_proj+up_proj",
                (f"{b}.mlp.gate_proj", f"{b}.mlp.up_proj"),
                ("norm", f"{b}.post_attention_layernorm"),
            ),
            (f"{b}.mlp.down_proj", (f"{b}.mlp.down_proj",), ("rows", f"{b}.mlp.up_proj")),
        ]
    assert [(g.name, g.linears, g.fold) for g in trace.groups] == want and not trace.refused
    stats = calibrate_model(model, lambda m: m(input_ids=ids, use_cache=False))
    q = quantize_(copy.deepcopy(model), SmoothQuantConfig(alpha=0.5), stats=stats)
    record = quantization_record(q)
    assert len(record.quantized) == 15 and not record.kept_float
    assert {g["mode"] for g in record.details["groups"].values()} == {"folded"}
    with torch.no_grad():
        y, r = q(input_ids=ids).logits, model(input_ids=ids).logits
    assert float((y - r).norm() / r.norm()) < 0.05


# -- all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm(real_model):
    torch.manual_seed(0)
    base = real_model.load()
    cal = real_model.calibration

    def probe(model):
        for i in range(0, len(cal), 16):
            model(**real_model.batch(cal[i : i + 16]))

    stats = calibrate_model(base, probe)
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    return {"base": base, "stats": stats, "ref": real_model.embed(base, real_model.held_out), "names": names}


@pytest.fixture(scope="module")
def minilm_default(real_model, minilm):
    q = quantize_(real_model.load(), SmoothQuantConfig(), stats=minilm["stats"])
    return q, quantization_record(q)


def test_minilm_calibration_reads_arguments_by_name_and_leaves_padding_out(real_model, minilm):
    """A positional call (BERT's second argument is the attention mask, not a timestep) records only real tokens."""
    batch = real_model.batch(real_model.held_out[:6])
    mask = batch["attention_mask"]
    assert not bool(mask.all())
    stats = calibrate_model(minilm["base"], lambda m: m(batch["input_ids"], mask), find_groups=False)
    query = stats.get("model", "encoder.layer.0.attention.self.query")
    assert int(query.count.sum()) == int(mask.sum()) and int(query.count[0]) == int(mask.sum())
    assert int(stats.get("model", "pooler.dense").count.sum()) == 6  # one row per sentence
    assert (
        stats.leader("model", "encoder.layer.0.attention.self.value")
        == "encoder.layer.0.attention.self.query"
    )


def test_minilm_default_smoothquant_quantizes_every_linear(minilm, minilm_default):
    q, record = minilm_default
    assert (
        len(minilm["names"]) == 37
    )  # 6 layers x (query, key, value, attention out, FFN up, FFN down) + pooler
    assert sorted(record.quantized) == sorted(minilm["names"]) and not record.kept_float
    assert all(isinstance(q.get_submodule(n), Int8Linear) for n in minilm["names"])
    modes = [g["mode"] for g in record.details["groups"].values()]
    assert modes.count("folded") == 6  # attention out -> rows of value, in every layer


def test_minilm_groups_share_qkv_and_read_the_layernorms(real_model, minilm, minilm_default):
    batch = real_model.batch(real_model.calibration[:2])
    trace = trace_groups(minilm["base"], lambda m: m(**batch))
    by_name = {g.name: g for g in trace.groups}
    for i in range(6):
        layer = f"encoder.layer.{i}"
        qkv = by_name[f"{layer}.attention.self.query+key+value"]
        assert qkv.linears == tuple(f"{layer}.attention.self.{p}" for p in ("query", "key", "value"))
        before = "embeddings.LayerNorm" if i == 0 else f"encoder.layer.{i - 1}.output.LayerNorm"
        assert trace.sources[qkv.name] == before
        assert trace.sources[f"{layer}.intermediate.dense"] == f"{layer}.attention.output.LayerNorm"
        # BERT is post-norm: each LayerNorm's output is also the residual the next LayerNorm adds, so folding
        # 1/s into it would change the model; the fold is refused and the smoothing fused into the activations
        assert qkv.fold is None and trace.refused[qkv.name].startswith(f"norm:{before} ")
        assert by_name[f"{layer}.attention.output.dense"].fold == ("rows", f"{layer}.attention.self.value")
    assert [g["name"] for g in minilm["stats"].groups["model"]] == [g.name for g in trace.groups]
    # one shared scale: q, k and v of a layer quantize their input with the very same smoothing vector
    q, record = minilm_default
    for i in range(6):
        group = record.details["groups"][f"encoder.layer.{i}.attention.self.query+key+value"]
        if group["mode"] == "explicit":
            vs = [
                q.get_submodule(f"encoder.layer.{i}.attention.self.{p}").smoothing
                for p in ("query", "key", "value")
            ]
            assert vs[0] is not None and all(torch.equal(vs[0], v) for v in vs[1:])


def test_minilm_rows_fold_is_exact_in_float64(real_model, minilm):
    """The fold the trace keeps (attention out -> value rows) and one it refuses (a LayerNorm), checked by hand."""
    _rows_fold_check(real_model, minilm)


@torch.no_grad()
def _rows_fold_check(real_model, minilm) -> None:
    m = copy.deepcopy(minilm["base"]).double()
    batch = real_model.batch(real_model.calibration[:4])
    ref = m(**batch).last_hidden_state
    s = torch.exp2(torch.rand(384, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1)
    att = m.encoder.layer[2].attention
    with torch.no_grad():
        att.self.value.weight /= s[:, None]
        att.self.value.bias /= s
        att.output.dense.weight *= s[None, :]
    torch.testing.assert_close(m(**batch).last_hidden_state, ref, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        ln = m.encoder.layer[1].output.LayerNorm
        ln.weight /= s
        ln.bias /= s
        for p in ("query", "key", "value"):
            getattr(m.encoder.layer[2].attention.self, p).weight *= s[None, :]
    assert float((m(**batch).last_hidden_state - ref).norm() / ref.norm()) > 0.01


def test_minilm_smoothquant_beats_plain_w8a8(real_model, minilm, minilm_default):
    """Measured (2-core AMD EPYC, torch 2.13.0+cpu): mean (worst) cosine to float32 over 200 held-out sentences,
    plain W8A8 0.99775 (0.99666), SmoothQuantConfig() 0.99922 (0.99857), alpha=0.5 0.99903; with unfoldable="plain"
    (no smoothing where nothing folds, 19 of 25 groups on this post-norm model) 0.99777. SmoothQuant leaves well
    under 0.6x plain W8A8's loss."""
    plain = quantize_(real_model.load(), Int8W8A8Config())
    p_mean, p_worst = real_model.cosine(plain, minilm["ref"])
    s_mean, s_worst = real_model.cosine(minilm_default[0], minilm["ref"])
    assert 0.99 < p_mean < s_mean
    assert 1 - s_mean < 0.6 * (1 - p_mean)
    assert s_worst > p_worst


def test_minilm_explicit_groups_are_honoured(real_model, minilm):
    l0 = "encoder.layer.0"
    groups = [
        {"name": "qk0", "linears": [f"{l0}.attention.self.query", f"{l0}.attention.self.key"]},
        SmoothGroup("o0", (f"{l0}.attention.output.dense",), ("rows", f"{l0}.attention.self.value")),
    ]
    q = quantize_(real_model.load(), SmoothQuantConfig(alpha=0.5, groups=groups), stats=minilm["stats"])
    record = quantization_record(q)
    got = record.details["groups"]
    assert got["qk0"]["mode"] == "explicit" and got["o0"]["mode"] == "folded"
    assert got[f"{l0}.attention.self.value"]["mode"] == "explicit"  # left out: smoothed alone
    assert f"{l0}.attention.self.query+key+value" not in got
    assert len(got) == 37 - 1 and len(record.quantized) == 37
    sq, sk, sv = (q.get_submodule(f"{l0}.attention.self.{p}").smoothing for p in ("query", "key", "value"))
    assert torch.equal(sq, sk) and not torch.equal(
        sq, sv
    )  # v's own activation maxima are the same, its W not
    assert q.get_submodule(f"{l0}.attention.output.dense").smoothing is None  # folded, nothing left to apply
    assert real_model.cosine(q, minilm["ref"])[0] > 0.998


@pytest.mark.parametrize(
    "groups, match",
    [
        ([{"linears": ["encoder.layer.0.attention.self.quer"]}], "'encoder.layer.0.attention.self.quer'"),
        ([{"linears": ["encoder.layer.0.attention.output.LayerNorm"]}], "LayerNorm, not a Linear"),
        ([{"linears": ["pooler.dense"], "fold": "norm:encoder.layer.9.output.LayerNorm"}], "layer.9.output"),
        (
            [{"linears": ["pooler.dense"], "fold": "rows:encoder.layer.5.intermediate.dense"}],
            "out_features 384",
        ),
        ([{"linears": ["pooler.dense", "encoder.layer.5.output.dense"]}], "in_features"),
        ([["pooler.dense"], {"name": "p", "linears": ["pooler.dense"]}], "'pooler.dense' is in two groups"),
    ],
)
def test_minilm_bad_groups_are_refused_by_name(real_model, minilm, groups, match):
    model = real_model.load()
    with pytest.raises(ConfigError, match=match):
        quantize_(model, SmoothQuantConfig(alpha=0.5, groups=groups), stats=minilm["stats"])
    assert quantization_record(model) is None


@pytest.mark.parametrize(
    "groups, match",
    [
        ("pooler.dense", "list of groups"),
        ([{"linears": []}], r"groups\[0\]"),
        ([{"linears": ["a"], "fold": "up:a"}], "fold"),
    ],
)
def test_malformed_groups_are_refused_by_the_config(groups, match):
    with pytest.raises(ConfigError, match=match):
        SmoothQuantConfig(groups=groups)


def _ditq_warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("ditq")
    ]


def test_minilm_warns_when_little_is_quantized(real_model, minilm, caplog):
    with caplog.at_level(logging.WARNING, logger="ditq.quant.api"):
        quantize_(real_model.load(), Int8W8A8Config(protect=("*",)))
    msgs = _ditq_warnings(caplog)
    assert len(msgs) == 1 and "quantized 0 of 37" in msgs[0] and "37 protected" in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ditq.quant.api"):
        model = quantize_(
            real_model.load(), SmoothQuantConfig(alpha=0.5, unfoldable="bf16"), stats=minilm["stats"]
        )
    record = quantization_record(model)
    assert len(record.kept_float) > len(record.quantized)
    msgs = _ditq_warnings(caplog)
    assert len(msgs) == 1
    assert (
        f"quantized {len(record.quantized)} of 37" in msgs[0] and "no neighbouring weight to fold" in msgs[0]
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ditq.quant.api"):
        quantize_(real_model.load(), SmoothQuantConfig(alpha=0.5), stats=minilm["stats"])
    assert not _ditq_warnings(caplog)


def test_minilm_fragility_with_a_probe_leaves_padding_out(real_model, minilm):
    base = minilm["base"]
    batch = real_model.batch(real_model.held_out[:8])
    assert not bool(batch["attention_mask"].all())  # sentences of different lengths: padded
    layers = ["encoder.layer.0.attention.self.query", "encoder.layer.3.output.dense", "pooler.dense"]
    rows = measure_fragility(
        base, minilm["stats"], "model", Int8W8A8Config(), layers, progress=False, probe=lambda m: m(**batch)
    )
    assert [r.module for r in rows] == layers
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = base(**batch)
    for r in rows:
        lin = base.get_submodule(r.module)
        model = copy.deepcopy(base)
        parent, _, leaf = r.module.rpartition(".")
        setattr(
            model.get_submodule(parent), leaf, Int8Linear.from_float(lin.weight.detach(), lin.bias.detach())
        )
        with torch.no_grad():
            out = model(**batch)
        pairs = [
            (out.last_hidden_state[mask].double(), ref.last_hidden_state[mask].double()),
            (out.pooler_output.double(), ref.pooler_output.double()),
        ]
        want = sum(float(((y - x) ** 2).sum()) for y, x in pairs) / sum(float((x**2).sum()) for _, x in pairs)
        assert r.error == pytest.approx(want, rel=1e-6) and r.error > 0
        assert r.smoothing == "none"
    sq = measure_fragility(
        base,
        minilm["stats"],
        "model",
        SmoothQuantConfig(alpha=0.5),
        layers[:1],
        progress=False,
        probe=lambda m: m(**batch),
    )
    assert sq[0].smoothing == "explicit alpha=0.5" and sq[0].error > 0
    with pytest.raises(ConfigError, match="no probes for model"):
        measure_fragility(base, minilm["stats"], "model", Int8W8A8Config(), layers, progress=False)
