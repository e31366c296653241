"""The machine a run happens on: CPU model and flags, GPU, threads, torch version, load; and the thread default.

Oversubscribed threads are the commonest cause of slow CPU runs: torch starts one thread per logical core, and on a
shared or hyper-threaded machine those threads spin against each other (measured: 3.6x slower generation with two
threads than with one on a loaded 2-core machine). ditq sets the thread count once per process: the physical cores,
or one per rank under torchrun, unless `--threads` says otherwise.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def physical_cores() -> int:
    """Physical cores of this machine (logical cores when that cannot be told)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001 - psutil may not know this platform
        n = None
    return int(n or os.cpu_count() or 1)


def default_threads() -> int:
    """One thread per rank under torchrun (several ranks share the cores), else the physical cores."""
    return 1 if world_size() > 1 else physical_cores()


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads (and numba's, which the INT8 and GGUF kernels use) to `n` or the default."""
    import torch

    from ditq.errors import ConfigError

    n = default_threads() if n is None else int(n)
    if n < 1:
        raise ConfigError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(n))
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except Exception:  # noqa: BLE001 - numba is optional here
        pass
    return n


@cache
def cpu_info() -> tuple[str, str]:
    """(CPU model name, the SIMD / matrix flags that decide kernel speed)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        import platform

        model = platform.processor() or platform.machine()
    return model, ",".join(f for f in _FLAGS if f in flags)


def gpu_name(device: str | None = None) -> str | None:
    import torch

    if device is not None and not str(device).startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return None
    try:
        return torch.cuda.get_device_name(torch.device(device or "cuda"))
    except (RuntimeError, AssertionError):
        return None


def host_record(device: str = "cpu") -> dict:
    """What run.json and benchmarks record about the machine."""
    import torch

    model, flags = cpu_info()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": model,
        "cpu_flags": flags,
        "gpu": gpu_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg": load,
        "world_size": world_size(),
    }
