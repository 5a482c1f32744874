"""Atomic file writes: write a temporary file in the target's folder, fsync it, then rename it over the target.

A process killed at any moment leaves either the old file or the new one, never a torn file, and a reader
never sees half of one. Every file cmim writes for others to read (checkpoints, exports, results, summaries,
pictures) goes through here.

The temporary file comes from ``mkstemp``, which makes it private (0600); it is given the permissions a plain
``open()`` would have created (0666 minus the umask, 0644 usually) before the rename, so exported weights,
model cards and results are readable by whoever may read the folder, as with any other file.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_torch_save", "atomic_write_text", "default_file_mode"]

_UMASK_LOCK = threading.Lock()


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0o666 minus the process umask."""
    with _UMASK_LOCK:  # reading the umask means setting it; keep other threads from seeing the interim 0
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask & (stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO)


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that look at it still work); when the
    block ends without an exception the file is fsynced, given ``mode`` (default: :func:`default_file_mode`)
    and renamed over ``path``, otherwise removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
