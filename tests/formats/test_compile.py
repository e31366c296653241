"""Every format's transformer compiles with `torch.compile(fullgraph=True)` on the CPU (inductor) and computes the
eager output (float32: the same arithmetic up to reassociation); FP8's scaled_mm path is refused on GPUs without
FP8 tensor cores."""

from __future__ import annotations

import pytest
import torch

import ditq
from ditq.errors import ConfigError
from ditq.models.loading import load_transformer
from ditq.quant.calibration import synthetic_inputs

FORMATS = ("fp8", "int8", "q4_k", "nf4")


@pytest.fixture(scope="module")
def folders(tiny_fp8_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    out = {"fp8": tiny_fp8_dir}
    out["int8"] = ditq.quantize_pipeline(
        tiny_fp8_dir, ditq.Int8Recipe(smoothquant=False), root / "int8", progress=False
    )
    for name in ("q4_k", "nf4"):
        out[name] = ditq.quantize_pipeline(tiny_fp8_dir, name, root / name, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_transformer_compiles_fullgraph_and_computes_the_eager_output(fmt, folders):
    torch._dynamo.reset()
    model, _ = load_transformer(folders[fmt] / "transformer", torch.float32)
    kw = synthetic_inputs(model.config, dtype=torch.float32)
    with torch.no_grad():
        want = model(**kw, return_dict=False)[0]
        got = torch.compile(model, fullgraph=True, backend="inductor")(**kw, return_dict=False)[0]
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-4, rel


def test_scaled_mm_is_refused_below_compute_capability_8_9(monkeypatch):
    from ditq.formats import fp8

    fp8._check_cuda_fp8.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    with pytest.raises(ConfigError, match=r"FP8 tensor cores.*RTX 3090 is 8\.6.*--fp8-compute dequant"):
        fp8.check_scaled_mm_device(torch.device("cuda", 0))
    fp8._check_cuda_fp8.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    fp8.check_scaled_mm_device(torch.device("cuda", 0))  # an Ada GPU passes
    fp8._check_cuda_fp8.cache_clear()
