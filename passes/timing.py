"""Timing ONNX models on the provider they will run on, and the on-disk cache of what was measured.

The sessions, the I/O-bound runner and the interleaved timing are gblrc.runtime.timing's (the one
timing harness, also behind `gblrc bench`), re-exported here.

Shared by calibration (calibrate.py: fit the cost model's constants) and autotuning
(lower_timed.py: time the candidate lowerings of each layer).  Sessions are made the way the
timings are meant to transfer: the provider asked for, a fixed number of intra-op threads, graph
optimisations on, and worker threads that do not spin (so that interleaved sessions do not steal
each other's cores).  Inputs are bound once (IO binding) and outputs preallocated, so a timed run
is the graph's work, not the copy of its result into a fresh numpy array or a host/device transfer.

Cache: JSON files under ``GBLRC_CACHE_DIR`` (default ``~/.cache/gblrc``), keyed by everything the
numbers depend on (provider, threads, tokens, ONNX Runtime version, CPU model).  A missing,
unreadable or malformed file is a cache miss, never an error; a cache that cannot be written is a
warning.  Only onnxruntime and numpy are needed (no torch).

How lower-timed times (tokens, repeats, threads, provider, margins, cache) is one TimingConfig,
DEFAULT_TIMING by default: the pass reached by name and through ``gblrc lower --tune`` (whose
TuneConfig takes its defaults from it) time alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from gblrc.ir.cost import TOKENS
from gblrc.runtime.timing import (  # the one timing harness
    CPU,
    CUDA,
    Runner,
    _cores,
    effective_threads,
    resolve_provider,
    time_interleaved,
    time_runs,
    timing_session,
)

__all__ = [
    "CPU",
    "CUDA",
    "CACHE_ENV",
    "cache_dir",
    "cpu_model",
    "effective_threads",
    "resolve_provider",
    "environment",
    "key_hash",
    "read_json",
    "write_json",
    "make_session",
    "Runner",
    "time_interleaved",
    "time_runs",
    "TimingConfig",
    "DEFAULT_TIMING",
    "TUNE_MARGIN",
    "RECHECK_ABOVE",
]

CACHE_ENV = "GBLRC_CACHE_DIR"

TUNE_MARGIN = 0.97  # a structured lowering must measure below this x dense (timing noise on a busy machine)
RECHECK_ABOVE = 0.6  # a structured winner measured at or above this x dense is timed again against dense


@dataclass(frozen=True)
class TimingConfig:
    """How lower-timed times the candidate lowerings of a layer.  tokens: rows of X (batch x sequence);
    repeats: timed runs per candidate (median); threads: intra-op threads (0: one per core); provider:
    auto (CUDA when available), cpu or cuda; margin: a structured lowering must measure below margin x
    dense; recheck_above: a structured winner at or above this x dense is timed again against dense;
    use_cache / cache: keep the times in the cache folder (None: $GBLRC_CACHE_DIR or ~/.cache/gblrc)."""

    tokens: int = TOKENS
    repeats: int = 9
    threads: int = 0
    provider: str = "auto"
    margin: float = TUNE_MARGIN
    recheck_above: float = RECHECK_ABOVE
    use_cache: bool = True
    cache: str | os.PathLike | None = None


DEFAULT_TIMING = TimingConfig()  # the one default: lower-timed by name, TIMED_PIPELINE and --tune


# ----------------------------------------------------------------- where and what
def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``override``, else $GBLRC_CACHE_DIR, else ~/.cache/gblrc (not created here)."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path("~/.cache/gblrc").expanduser()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else what platform reports)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    name = line.split(":", 1)[1].strip()
                    if name:
                        return " ".join(name.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@lru_cache(maxsize=1)
def gpu_model() -> str:
    """The first NVIDIA GPU's model name from the driver's /proc files ('' when there is none)."""
    import glob

    for info in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        try:
            with open(info, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.lower().startswith("model:"):
                        return " ".join(line.split(":", 1)[1].split())
        except OSError:
            continue
    return ""


def environment(provider: str, threads: int | None, tokens: int) -> dict[str, Any]:
    """What timings on this machine depend on: the cache key's common part."""
    import onnxruntime as ort

    env = {
        "provider": provider,
        "threads": effective_threads(threads),
        "tokens": int(tokens),
        "onnxruntime": ort.__version__,
        "cpu": cpu_model(),
        "cores": _cores(),
    }
    if provider == CUDA:
        env["gpu"] = gpu_model()
    return env


def key_hash(key: Mapping[str, Any]) -> str:
    """A stable file-name-safe hash of a JSON-serialisable key."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _new_file_mode(fd: int, tmp: str) -> None:
    """Give mkstemp's file (0600) the permissions of ``open(path, "w")``: ``0o666 & ~umask`` (as
    gblrc.io.fileio.output_mode, which gblrc.passes may not import)."""
    mask = os.umask(0o077)
    os.umask(mask)
    if hasattr(os, "fchmod"):
        os.fchmod(fd, 0o666 & ~mask)
    else:
        os.chmod(tmp, 0o666 & ~mask)


def write_json(path: Path, data: Mapping[str, Any]) -> bool:
    """Write ``data`` atomically (temporary file + rename); a failure is a warning, returns False."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            _new_file_mode(f.fileno(), tmp)
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return True
    except OSError as e:
        warnings.warn(
            f"gblrc: cannot write the cache file {path} ({e}); continuing without caching it",
            RuntimeWarning,
            stacklevel=2,
        )
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False


# ----------------------------------------------------------------- sessions
def make_session(model, provider: str, threads: int | None):
    """An InferenceSession for timing (:func:`gblrc.runtime.timing.timing_session`): ``provider`` (CUDA
    falls back to CPU for unsupported nodes), ``threads`` intra-op threads, full graph optimisations,
    no spinning worker threads."""
    return timing_session(model, provider, threads)
