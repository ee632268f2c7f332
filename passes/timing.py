"""Timing ONNX models on the provider they will run on, and the on-disk cache of what was measured.

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
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

__all__ = [
    "CPU", "CUDA", "CACHE_ENV", "cache_dir", "cpu_model", "effective_threads", "resolve_provider", "environment",
    "key_hash", "read_json", "write_json", "make_session", "Runner", "time_interleaved", "time_runs",
]

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
CACHE_ENV = "GBLRC_CACHE_DIR"


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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def effective_threads(threads: int | None) -> int:
    """Intra-op threads: ``threads`` when positive, else the number of cores this process may use."""
    return int(threads) if threads and int(threads) > 0 else _cores()


def resolve_provider(provider: str | None = "auto") -> str:
    """'auto' (CUDA when this ONNX Runtime has it, else CPU), 'cpu', 'cuda' or a full provider name."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    p = (provider or "auto").strip().lower()
    if p == "auto":
        return CUDA if CUDA in avail else CPU
    if p in ("cpu", CPU.lower()):
        return CPU
    if p in ("cuda", "gpu", CUDA.lower()):
        if CUDA not in avail:
            raise ValueError(f"the CUDA provider is not available in this ONNX Runtime build "
                             f"(available: {', '.join(avail)})")
        return CUDA
    raise ValueError(f"unknown provider {provider!r}; choose auto, cpu or cuda")


def environment(provider: str, threads: int | None, tokens: int) -> dict[str, Any]:
    """What timings on this machine depend on: the cache key's common part."""
    import onnxruntime as ort

    env = {"provider": provider, "threads": effective_threads(threads), "tokens": int(tokens),
           "onnxruntime": ort.__version__, "cpu": cpu_model(), "cores": _cores()}
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


def write_json(path: Path, data: Mapping[str, Any]) -> bool:
    """Write ``data`` atomically (temporary file + rename); a failure is a warning, returns False."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return True
    except OSError as e:
        warnings.warn(f"gblrc: cannot write the cache file {path} ({e}); continuing without caching it",
                      RuntimeWarning, stacklevel=2)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False


# ----------------------------------------------------------------- sessions and timed runs
def make_session(model, provider: str, threads: int | None):
    """An InferenceSession for timing: ``provider`` (CUDA falls back to CPU for unsupported nodes),
    ``threads`` intra-op threads, full graph optimisations, no spinning worker threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = effective_threads(threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data = model if isinstance(model, (bytes, bytearray)) else model.SerializeToString()
    providers = [CUDA, CPU] if provider == CUDA else [CPU]
    return ort.InferenceSession(bytes(data), so, providers=providers)


class Runner:
    """One timed run of a session: inputs bound once on the device, outputs preallocated when their shape is static."""

    def __init__(self, session, feeds: Mapping[str, np.ndarray], provider: str):
        import onnxruntime as ort

        self.session, self.cuda = session, provider == CUDA
        device = "cuda" if self.cuda else "cpu"
        self.binding = session.io_binding()
        self._keep = []  # OrtValues must outlive the binding
        for name, arr in feeds.items():
            v = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), device, 0)
            self._keep.append(v)
            self.binding.bind_ortvalue_input(name, v)
        for o in session.get_outputs():
            shape = o.shape
            if all(isinstance(d, int) and d >= 0 for d in shape) and o.type == "tensor(float)":
                v = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, device, 0)
                self._keep.append(v)
                self.binding.bind_ortvalue_output(o.name, v)
            else:
                self.binding.bind_output(o.name, device)

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)
        if self.cuda:
            self.binding.synchronize_outputs()


def time_interleaved(runners: Mapping[str, Callable[[], None]], repeats: int = 9, warmup: int = 2,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per run of each runner, the runners interleaved round-robin (so that load
    on a shared machine falls on all of them alike), after ``warmup`` untimed rounds."""
    return {k: float(np.median(v)) for k, v in time_runs(runners, repeats, warmup, clock).items()}


def time_runs(runners: Mapping[str, Callable[[], None]], repeats: int = 9, warmup: int = 2,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of every timed run of each runner (interleaved round-robin, after ``warmup`` rounds)."""
    for _ in range(max(0, warmup)):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(max(1, repeats)):
        for k, run in runners.items():
            t0 = clock()
            run()
            times[k].append(clock() - t0)
    return times
