"""Atomic output files: an interrupted or failed run never leaves a partial file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from gblrc.errors import GblrcError

__all__ = ["atomic_path", "check_output_path"]


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early (before long work) if ``path`` cannot be written."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise GblrcError(f"output folder {str(parent)!r} does not exist; create it or choose another -o path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GblrcError(f"output folder {str(parent)!r} is not writable; choose another -o path")
    if p.is_dir():
        raise GblrcError(f"output path {str(p)!r} is a folder; give a file name")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    p = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
