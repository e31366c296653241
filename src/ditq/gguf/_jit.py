"""Numba building blocks that reproduce ggml's C float arithmetic bit for bit.

Every kernel here works in float32 only: numba promotes `float32 op int` and `float32 op <python float>` to
float64, so integers are converted with `f32(...)` and constants are float32 globals. Kernels are compiled with
`error_model="numpy"` so that a division by zero gives inf/nan like C instead of raising, and without fast-math so
LLVM neither reorders sums nor fuses multiply-adds (ggml's reference build has no FMA).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

f32 = np.float32

# Options shared by every kernel: IEEE division (inf/nan, no ZeroDivisionError) and an on-disk cache.
JIT = {"error_model": "numpy", "cache": True, "nogil": True}

_ROUND_MAGIC = f32(12582912.0)  # 1.5 * 2**23: adding it leaves round-half-even(x) in the low mantissa bits
GROUP_MAX_EPS = f32(1e-15)


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE-754 bit pattern of a float32 as an int32 (C's memcpy from float to int)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, x):
    """The float32 whose bit pattern is the low 32 bits of the given integer."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif x.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


@numba.njit(inline="always", **JIT)
def nearest_int(v):
    """ggml's nearest_int: round half to even through the float32 magic-number add, including its garbage for
    |v| > 4194303 (the result is then clamped by callers exactly as in C)."""
    return np.int32((f32_bits(v + _ROUND_MAGIC) & 0x007FFFFF) - 0x00400000)


@numba.njit(inline="always", **JIT)
def round_away(v):
    """C roundf: round half away from zero, for |v| < 2**23."""
    t = f32(np.trunc(v))
    frac = v - t  # exact for float32
    if frac >= f32(0.5):
        t += f32(1.0)
    elif frac <= f32(-0.5):
        t -= f32(1.0)
    return t


@numba.njit(inline="always", **JIT)
def f32_to_f16_bits(v):
    """float32 -> IEEE half bits, round to nearest even, subnormals and overflow to inf like ggml's software
    conversion (the path a build without F16C takes)."""
    b = np.int64(f32_bits(v)) & 0xFFFFFFFF
    sign = (b >> 16) & 0x8000
    a = b & 0x7FFFFFFF
    if a >= 0x7F800000:  # inf or nan
        return np.uint16(sign | 0x7C00 | (0x200 if a > 0x7F800000 else 0))
    if a >= 0x477FF000:  # rounds to a value >= 65520: overflow
        return np.uint16(sign | 0x7C00)
    if a < 0x38800000:  # below the smallest normal half: scale to units of 2**-24 and round once
        m = np.int64(np.rint(abs(v) * f32(16777216.0)))
        return np.uint16(sign | m)
    a -= 0x38000000  # rebias the exponent from 127 to 15
    a += 0x0FFF + ((a >> 13) & 1)  # round half to even on the 13 dropped bits
    return np.uint16(sign | (a >> 13))


@numba.njit(inline="always", **JIT)
def f16_bits_to_f32(h):
    """IEEE half bits -> float32 (exact)."""
    h = np.int32(h)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = f32(m) * f32(5.9604644775390625e-08)  # m * 2**-24, exact
        return -v if sign else v
    if e == 31:
        return bits_f32(np.int32(sign | 0x7F800000 | (m << 13)))
    return bits_f32(np.int32(sign | ((e + 112) << 23) | (m << 13)))


@numba.njit(inline="always", **JIT)
def store_f16(out, row, col, v):
    """Write float32 `v` as a little-endian half at out[row, col:col+2]; returns the half read back as float32."""
    h = f32_to_f16_bits(v)
    out[row, col] = np.uint8(h & 0xFF)
    out[row, col + 1] = np.uint8(h >> 8)
    return f16_bits_to_f32(h)


@numba.njit(inline="always", **JIT)
def load_f16(data, row, col):
    return f16_bits_to_f32(np.int32(data[row, col]) | (np.int32(data[row, col + 1]) << 8))


def thread_count() -> int:
    return numba.get_num_threads()


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the enclosed kernels on `n` threads (None: leave numba's setting, NUMBA_NUM_THREADS or all cores)."""
    if n is None:
        yield
        return
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        from ditq.errors import ConfigError

        raise ConfigError(f"threads={n} is out of range 1..{limit} (NUMBA_NUM_THREADS)")
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def chunks(n_items: int) -> int:
    """How many parallel chunks to cut `n_items` work items into: a few per thread, for load balance."""
    return max(1, min(n_items, 4 * numba.get_num_threads()))


@numba.njit(parallel=True, **JIT)
def _first_nonfinite_block(blocks, n_chunks):
    n, k = blocks.shape
    found = np.full(n_chunks, -1, np.int64)
    for c in numba.prange(n_chunks):
        lo = n * c // n_chunks
        hi = n * (c + 1) // n_chunks
        for b in range(lo, hi):
            row = blocks[b]
            m = np.int32(0)
            for j in range(k):
                m = max(m, f32_bits(row[j]) & 0x7FFFFFFF)
            if m >= 0x7F800000:
                found[c] = b
                break
    for c in range(n_chunks):
        if found[c] >= 0:
            return found[c]
    return -1


def first_nonfinite_block(blocks: np.ndarray) -> int:
    """Index of the first row of float32 `blocks` (n, k) holding a NaN or Inf, or -1."""
    if blocks.shape[0] == 0:
        return -1
    return int(_first_nonfinite_block(blocks, chunks(blocks.shape[0])))
