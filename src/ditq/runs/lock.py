"""One writer per run folder and rank: an exclusive `flock` on `RUN/.lock.rank<r>`, held while the run writes.

Two `ditq run` processes on one folder would both generate every missing image and append to the same manifest;
the second is refused at once instead, naming the process that holds the folder. torchrun's ranks each take their
own rank's lock, so a sharded run is unaffected. The lock is released when the process exits, however it exits
(the kernel drops it), so a killed run never leaves the folder locked.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ditq.errors import ConfigError


@contextlib.contextmanager
def run_lock(run_dir: Path, rank: int = 0):
    import fcntl

    path = Path(run_dir) / f".lock.rank{rank}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
            raise ConfigError(
                f"{run_dir}: another ditq run ({holder}) is writing rank {rank} of this folder; wait for it to "
                "finish, or use another -o"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


__all__ = ["run_lock"]
