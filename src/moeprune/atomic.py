"""Atomic writes: a crash or an error never leaves a half-written file or folder behind.

Files are written to a temp file next to the target and renamed over it (``os.replace`` is atomic
on one filesystem); folders are built in a temp folder next to the target, then swapped in (the
previous folder is moved aside first and deleted only after the swap). Torch-free, so plain-JSON
writers (``PruningPlan.save``) stay cheap to import.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path: str | os.PathLike, writer: Callable[[str], object]) -> str:
    """``writer(tmp)`` writes a temp file in ``path``'s folder, which then replaces ``path``; the temp
    file is removed if ``writer`` fails. Returns ``path``."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """``atomic_write`` of a text file (UTF-8)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Swap the finished folder ``tmp`` in as ``out``: a previous ``out`` is moved aside (same parent,
    so a rename), replaced, and only then deleted."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "dir")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder next to ``out`` to write into; on success it replaces ``out``
    (``replace_dir``), on any error it is deleted and ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
