"""Numba building blocks that reproduce ggml's C float arithmetic bit for bit.

Every kernel here works in float32 only: numba promotes `float32 op int` and `float32 op <python float>` to
float64, so integers are converted with `f32(...)` and constants are float32 globals. Kernels are compiled with
`error_model="numpy"` so that a division by zero gives inf/nan like C instead of raising, and without fast-math so
LLVM neither reorders sums nor fuses multiply-adds (ggml's reference build has no FMA).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ditq.errors import ConfigError

f32 = np.float32


def _install_package_cache_stamp() -> bool:
    """Key numba's on-disk cache of this package's kernels on the contents of every module of the package.

    numba invalidates a cached kernel only when the kernel's own source file changes, but the kernels here
    compile in helpers from sibling modules (`_search`, `_tiles`, this one). This registers cache locators, ahead
    of numba's own, that behave like numba's but use a hash of all the package's sources as the freshness stamp.
    Returns False (and the kernels are then not cached) if numba's caching internals are not as expected.
    """
    try:
        from numba.core import caching
    except ImportError:
        return False
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    bases = [
        getattr(caching, n, None)
        for n in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
    ]
    if impl is None or not isinstance(getattr(impl, "_locator_classes", None), list) or None in bases:
        return False
    package_dir = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for source in sorted(package_dir.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    stamp = digest.hexdigest()

    class _PackageStamp:
        @classmethod
        def from_function(cls, py_func, py_file):  # type: ignore[no-untyped-def]
            if Path(py_file).resolve().parent != package_dir:
                return None
            return super().from_function(py_func, py_file)  # type: ignore[misc]

        def get_source_stamp(self) -> str:
            return stamp

    if not any(getattr(c, "_ditq_gguf", False) for c in impl._locator_classes):
        locators = [type(f"DitqGguf{b.__name__}", (_PackageStamp, b), {"_ditq_gguf": True}) for b in bases]
        impl._locator_classes[:0] = locators
    return True


# Options shared by every kernel: IEEE division (inf/nan, no ZeroDivisionError), no GIL, an on-disk cache.
JIT = {"error_model": "numpy", "cache": _install_package_cache_stamp(), "nogil": True}

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


_THREADS: ContextVar[int | None] = ContextVar("ditq_gguf_threads", default=None)


def thread_count() -> int:
    """Threads the codecs use now: the innermost `threads(n)` setting, else every core this process may use."""
    n = _THREADS.get()
    if n is not None:
        return n
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the enclosed encodes and decodes on `n` threads (None: keep the current setting)."""
    if n is None:
        yield
        return
    if n < 1:
        raise ConfigError(f"threads={n}: must be at least 1")
    token = _THREADS.set(n)
    try:
        yield
    finally:
        _THREADS.reset(token)


def parallel_for(kernel: Callable[..., object], n_items: int, *args: object) -> None:
    """Call `kernel(lo, hi, *args)` over [0, n_items) cut into chunks, on `thread_count()` threads. Kernels are
    nogil numba functions, so the chunks run truly in parallel; each chunk writes its own slice of the output."""
    n_threads = min(thread_count(), n_items)
    if n_threads <= 1:
        kernel(0, n_items, *args)
        return
    n_chunks = min(n_items, 4 * n_threads)  # a few chunks per thread evens out the load
    bounds = [(n_items * c // n_chunks, n_items * (c + 1) // n_chunks) for c in range(n_chunks)]
    with ThreadPoolExecutor(n_threads, thread_name_prefix="ditq-gguf") as pool:
        for f in [pool.submit(kernel, lo, hi, *args) for lo, hi in bounds]:
            f.result()


@numba.njit(**JIT)
def _find_nonfinite(lo, hi, blocks, found):
    """For each part p in [lo, hi) of len(found) equal parts of `blocks`: found[p] = its first row holding a
    NaN or Inf (via the bit patterns: |x| >= the bits of inf), or -1."""
    n, k = blocks.shape
    n_parts = found.shape[0]
    for p in range(lo, hi):
        found[p] = -1
        for b in range(n * p // n_parts, n * (p + 1) // n_parts):
            row = blocks[b]
            m = np.int32(0)
            for j in range(k):
                m = max(m, f32_bits(row[j]) & 0x7FFFFFFF)
            if m >= 0x7F800000:
                found[p] = b
                break


def first_nonfinite_block(blocks: np.ndarray) -> int:
    """Index of the first row of float32 `blocks` (n, k) holding a NaN or Inf, or -1."""
    found = np.empty(max(1, min(blocks.shape[0], 4 * thread_count())), np.int64)
    parallel_for(_find_nonfinite, found.shape[0], blocks, found)
    hits = found[found >= 0]
    return int(hits[0]) if hits.size else -1
