"""ditq keeps its own Linear modules where a library has an equivalent; these tests show they compute the same and
measure why ditq's are kept.

- FP8: diffusers' `BFLFP8RLinear` holds the same E4M3 + row-scale layout. ditq's `Fp8Linear` computes exactly what
  it computes, but keeps its storage through `.to(dtype)`, which turns BFLFP8RLinear's FP8 weight into bf16 (and
  its fp32 scales too), and does not report float8 as the model's dtype (the pipeline casts its inputs to it).
- GGUF: diffusers' block decoders, run as diffusers' GGUF layers run them (in the dtype of the stored float16 block
  scales), land off gguf-py's (= ggml's) values; ditq's `GGUFLinear` decodes in float32 with the same decoders and
  matches gguf-py bit for bit.
- NF4: bitsandbytes' `Linear4bit` keeps its quantization state outside the parameters, so moving parameters the way
  diffusers' group offloading does (`param.data = param.data.to(device)`) leaves the absmax behind; ditq's `NF4Linear`
  stores it as a parameter, which moves, and packs and dequantizes to the same bytes and weight.
- GGUF files: gguf-py reads what ditq's writer writes; ditq's reader refuses a truncated file with its own error
  where gguf-py's raises a foreign one, and ditq's writer leaves no partial file under the final name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditq.formats.fp8 import Fp8Linear, quantize_fp8_rowwise


def test_fp8_linear_computes_what_diffusers_bfl_fp8r_linear_computes():
    from diffusers.quantizers.bfl.utils import BFLFP8RLinear

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 128, generator=g) * 0.05, torch.randn(96, generator=g)
    q, s = quantize_fp8_rowwise(w)
    ref = BFLFP8RLinear(128, 96, bias=True, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        ref.weight.data, ref.bias.data = q.clone(), b.to(torch.bfloat16)
        ref.weight_scale.copy_(s)
    mine = Fp8Linear(q, s, b, torch.bfloat16)
    x = torch.randn(7, 128, generator=g).to(torch.bfloat16)
    assert torch.equal(mine(x), ref(x))
    # the measured reason to keep ditq's: .to(dtype) keeps the FP8 storage, and the module's dtype is bf16
    ref.to(torch.bfloat16)
    mine.to(torch.bfloat16)
    assert ref.weight.dtype == torch.bfloat16 and ref.weight_scale.dtype == torch.bfloat16
    assert mine.weight.dtype == torch.float8_e4m3fn and mine.stored("weight_scale").dtype == torch.float32
    first_float = next(p.dtype for p in mine.parameters() if p.is_floating_point())
    assert first_float == torch.bfloat16


def test_gguf_linear_decodes_like_gguf_py_where_diffusers_default_does_not():
    from diffusers.quantizers.gguf.utils import dequantize_functions
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize as gguf_py_dequantize

    from ditq.formats.gguf import GGUFLinear
    from ditq.gguf import quantize

    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 512)) * rng.uniform(0.01, 3.0, (64, 1))).astype(np.float32)
    for qtype in (Q.Q4_K, Q.Q6_K, Q.Q2_K):
        raw = quantize(w, qtype)
        want = gguf_py_dequantize(raw, qtype)
        layer = GGUFLinear(torch.from_numpy(raw), qtype, None, torch.float32)
        assert np.array_equal(layer.dequantized_weight(torch.float32).numpy(), want)
        block, size = GGML_QUANT_SIZES[qtype]
        blocks = torch.from_numpy(raw).reshape(-1, size)
        default = (
            dequantize_functions[qtype](blocks, block, size, dtype=torch.float16).float().reshape(64, -1)
        )
        assert not np.array_equal(default.numpy(), want)  # the float16 arithmetic of diffusers' GGUF layers


def test_nf4_storage_moves_with_its_parameters_where_linear4bit_state_stays_behind():
    import bitsandbytes as bnb

    from ditq.formats.nf4 import NF4Format, quantize_nf4

    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g)
    lin = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(
        w.to(torch.bfloat16), requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=False
    )
    lin = lin.to("cpu")  # quantizes
    mine = NF4Format().build(quantize_nf4(w), torch.bfloat16)
    assert torch.equal(mine.weight.reshape(-1), lin.weight.data.reshape(-1))
    ref = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    assert torch.equal(mine.dequantized_weight(torch.float32), ref)
    # offload hooks move parameters and buffers (group offloading: `param.data = param.data.to(device)`);
    # Linear4bit's absmax is neither, so it stays where it was
    held = {t.data_ptr() for t in (*lin.parameters(), *lin.buffers())}
    assert lin.weight.quant_state.absmax.data_ptr() not in held
    mine_held = {t.data_ptr() for t in mine.parameters()}
    assert {mine.quant_state().absmax.data_ptr(), mine.quant_state().code.data_ptr()} <= mine_held


def test_gguf_files_read_and_written_like_gguf_py_but_checked_and_atomic(tmp_path):
    """gguf-py reads what ditq writes; ditq keeps its own reader and writer because gguf-py's reader lets foreign
    exceptions out of a truncated file and its writer leaves a partial file under the final name when stopped."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from ditq.errors import CheckpointError
    from ditq.gguf import GGUFFile, GGUFStreamWriter, TensorSpec

    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 256)).astype(np.float32)
    path = tmp_path / "w.gguf"
    with GGUFStreamWriter(
        path, [TensorSpec("w.weight", w.shape, Q.Q4_K)], {"general.architecture": "ideogram"}
    ) as f:
        f.write_tensor("w.weight", w)
    assert np.array_equal(
        np.asarray(gguf.GGUFReader(path).tensors[0].data).reshape(-1),
        GGUFFile(path).raw("w.weight").reshape(-1),
    )
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        GGUFFile(cut)
    with pytest.raises(Exception) as foreign:
        gguf.GGUFReader(cut)
    assert not isinstance(foreign.value, CheckpointError)

    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    writer = gguf.GGUFWriter(theirs, "ideogram")
    writer.add_tensor_info("w.weight", w.shape, w.dtype, w.nbytes)
    writer.write_header_to_file()  # ... and the process stops here
    writer.close()
    assert theirs.exists()
    with pytest.raises(KeyboardInterrupt):
        with GGUFStreamWriter(ours, [TensorSpec("w.weight", w.shape, Q.F32)], {}) as f:
            raise KeyboardInterrupt
    assert not ours.exists() and not list(tmp_path.glob("ours*"))
