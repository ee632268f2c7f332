"""What the benchmarks share: loading the sample and test helper modules, and provenance lines.

Benchmarks run as modules from the repository root, so they import each other as ``benchmarks.NAME``
and need no ``sys.path`` edits::

    .venv/bin/python -m benchmarks.minilm speed DIR/*.gblr.pt --threads 2

``samples/`` and ``tests/`` are folders of scripts, not packages: :func:`sample` and :func:`test_helper`
load one of their modules by path, once.  :func:`provenance` is the header every results file starts
with: the commit, the library versions and the cores -- never a machine folder.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["ROOT", "sample", "test_helper", "provenance", "display_path"]

ROOT = Path(__file__).resolve().parents[1]


def _load(folder: str, name: str):
    key = f"gblrc_{folder}_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / folder / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def sample(name: str):
    """``samples/NAME.py`` as a module (e.g. ``sample("families")``)."""
    return _load("samples", name)


def test_helper(name: str):
    """``tests/NAME.py`` as a module (e.g. ``test_helper("_onnx_builders")``)."""
    return _load("tests", name)


def _commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return (sha or "unknown") + (" + uncommitted changes" if dirty else "")


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


def provenance(threads: int | None = None) -> str:
    """'# gblrc <commit>; torch ..., onnxruntime ..., onnx ..., transformers ...; N cores (T threads)'."""
    libs = [(m, _version(m)) for m in ("torch", "onnxruntime", "onnx", "transformers", "numpy")]
    text = ", ".join(f"{m} {v}" for m, v in libs if v)
    cores = f"{os.cpu_count()} cores" + (f" ({threads} threads used)" if threads else "")
    return f"# gblrc {_commit()}; {text}; {cores}"


def display_path(path) -> str:
    """``path`` relative to the repository (or its file name alone): results files name no machine folders."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return p.name
