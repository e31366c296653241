"""ggml block decoders in torch, for GGUF layers on any device: float32 arithmetic in ggml's own order, so the
weights equal gguf-py's (and ggml's) bit for bit on the CPU; no constant is built on the host per call (bit shifts
are `arange`s on the tensor's device, masks are scalars), so a CUDA forward never waits on a host copy.

Each decoder takes uint8 blocks [n, type_size] and returns float32 [n, block_size]. Layouts (bytes, ggml order):

    Q8_0  34 = 2 d | 32 q (int8)                               y = d * q
    Q4_0  18 = 2 d | 16 qs (value j low nibble, j+16 high)     y = d * (q - 8)
    Q4_1  20 = 2 d | 2 m | 16 qs                                y = d * q + m
    Q5_0  22 = 2 d | 4 qh (bit j: 5th bit of value j) | 16 qs  y = d * (q - 16)
    Q5_1  24 = 2 d | 2 m | 4 qh | 16 qs                        y = d * q + m
    Q2_K  84 = 16 scales (4-bit scale, 4-bit min) | 64 qs (2-bit) | 2 d | 2 dmin
    Q3_K 110 = 32 hmask | 64 qs (2-bit) | 12 scales (6-bit, -32) | 2 d
    Q4_K 144 = 2 d | 2 dmin | 12 scales (6-bit scale and min pairs) | 128 qs (4-bit)
    Q5_K 176 = 2 d | 2 dmin | 12 scales | 32 qh | 128 qs
    Q6_K 210 = 128 ql (low 4 bits) | 64 qh (high 2 bits) | 16 scales (int8) | 2 d
Other types (IQ4_NL, IQ4_XS) fall back to diffusers' torch decoders.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as Q


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 field at `offset` of each block, as float32 [n, 1]."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def _shifts(step: int, count: int, device) -> torch.Tensor:
    return torch.arange(0, step * count, step, dtype=torch.uint8, device=device)


def _q8_0(b):
    return _half(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes [n, 16] -> 32 values [n, 32]: the low nibbles (values 0..15), then the high ones (16..31)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _fifth_bits(qh4: torch.Tensor) -> torch.Tensor:
    """4 little-endian bytes [n, 4] of bit flags -> [n, 32] 0/1, bit j for value j."""
    bits = (qh4[:, :, None] >> _shifts(1, 8, qh4.device)) & 1
    return bits.reshape(qh4.shape[0], 32)


def _q4_0(b):
    return _half(b, 0) * (_nibbles(b[:, 2:]).float() - 8.0)


def _q4_1(b):
    return _half(b, 0) * _nibbles(b[:, 4:]).float() + _half(b, 2)


def _q5_0(b):
    q = _nibbles(b[:, 6:]) | (_fifth_bits(b[:, 2:6]) << 4)
    return _half(b, 0) * (q.float() - 16.0)


def _q5_1(b):
    q = _nibbles(b[:, 8:]) | (_fifth_bits(b[:, 4:8]) << 4)
    return _half(b, 0) * q.float() + _half(b, 2)


def _q2_k(b):
    n = b.shape[0]
    sc = b[:, 0:16]
    d, dmin = _half(b, 80), _half(b, 82)
    dl = (d * (sc & 0x0F).float()).reshape(n, 2, 4, 2, 1)  # [half, shift j, 16-value group, 1]
    ml = (dmin * (sc >> 4).float()).reshape(n, 2, 4, 2, 1)
    qs = b[:, 16:80].reshape(n, 2, 1, 2, 16)  # [half, -, group, l]
    q = ((qs >> _shifts(2, 4, b.device).reshape(1, 1, 4, 1, 1)) & 3).float()
    return (dl * q - ml).reshape(n, 256)


def _scales_k3(b: torch.Tensor) -> torch.Tensor:
    """Q3_K's 16 6-bit scales (minus 32) from their 12 packed bytes, as float32 [n, 16]."""
    s = b[:, 96:108].to(torch.int32)
    low = torch.cat([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], dim=1)  # scales 0..7 low nibbles, 8..15
    hi = s[:, 8:12]  # 2 bits for each of 16 scales
    high = torch.cat([(hi >> sh) & 3 for sh in (0, 2, 4, 6)], dim=1)
    return (low | (high << 4)).float() - 32.0


def _q3_k(b):
    n = b.shape[0]
    d = _half(b, 108)
    dl = (d * _scales_k3(b)).reshape(n, 2, 4, 2, 1)
    qs = b[:, 32:96].reshape(n, 2, 1, 2, 16)
    low = (qs >> _shifts(2, 4, b.device).reshape(1, 1, 4, 1, 1)) & 3
    hmask = b[:, 0:32].reshape(n, 1, 1, 2, 16)
    bit = _shifts(1, 8, b.device).reshape(1, 2, 4, 1, 1)  # value group (half, j) reads hmask bit 4*half + j
    high = (hmask >> bit) & 1
    q = low.to(torch.int16) - torch.where(high == 0, 4, 0).to(torch.int16)
    return (dl * q.float()).reshape(n, 256)


def _scale_min_k4(b: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 8 (scale, min) 6-bit pairs from 12 bytes at `offset`, as float32 [n, 8] each."""
    s = b[:, offset : offset + 12].to(torch.int32)
    sc_lo, m_lo = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc_hi = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    m_hi = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([sc_lo, sc_hi], dim=1).float(), torch.cat([m_lo, m_hi], dim=1).float()


def _k4(b, qs_offset: int, qh_offset: int | None):
    n = b.shape[0]
    d, dmin = _half(b, 0), _half(b, 2)
    sc, m = _scale_min_k4(b, 4)
    d1 = (d * sc).reshape(n, 4, 2, 1)  # sub-block j = 2 * pair + nibble
    m1 = (dmin * m).reshape(n, 4, 2, 1)
    qs = b[:, qs_offset : qs_offset + 128].reshape(n, 4, 1, 32)
    q = (qs >> _shifts(4, 2, b.device).reshape(1, 1, 2, 1)) & 0x0F
    if qh_offset is not None:
        qh = b[:, qh_offset : qh_offset + 32].reshape(n, 1, 1, 32)
        bit = _shifts(1, 8, b.device).reshape(1, 4, 2, 1)  # sub-block j reads bit j of qh
        q = q | (((qh >> bit) & 1) << 4)
    return (d1 * q.float() - m1).reshape(n, 256)


def _q4_k(b):
    return _k4(b, 16, None)


def _q5_k(b):
    return _k4(b, 48, 16)


def _q6_k(b):
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 2, 32)  # [half, nibble, l-group (l, l + 32), 32]
    qh = b[:, 128:192].reshape(n, 2, 1, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).float().reshape(n, 2, 4, 2, 1)  # [half, 4 quarters, 2]
    d = _half(b, 208).reshape(n, 1, 1, 1, 1)
    low = (ql >> _shifts(4, 2, b.device).reshape(1, 1, 2, 1, 1)) & 0x0F  # [n, half, nibble, group, 32]
    hshift = _shifts(2, 4, b.device).reshape(1, 1, 2, 2, 1)  # (nibble, group) -> 2 * (2 * nibble + group)
    high = (qh >> hshift) & 3
    q = (low | (high << 4)).to(
        torch.int16
    ) - 32  # value order: nibble, group, l -> 32 * (2 * nibble + group) + l
    # scale index within the half: is = l // 16 (+2 per group, +4 per nibble)
    q = q.reshape(n, 2, 4, 2, 16)
    return (d * sc * q.float()).reshape(n, 256)


DECODERS = {
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}


def decode_blocks(blocks: torch.Tensor, qtype: Q, block_size: int, type_size: int) -> torch.Tensor:
    """uint8 blocks [n, type_size] of `qtype` -> float32 [n, block_size], on the blocks' device."""
    decoder = DECODERS.get(qtype)
    if decoder is not None:
        return decoder(blocks)
    from diffusers.quantizers.gguf.utils import dequantize_functions

    return dequantize_functions[qtype](blocks, block_size, type_size, dtype=torch.float32)
