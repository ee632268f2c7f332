"""Calibrate the cost model by timing the provider it is meant for (docs/design.md §3: "a cost model
calibrated by timing the real provider").

    cal = calibrated_cost_model("cpu", threads=2, tokens=1024)   # a few seconds once, then cached
    cal.model                                                     # a CostModel with fitted constants

What is timed, on ONNX Runtime with the same session settings as the autotuner (timing.py), X of
``tokens`` rows: one-node models of MatMul (T x k) @ (k x n) over a set of shapes that includes thin
ones (k or n from 1 to 24), Slice, Concat and Add (bias) copies of several widths, and a trivial
model whose time (the per-run overhead of a session, not a cost of the lowered graph) is subtracted
from the others.  The cost model's constants (peak_macs, bandwidth, op_overhead, thin) are fitted
to these times: for a given ``thin`` the model is linear in 1/peak, 1/bandwidth and op_overhead,
solved by non-negative least squares on relative errors; ``thin`` is chosen by a grid and
golden-section search on the squared error of log times.

The fitted model is cached as JSON under the cache folder (timing.cache_dir) in
``calibration/<hash>.json``, keyed by provider, threads, tokens, ONNX Runtime version and CPU model.
A corrupt or mismatched file is ignored and replaced.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .cost_model import TOKENS, CostModel
from .timing import (
    Runner,
    cache_dir,
    effective_threads,
    environment,
    key_hash,
    make_session,
    read_json,
    resolve_provider,
    time_interleaved,
    write_json,
)

__all__ = [
    "Calibration",
    "MATMUL_SHAPES",
    "COPY_SHAPES",
    "calibrated_cost_model",
    "fit_cost_model",
    "measure_samples",
    "synthetic_samples",
    "model_to_dict",
    "model_from_dict",
]

FORMAT = 1  # bump when what is measured or how it is fitted changes: old cache files are then ignored

# (k, n) of the timed MatMuls: layer-sized ones, the thin code and output products of low-rank
# blocks, and small ones.
MATMUL_SHAPES: tuple[tuple[int, int], ...] = (
    (384, 384),
    (384, 1536),
    (1536, 384),
    (384, 96),
    (96, 1536),
    (1536, 96),
    (96, 384),
    (384, 24),
    (24, 1536),
    (192, 8),
    (8, 768),
    (384, 1),
    (1, 1536),
    (64, 64),
    (16, 16),
)
# ("slice", source width, kept width) / ("concat", width of each of two pieces) / ("add", width)
COPY_SHAPES: tuple[tuple, ...] = (
    ("slice", 1536, 48),
    ("slice", 1536, 384),
    ("slice", 1536, 1152),
    ("concat", 24),
    ("concat", 192),
    ("concat", 768),
    ("add", 384),
    ("add", 1536),
)

Sample = dict  # {"op": "matmul", "k", "n", "seconds"} or {"op": "slice"|"concat"|"add", "elements", "seconds"}
Measure = Callable[[str, int, int], Sequence[Sample]]  # (provider, threads, tokens) -> samples

_FITTED = ("peak_macs", "bandwidth", "op_overhead", "thin")


@dataclass
class Calibration:
    model: CostModel
    key: dict = field(default_factory=dict)
    path: str = ""
    from_cache: bool = False
    fit_error: float = float("nan")  # rms of log(predicted / measured) over the samples
    seconds: float = 0.0  # time the measurement took (0 when read from the cache)

    def describe(self) -> str:
        m = self.model
        src = "from cache" if self.from_cache else f"measured in {self.seconds:.1f} s"
        return (
            f"cost model calibrated on {self.key.get('provider', '?')}, {self.key.get('threads', '?')} threads, "
            f"{m.tokens} tokens ({src}): {m.peak_macs / 1e9:.3g} GMAC/s, {m.bandwidth / 1e9:.3g} GB/s copies, "
            f"{m.op_overhead * 1e6:.3g} us per op, thin below {m.thin:.3g}; fit error {self.fit_error:.2f} (rms log)"
        )


def model_to_dict(m: CostModel) -> dict[str, Any]:
    """The fitted constants and the token count (policy such as dense_margin is not part of a calibration)."""
    return {k: getattr(m, k) for k in _FITTED + ("tokens",)}


def model_from_dict(d: Any) -> CostModel | None:
    """The CostModel stored in ``d``; None unless every fitted constant is a finite, valid number."""
    if not isinstance(d, dict):
        return None
    try:
        vals = {k: float(d[k]) for k in _FITTED}
        tokens = int(d.get("tokens", TOKENS))
    except (KeyError, TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in vals.values()) or tokens < 1:
        return None
    if vals["peak_macs"] <= 0 or vals["bandwidth"] <= 0 or vals["op_overhead"] < 0 or vals["thin"] < 1:
        return None
    try:
        return replace(CostModel(), **vals, tokens=tokens)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------- the fit
def _eff(k: int, n: int, thin: float) -> float:
    return min(1.0, k / thin) * min(1.0, n / thin)


def _design(samples: Sequence[Sample], tokens: int, thin: float) -> np.ndarray:
    rows = []
    for s in samples:
        if s["op"] == "matmul":
            k, n = int(s["k"]), int(s["n"])
            rows.append((tokens * k * n / _eff(k, n, thin), 0.0, 1.0))
        else:
            rows.append((0.0, 4.0 * tokens * int(s["elements"]), 1.0))
    return np.asarray(rows, dtype=np.float64)


def _nnls_small(A: np.ndarray, b: np.ndarray, required: Sequence[int]) -> np.ndarray | None:
    """min ||A x - b|| with x >= 0, the columns in ``required`` strictly used (few columns: try every subset)."""
    ncol = A.shape[1]
    best, best_res = None, math.inf
    for mask in range(1, 1 << ncol):
        cols = [c for c in range(ncol) if mask >> c & 1]
        if any(c not in cols for c in required):
            continue
        sol, *_ = np.linalg.lstsq(A[:, cols], b, rcond=None)
        if np.any(sol < 0) or any(sol[cols.index(c)] <= 0 for c in required):
            continue
        x = np.zeros(ncol)
        x[cols] = sol
        res = float(np.sum((A @ x - b) ** 2))
        if res < best_res:
            best, best_res = x, res
    return best


def _solve(samples: Sequence[Sample], tokens: int, thin: float) -> tuple[np.ndarray | None, float]:
    """(a = 1/peak, b = 1/bandwidth, overhead) for this ``thin``, and the squared log error of the fit."""
    t = np.asarray([float(s["seconds"]) for s in samples])
    A = _design(samples, tokens, thin)
    used = [c for c in (0, 1) if np.any(A[:, c] > 0)]
    keep = used + [2]
    x = _nnls_small(A[:, keep] / t[:, None], np.ones_like(t), required=list(range(len(used))))
    if x is None:
        return None, math.inf
    coef = np.zeros(3)
    coef[keep] = x
    pred = A @ coef
    if np.any(pred <= 0):
        return None, math.inf
    return coef, float(np.sum(np.log(pred / t) ** 2))


def fit_cost_model(samples: Sequence[Sample], tokens: int, base: CostModel | None = None) -> tuple[CostModel, float]:
    """CostModel constants fitted to timed samples (seconds per run at ``tokens`` rows), and the rms log error.

    Constants the samples cannot determine (no MatMul or no copy samples) keep ``base``'s values.
    """
    base = base or CostModel()
    samples = [s for s in samples if float(s["seconds"]) > 0 and math.isfinite(float(s["seconds"]))]
    if not samples:
        raise ValueError("no usable timing samples to fit the cost model to")
    grid = [2.0 ** (i / 8) for i in range(0, 8 * 8 + 1)]  # thin from 1 to 256
    errs = [_solve(samples, tokens, th)[1] for th in grid]
    i = int(np.argmin(errs))
    if not math.isfinite(errs[i]):
        raise ValueError("the timing samples cannot be fitted by the cost model (no positive solution)")
    # golden-section refinement of log2(thin) around the best grid point
    lo, hi = math.log2(grid[max(i - 1, 0)]), math.log2(grid[min(i + 1, len(grid) - 1)])
    f = lambda u: _solve(samples, tokens, 2.0**u)[1]
    g = (math.sqrt(5) - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = f(c), f(d)
    for _ in range(40):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = f(d)
    u = (lo + hi) / 2
    thin = 2.0**u if f(u) <= errs[i] else grid[i]
    coef, err = _solve(samples, tokens, thin)
    has_mm = any(s["op"] == "matmul" for s in samples)
    has_copy = any(s["op"] != "matmul" for s in samples)
    model = replace(
        base,
        peak_macs=float(1.0 / coef[0]) if has_mm else base.peak_macs,
        bandwidth=float(1.0 / coef[1]) if has_copy else base.bandwidth,
        op_overhead=float(coef[2]),
        thin=float(thin) if has_mm else base.thin,
        tokens=int(tokens),
    )
    return model, math.sqrt(err / len(samples))


def synthetic_samples(model: CostModel, tokens: int | None = None) -> list[Sample]:
    """The samples calibration would measure if ``model`` were exact (for tests and checks)."""
    m = replace(model, tokens=tokens or model.tokens)
    out: list[Sample] = [{"op": "matmul", "k": k, "n": n, "seconds": m.matmul(k, n)} for k, n in MATMUL_SHAPES]
    for op, *dims in COPY_SHAPES:
        e = _copy_elements(op, dims)
        out.append({"op": op, "elements": e, "seconds": m.copy(e)})
    return out


def _copy_elements(op: str, dims) -> int:
    return int(dims[1]) if op == "slice" else 2 * int(dims[0]) if op == "concat" else int(dims[0])


# ----------------------------------------------------------------- the measurement
def _one_node_model(op: str, dims, tokens: int, rng: np.random.Generator):
    from onnx import TensorProto, helper, numpy_helper

    f32 = TensorProto.FLOAT
    vi = lambda name, w: helper.make_tensor_value_info(name, f32, [tokens, w])
    i64 = lambda name, v: numpy_helper.from_array(np.array([v], dtype=np.int64), name)
    if op == "matmul":
        k, n = dims
        inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")]
        nodes, ins, outs = [helper.make_node("MatMul", ["X", "W"], ["Y"])], [vi("X", k)], [vi("Y", n)]
        feeds = {"X": (tokens, k)}
    elif op == "slice":
        src, width = dims
        a = (src - width) // 2
        inits = [i64("s", a), i64("e", a + width), i64("ax", 1)]
        nodes, ins, outs = [helper.make_node("Slice", ["X", "s", "e", "ax"], ["Y"])], [vi("X", src)], [vi("Y", width)]
        feeds = {"X": (tokens, src)}
    elif op == "concat":
        (m,) = dims
        inits = []
        nodes = [helper.make_node("Concat", ["A", "B"], ["Y"], axis=-1)]
        ins, outs, feeds = [vi("A", m), vi("B", m)], [vi("Y", 2 * m)], {"A": (tokens, m), "B": (tokens, m)}
    elif op == "add":
        (m,) = dims
        inits = [numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "b")]
        nodes, ins, outs = [helper.make_node("Add", ["X", "b"], ["Y"])], [vi("X", m)], [vi("Y", m)]
        feeds = {"X": (tokens, m)}
    else:
        raise ValueError(op)
    g = helper.make_graph(nodes, op, ins, outs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {k: rng.standard_normal(v).astype(np.float32) for k, v in feeds.items()}


def measure_samples(provider: str, threads: int, tokens: int, repeats: int = 9) -> list[Sample]:
    """Time the calibration set on ``provider`` (interleaved rounds, medians), per-run overhead subtracted."""
    rng = np.random.default_rng(0)
    specs: list[tuple[str, tuple]] = [("matmul", s) for s in MATMUL_SHAPES] + [
        (c[0], tuple(c[1:])) for c in COPY_SHAPES
    ]
    runners, base_key = {}, ("base", ())
    for i, (op, dims) in enumerate([base_key] + specs):
        model, feeds = (
            _one_node_model("slice", (8, 1), tokens, rng) if op == "base" else _one_node_model(op, dims, tokens, rng)
        )
        runners[i] = Runner(make_session(model, provider, threads), feeds, provider)
    med = time_interleaved(runners, repeats=repeats, warmup=2)
    base = med[0]
    out: list[Sample] = []
    for i, (op, dims) in enumerate(specs, start=1):
        t = max(med[i] - base, 0.05 * med[i], 1e-8)
        if op == "matmul":
            out.append({"op": "matmul", "k": dims[0], "n": dims[1], "seconds": t})
        else:
            out.append({"op": op, "elements": _copy_elements(op, dims), "seconds": t})
    return out


def calibrated_cost_model(
    provider: str = "auto",
    threads: int = 0,
    tokens: int = TOKENS,
    *,
    cache: str | Path | None = None,
    use_cache: bool = True,
    measure: Measure | None = None,
    repeats: int = 9,
) -> Calibration:
    """The cost model fitted to timings of ``provider`` (auto/cpu/cuda) at ``threads`` intra-op threads
    (0: one per core) and ``tokens`` rows; read from the cache when it was fitted before on this
    machine and ONNX Runtime version, else measured (a few seconds) and cached.  ``measure``
    replaces the timing (tests): (provider, threads, tokens) -> samples."""
    if tokens < 1:
        raise ValueError(f"tokens must be positive, got {tokens}")
    provider = resolve_provider(provider)
    threads = effective_threads(threads)
    key = {"kind": "calibration", "format": FORMAT, **environment(provider, threads, tokens)}
    path = cache_dir(cache) / "calibration" / f"{key_hash(key)}.json"
    if use_cache:
        data = read_json(path)
        if data is not None and data.get("key") == key:
            model = model_from_dict(data.get("model"))
            if model is not None and model.tokens == tokens:
                err = data.get("fit_error")
                return Calibration(
                    model, key, str(path), True, float(err) if isinstance(err, (int, float)) else math.nan
                )
    t0 = time.perf_counter()
    samples = list((measure or (lambda p, th, tk: measure_samples(p, th, tk, repeats)))(provider, threads, tokens))
    model, err = fit_cost_model(samples, tokens)
    seconds = time.perf_counter() - t0
    if use_cache:
        write_json(
            path,
            {
                "key": key,
                "model": model_to_dict(model),
                "fit_error": err,
                "seconds": seconds,
                "samples": samples,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
    return Calibration(model, key, str(path), False, err, seconds)
