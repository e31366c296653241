"""Reusing files between pipeline folders: hard links where the filesystem allows, copies otherwise."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make `dst` hold `src`'s content; an existing link to the same file (a resumed run) is kept."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(dst):
        if dst.exists() and os.path.samefile(src, dst):
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_or_copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """`link_or_copy` for every file under `src`, merging into an existing `dst`."""
    shutil.copytree(src, dst, copy_function=link_or_copy, dirs_exist_ok=True)
