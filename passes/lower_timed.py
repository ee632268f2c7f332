"""lower-timed: lower each GBLRLinear node with the strategy that is fastest when timed on ONNX Runtime.

The static cost model (cost_model.py) estimates; this pass measures (autotuning, DESIGN.md §3:
"pick per layer by timing").  For every node it builds one small model per candidate lowering
(dense, stacked, sliced: the same subgraphs lower-gblr emits), runs them interleaved on random
input of `tokens` rows in an ONNX Runtime CPU session, and lowers the node with the lowest median
time.  Slower than the static passes (a few sessions per layer) and, like any timing, noisy on a
loaded machine, so it is not part of DEFAULT_PIPELINE; see TIMED_PIPELINE.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from gblrc.structure import GBLRWeights

from .base import Pass, PassResult, gblr_nodes, read_gblr_node
from .lower_gblr import LOWERINGS, lower_node

__all__ = ["TimedLowering", "candidate_model", "time_strategies"]

Measure = Callable[[GBLRWeights], dict[str, float]]


def candidate_model(w: GBLRWeights, strategy: str, tokens: int, opset: int = 17):
    """A one-layer ONNX model (X: tokens x n_in -> Y) lowered with `strategy`."""
    s = w.structure
    x = gs.Variable("X", dtype=np.float32, shape=(tokens, s.in_features))
    y = gs.Variable("Y", dtype=np.float32, shape=(tokens, s.out_features))
    node = gs.Node("GBLRLinear", "layer", inputs=[x], outputs=[y])
    g = gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=opset)
    lower_node(g, node, w, strategy)
    g.cleanup().toposort()
    return gs.export_onnx(g)


def time_strategies(w: GBLRWeights, tokens: int = 256, repeats: int = 7, threads: int = 0,
                    strategies: tuple[str, ...] = ("dense", "stacked", "sliced")) -> dict[str, float]:
    """Median seconds per run of each strategy (interleaved runs, ORT CPU, graph optimisations on)."""
    import onnxruntime as ort  # only this timing-based model needs it

    if not w.structure.blocks:
        strategies = ("dense",)
    sessions = {}
    for st in strategies:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = candidate_model(w, st, tokens)
        sessions[st] = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((tokens, w.structure.in_features)).astype(np.float32)
    for sess in sessions.values():
        sess.run(None, {"X": x})  # warm-up (prepacking, allocations)
    times: dict[str, list[float]] = {st: [] for st in sessions}
    for _ in range(max(1, repeats)):
        for st, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, {"X": x})
            times[st].append(time.perf_counter() - t0)
    return {st: float(np.median(v)) for st, v in times.items()}


class TimedLowering(Pass):
    name = "lower-timed"
    description = "lower GBLRLinear nodes with the strategy measured fastest on ONNX Runtime CPU (autotuning)"
    requires = frozenset({"gblr-nodes-valid"})
    ensures = frozenset({"standard-ops-only"})

    def __init__(self, tokens: int = 256, repeats: int = 7, threads: int = 0, measure: Measure | None = None):
        if tokens < 1 or repeats < 1:
            raise ValueError(f"tokens and repeats must be positive, got {tokens}, {repeats}")
        self.measure = measure or (lambda w: time_strategies(w, tokens, repeats, threads))

    def run(self, graph):
        counts = {f"lowered_{k}": 0 for k in LOWERINGS}
        for node in gblr_nodes(graph):
            w = read_gblr_node(node)
            times = self.measure(w)
            unknown = sorted(set(times) - set(LOWERINGS))
            if unknown or not times:
                raise ValueError(f"timing returned unknown or no strategies: {unknown or 'none'}")
            strategy = min(sorted(times), key=times.get)
            lower_node(graph, node, w, strategy)
            counts[f"lowered_{strategy}"] += 1
        changed = sum(counts.values()) > 0
        if changed:
            graph.cleanup().toposort()
        return PassResult(graph, changed, counts)
