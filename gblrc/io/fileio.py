"""Atomic output files: an interrupted or failed run never leaves a partial file behind.

Output files get the permissions a plain ``open(path, "w")`` would give them (``0o666 & ~umask``, e.g. 0644),
not the 0600 of the :func:`tempfile.mkstemp` file they are written through: a lowered model is read by other
users and by servers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from gblrc.errors import GblrcError

__all__ = ["atomic_path", "check_output_path", "output_mode"]


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


def _umask() -> int:
    """This process's umask (read from /proc where it is there: setting it to read it races with threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def output_mode(folder: bool = False) -> int:
    """The permission bits of a new output file: those of ``open(path, "w")``, ``0o666 & ~umask``; of a new
    output folder (``folder``): those of ``os.mkdir``, ``0o777 & ~umask``."""
    return (0o777 if folder else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary file exists (empty) and has the permissions of a new file (:func:`output_mode`), which writers
    that open it again with ``"w"``/``"wb"`` (onnx.save, torch.save, json) keep."""
    p = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, output_mode())
        else:  # Windows: only the read-only bit exists, and mkstemp's file is writable
            os.chmod(tmp, output_mode())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
