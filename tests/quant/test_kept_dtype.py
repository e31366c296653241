"""Writers store every tensor they do not quantize in bf16, whatever float dtype the source held: a float32
`save_pretrained` folder converts to a folder the loader accepts (it refuses mixed float dtypes beside quantized
layers)."""

from __future__ import annotations

import shutil

import torch

from ditq.io.safetensors_io import TensorSource


def test_int8_from_a_float32_folder_keeps_its_float_tensors_in_bf16(tiny_pipe, tmp_path):
    from ditq.models.loading import load_transformer
    from ditq.quant.int8.config import Int8W8A8Config
    from ditq.quant.int8.convert import convert_transformer_int8

    src = tmp_path / "transformer"
    tiny_pipe.transformer.save_pretrained(src)  # float32, diffusers' split names
    assert {TensorSource(src).get(k).dtype for k in TensorSource(src).keys()} == {torch.float32}
    dst = tmp_path / "out" / "transformer"
    dst.mkdir(parents=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    convert_transformer_int8(src, dst, None, Int8W8A8Config(), progress=False)
    out = TensorSource(dst)
    dtypes = {k: out.get(k).dtype for k in out.keys()}
    floats = {k: d for k, d in dtypes.items() if d.is_floating_point and not k.endswith("weight_scale")}
    assert floats and set(floats.values()) == {torch.bfloat16}
    assert torch.int8 in dtypes.values()
    model, counts = load_transformer(dst)  # mixed float dtypes would be refused here
    assert counts.get("int8", 0) > 0
    ref = tiny_pipe.transformer.state_dict()
    norm = next(k for k in ref if k.endswith("norm_q.weight"))
    loaded = dict(model.named_parameters())[norm]
    assert torch.equal(loaded.float(), ref[norm].to(torch.bfloat16).float())  # the bf16 rounding of the source
