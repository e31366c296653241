"""Reusing files between pipeline folders: hard links where the filesystem allows, copies otherwise."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Give an OSError raised inside the block `path` as its file name when it has none (a full disk reports
    ENOSPC on write or close without one), so the error the user reads says which file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), os.fspath(path)) from exc


def write_atomic(path: str | os.PathLike, write, newline: str | None = None) -> None:
    """Call `write(file)` on a text file of a unique temporary name beside `path`, then rename it into place: a
    reader sees the old content or the new one, never a torn file, and concurrent writers never share a temporary.
    A path that is not a regular file (`/dev/stdout`, a FIFO) is written directly."""
    import tempfile

    path = Path(path)
    with naming(path):
        if path.exists() and not path.is_file():
            with path.open("w", encoding="utf-8", newline=newline) as f:
                write(f)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`text` written with `write_atomic`."""
    write_atomic(path, lambda f: f.write(text))


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """`obj` as indented JSON (UTF-8, keys sorted), written with `write_text_atomic`."""
    import json

    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True, default=str) + "\n")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's content, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def folder_fingerprint(folder: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """A cheap identity of the weight files of a folder: per file its name, size, first and last `chunk` bytes
    (safetensors and GGUF headers sit at the start); equal content gives equal fingerprints."""
    import hashlib

    h = hashlib.sha256()
    folder = Path(folder)
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not f.is_file() or f.name.startswith("."):
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(chunk))
            if size > 2 * chunk:
                fh.seek(size - chunk)
                h.update(fh.read(chunk))
    return h.hexdigest()
