"""The one timing harness: ONNX models on the provider they will run on, interleaved, best of fresh sessions.

Used by `gblrc bench`, by the autotuner and the cost-model calibration (gblrc.passes.timing re-exports
these), and by the benchmarks.  How a model is timed:

- a session made the way the timing is meant to transfer: the provider asked for (CUDA: all nodes it
  supports on the GPU, optionally with CUDA graph capture), a fixed number of intra-op threads, full
  graph optimisations, worker threads that do not spin (interleaved sessions do not steal each other's
  cores);
- inputs bound once on the device (I/O binding) and outputs preallocated there (their shapes learned
  from one run when the graph leaves them symbolic), so a timed run is the graph's work, not copies;
- the models' runs interleaved round-robin (load on a shared machine falls on all of them alike), after
  warm-up rounds; the median of the timed runs per model;
- repeated over a few fresh sessions and the smallest median kept: on a busy machine a session's speed
  can be bimodal, fixed when the session is created (the same MatMul at 0.67 or 1.28 ms).

onnxruntime and numpy only (no torch, no other part of gblrc).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from .session import _model_bytes

__all__ = [
    "CPU",
    "CUDA",
    "effective_threads",
    "resolve_provider",
    "timing_session",
    "Runner",
    "time_runs",
    "time_interleaved",
    "best_of_sessions",
    "Timing",
]

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def effective_threads(threads: int | None) -> int:
    """Intra-op threads: ``threads`` when positive, else the number of cores this process may use."""
    return int(threads) if threads and int(threads) > 0 else _cores()


def resolve_provider(provider: str | None = "auto") -> str:
    """'auto' (CUDA when this ONNX Runtime has it, else CPU), 'cpu', 'cuda' or a full provider name;
    ValueError for an unknown name or a CUDA provider this build does not have."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    p = (provider or "auto").strip().lower()
    if p == "auto":
        return CUDA if CUDA in avail else CPU
    if p in ("cpu", CPU.lower()):
        return CPU
    if p in ("cuda", "gpu", CUDA.lower()):
        if CUDA not in avail:
            raise ValueError(
                f"the CUDA provider is not available in this ONNX Runtime build "
                f"(available: {', '.join(avail)}); install onnxruntime-gpu on a machine with a GPU"
            )
        return CUDA
    raise ValueError(f"unknown provider {provider!r}; choose auto, cpu or cuda")


def timing_session(
    model, provider: str = CPU, threads: int | None = None, *, cuda_graph: bool = False, optimize: bool = True
):
    """An InferenceSession for timing ``model`` (ModelProto, bytes or path): ``provider`` (CUDA falls back
    to CPU for nodes it does not support, except with ``cuda_graph``, which needs every node on the GPU),
    ``threads`` intra-op threads (default: one per core), full graph optimisations, no spinning threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = effective_threads(threads)
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if provider == CUDA:
        providers: list[Any] = [(CUDA, {"enable_cuda_graph": "1"}) if cuda_graph else CUDA]
        if not cuda_graph:
            providers.append(CPU)
    else:
        providers = [CPU]
    return ort.InferenceSession(_model_bytes(model), so, providers=providers)


class Runner:
    """One timed run of a session: inputs bound once on the device, outputs preallocated on it.

    Output shapes the graph leaves symbolic are learned from one plain run first (so that CUDA graph
    capture, which needs fixed output buffers, works with dynamic-axis models too)."""

    def __init__(self, session, feeds: Mapping[str, np.ndarray], provider: str = CPU):
        import onnxruntime as ort

        self.session, self.cuda = session, provider == CUDA
        device = "cuda" if self.cuda else "cpu"
        self.binding = session.io_binding()
        self._keep = []  # OrtValues must outlive the binding
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        for name, arr in feeds.items():
            v = ort.OrtValue.ortvalue_from_numpy(arr, device, 0)
            self._keep.append(v)
            self.binding.bind_ortvalue_input(name, v)
        outs = session.get_outputs()
        static = all(all(isinstance(d, int) and d >= 0 for d in o.shape) for o in outs)
        if static and all(o.type in _NP_TYPES for o in outs):
            specs = [(list(o.shape), _NP_TYPES[o.type]) for o in outs]
        else:  # learn the shapes and types from one run
            specs = [(list(a.shape), a.dtype) for a in session.run(None, feeds)]
        for o, (shape, dtype) in zip(outs, specs):
            v = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)
            self._keep.append(v)
            self.binding.bind_ortvalue_output(o.name, v)

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)
        if self.cuda:
            self.binding.synchronize_outputs()

    def outputs(self) -> list[np.ndarray]:
        """The outputs of the last run, as host arrays."""
        return [o.numpy() for o in self.binding.get_outputs()]


_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def time_runs(
    runners: Mapping[str, Callable[[], None]],
    repeats: int = 9,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
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


def time_interleaved(
    runners: Mapping[str, Callable[[], None]],
    repeats: int = 9,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per run of each runner, the runners interleaved round-robin (so that load
    on a shared machine falls on all of them alike), after ``warmup`` untimed rounds."""
    return {k: float(np.median(v)) for k, v in time_runs(runners, repeats, warmup, clock).items()}


@dataclass
class Timing:
    """What :func:`best_of_sessions` measured: per model, the best (smallest) median and every session's."""

    best: dict[str, float]
    medians: dict[str, list[float]] = field(default_factory=dict)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)  # each model's outputs (last session)

    def ratio(self, a: str, b: str) -> float:
        return self.best[a] / self.best[b]


def best_of_sessions(
    models: Mapping[str, Any],
    feeds,
    *,
    provider: str = CPU,
    threads: int | None = None,
    repeats: int = 15,
    sessions: int = 3,
    warmup: int = 3,
    cuda_graph: bool = False,
    keep_outputs: bool = False,
) -> Timing:
    """Time every model in ``models`` (name -> ModelProto, bytes or path) on the same inputs.

    feeds: one mapping input name -> array for all models, or name -> feeds per model.  For each of
    ``sessions`` rounds, a fresh session per model; the models' runs interleaved (``warmup`` untimed
    rounds, then ``repeats`` timed ones); per model the smallest of the rounds' medians.
    """
    per_model = bool(feeds) and all(isinstance(v, Mapping) for v in feeds.values())
    medians: dict[str, list[float]] = {k: [] for k in models}
    outputs: dict[str, list[np.ndarray]] = {}
    for _ in range(max(1, sessions)):
        runners = {}
        for k, m in models.items():
            sess = timing_session(m, provider, threads, cuda_graph=cuda_graph)
            f = feeds[k] if per_model else feeds
            names = {i.name for i in sess.get_inputs()}
            runners[k] = Runner(sess, {n: v for n, v in f.items() if n in names}, provider)
        for k, v in time_interleaved(runners, repeats=repeats, warmup=warmup).items():
            medians[k].append(v)
        if keep_outputs:
            outputs = {k: r.outputs() for k, r in runners.items()}
        del runners
    return Timing(best={k: min(v) for k, v in medians.items()}, medians=medians, outputs=outputs)
