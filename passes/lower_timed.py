"""lower-timed: lower each GBLRLinear node with the strategy that is fastest when timed on ONNX Runtime.

The static cost model (cost_model.py) estimates; this pass measures (autotuning, docs/design.md §3:
"pick per layer by timing").  For every node it builds one small model per candidate lowering
(dense, stacked, sliced, and segmented when it differs from sliced: the same subgraphs lower-gblr
emits), runs them interleaved on random input of `tokens` rows on the provider the model will
run on (timing.py: IO binding, fixed threads), and lowers the node with the lowest median time.
Dense is always a candidate, and a structured lowering is kept only when it measured below
`margin` x dense, so a tuned layer is never measurably slower than its dense MatMul.

With a TuneCache the times are stored per (layer shape, structure, tokens, provider, threads,
ONNX Runtime version, CPU): lowering the same model again measures nothing.  Timing is slower than
the static passes and noisy on a loaded machine, so it is not part of DEFAULT_PIPELINE; see
TIMED_PIPELINE and `gblrc lower --tune` (tune.py).  Reached by name (``--passes lower-timed``,
TIMED_PIPELINE) or through --tune, the pass times as the one default timing config says
(timing.DEFAULT_TIMING: 1,024 tokens, 9 repeats, margin 0.97, cached); the structured-or-dense
decision on the measured times is :func:`gblrc.ir.cost.lowering_decision`'s.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from gblrc.ir.structure import GBLRWeights

from .base import Pass, PassConfig, PassResult, gblr_nodes, read_gblr_node
from .choose_products import tile_indices
from .cost_model import DEFAULT_COST_MODEL, CostModel, dense_by_flops, lowering_decision, plan_segments
from .lower_gblr import LOWERINGS, lower_node
from .timing import (
    DEFAULT_TIMING,
    Runner,
    cache_dir,
    environment,
    key_hash,
    make_session,
    read_json,
    resolve_provider,
    time_interleaved,
    write_json,
)

__all__ = ["TimedLowering", "TuneCache", "candidate_model", "candidate_strategies", "layer_key", "time_strategies"]

# measure(w) or measure(w, strategies) -> {strategy: seconds}
Measure = Callable[..., dict[str, float]]

FORMAT = 1  # bump when the lowerings or the way they are timed change: old cache entries are then ignored


def candidate_model(w: GBLRWeights, strategy: str, tokens: int, opset: int = 17, model: CostModel | None = None):
    """A one-layer ONNX model (X: tokens x n_in -> Y) lowered with `strategy`."""
    s = w.structure
    x = gs.Variable("X", dtype=np.float32, shape=(tokens, s.in_features))
    y = gs.Variable("Y", dtype=np.float32, shape=(tokens, s.out_features))
    node = gs.Node("GBLRLinear", "layer", inputs=[x], outputs=[y])
    g = gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=opset)
    lower_node(g, node, w, strategy, model)
    g.cleanup().toposort()
    return gs.export_onnx(g)


def candidate_strategies(w: GBLRWeights, model: CostModel | None = None) -> tuple[str, ...]:
    """Dense, stacked, sliced; segmented too when it cuts the output rows (else it is sliced)."""
    s = w.structure
    if not s.blocks:
        return ("dense",)
    out = ("dense", "stacked", "sliced")
    if len(plan_segments(s, model or DEFAULT_COST_MODEL)) > 1:
        out += ("segmented",)
    return out


def time_strategies(
    w: GBLRWeights,
    tokens: int = DEFAULT_TIMING.tokens,
    repeats: int = DEFAULT_TIMING.repeats,
    threads: int = DEFAULT_TIMING.threads,
    strategies: Sequence[str] = ("dense", "stacked", "sliced"),
    *,
    provider: str = DEFAULT_TIMING.provider,
    model: CostModel | None = None,
    sessions: int = 2,
) -> dict[str, float]:
    """Median seconds per run of each strategy (interleaved runs, graph optimisations on) on
    ``provider`` (auto/cpu/cuda) with ``threads`` intra-op threads (0: one per core); the best median
    of ``sessions`` fresh sessions per strategy (a session's speed on a shared CPU is bimodal, fixed
    when it is created: the same MatMul ran at 0.67 or 1.28 ms)."""
    provider = resolve_provider(provider)
    if not w.structure.blocks:
        strategies = ("dense",)
    x = np.random.default_rng(0).standard_normal((tokens, w.structure.in_features)).astype(np.float32)
    models = {st: candidate_model(w, st, tokens, model=model) for st in strategies}
    best: dict[str, float] = {}
    for _ in range(max(1, sessions)):
        runners = {st: Runner(make_session(m, provider, threads), {"X": x}, provider) for st, m in models.items()}
        t = time_interleaved(runners, repeats=repeats, warmup=2)
        best = {st: min(v, best.get(st, float("inf"))) for st, v in t.items()}
    return best


def realised_macs(w: GBLRWeights, strategy: str) -> int:
    """Multiply-adds per input row that a lowering performs (zero padding included)."""
    s = w.structure
    if strategy == "dense":
        return s.dense_cost
    if strategy == "stacked":
        return s.total_rank * (s.in_features + s.out_features)
    if strategy == "sliced":
        return sum(b.rank * b.n_cols for b in s.blocks) + s.total_rank * s.out_features
    return s.cost()  # segmented: each segment multiplies only the codes of the blocks covering it


def layer_key(w: GBLRWeights, strategies: Sequence[str], env: dict, model: CostModel | None = None) -> dict:
    """What a layer's times depend on: its shape and structure (spans, ranks, tiles, bias), the
    candidates, and the environment (provider, threads, tokens, ONNX Runtime version, CPU)."""
    s = w.structure
    key = {
        "kind": "lowering",
        "format": FORMAT,
        **env,
        "in": s.in_features,
        "out": s.out_features,
        "bias": w.bias is not None,
        "strategies": sorted(strategies),
        "blocks": [
            [[[sp.start, sp.stop] for sp in b.rows], [[sp.start, sp.stop] for sp in b.cols], b.rank] for b in s.blocks
        ],
        "tiles": sorted(tile_indices(w)),
    }
    if "segmented" in strategies:
        key["segments"] = [[g.start, g.stop, list(g.blocks)] for g in plan_segments(s, model or DEFAULT_COST_MODEL)]
    return key


class TuneCache:
    """Measured times per layer key, one JSON file each under ``<folder>/lowering/`` (folder None: the
    cache folder, timing.cache_dir(), looked up when the cache is used)."""

    def __init__(self, folder: str | Path | None = None):
        self._root = folder

    @property
    def folder(self) -> Path:
        return cache_dir(self._root) / "lowering"

    def path(self, key: dict) -> Path:
        return self.folder / f"{key_hash(key)}.json"

    def get(self, key: dict) -> dict | None:
        """{"times", "recheck", "choice"} stored for ``key``; None when missing, corrupt or not for this key."""
        data = read_json(self.path(key))
        if data is None or data.get("key") != key:
            return None
        cands = set(key.get("strategies", ()))
        times, recheck = _times(data.get("times")), _times(data.get("recheck"))
        if times is None or set(times) != cands or data.get("choice") not in cands:
            return None
        if data.get("recheck") is not None and (recheck is None or not set(recheck) <= cands):
            return None
        return {"times": times, "recheck": recheck, "choice": data["choice"]}

    def put(self, key: dict, times: dict[str, float], choice: str, recheck: dict[str, float] | None = None) -> None:
        write_json(self.path(key), {"key": key, "times": times, "recheck": recheck, "choice": choice})


def _times(d) -> dict[str, float] | None:
    if not isinstance(d, dict) or not d:
        return None
    try:
        t = {str(k): float(v) for k, v in d.items()}
    except (TypeError, ValueError):
        return None
    return t if all(math.isfinite(v) and v > 0 for v in t.values()) else None


def _call_measure(fn: Measure, w: GBLRWeights, strategies: tuple[str, ...]) -> dict[str, float]:
    try:
        params = inspect.signature(fn).parameters.values()
        two = (
            any(p.kind is p.VAR_POSITIONAL for p in params)
            or sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 2
        )
    except (TypeError, ValueError):
        two = False
    return fn(w, strategies) if two else fn(w)


class TimedLowering(Pass):
    name = "lower-timed"
    description = "lower GBLRLinear nodes with the strategy measured fastest on ONNX Runtime (autotuning)"
    requires = frozenset({"gblr-nodes-valid"})
    ensures = frozenset({"standard-ops-only"})

    def __init__(
        self,
        tokens: int = DEFAULT_TIMING.tokens,
        repeats: int = DEFAULT_TIMING.repeats,
        threads: int = DEFAULT_TIMING.threads,
        measure: Measure | None = None,
        *,
        provider: str = DEFAULT_TIMING.provider,
        cache: TuneCache | None = None,
        model: CostModel | None = None,
        margin: float = DEFAULT_TIMING.margin,
        strategies: Sequence[str] | None = None,
        recheck_above: float = DEFAULT_TIMING.recheck_above,
    ):
        """The defaults are timing.DEFAULT_TIMING's.  measure(w[, strategies]) -> {strategy: seconds}
        replaces the timing (tests); cache: a TuneCache (None: always measure; by name and through
        --tune the pass is built by :meth:`from_config`, which caches as the timing config says);
        model: plans the segmented lowering; margin: a structured
        lowering is chosen only when it measured below margin x dense; strategies: the candidates
        (default: candidate_strategies, dense always among them); recheck_above: a structured winner
        that measured at or above this x dense is timed again against dense alone (twice the runs)
        and kept only if it wins again (a close call on a noisy machine)."""
        if tokens < 1 or repeats < 1:
            raise ValueError(f"tokens and repeats must be positive, got {tokens}, {repeats}")
        if not 0 < margin <= 1 or not recheck_above > 0:
            raise ValueError(f"margin must be in (0, 1] and recheck_above positive, got {margin}, {recheck_above}")
        unknown = sorted(set(strategies or ()) - set(LOWERINGS))
        if unknown:
            raise ValueError(f"unknown lowering strategies {unknown}; choose from {sorted(LOWERINGS)}")
        self.tokens, self.repeats, self.threads, self.provider = tokens, repeats, threads, provider
        self.cache, self.model, self.margin = cache, model, margin
        self.strategies = tuple(dict.fromkeys(("dense",) + tuple(strategies))) if strategies else None
        self.recheck_above = recheck_above
        self.measure = measure or (
            lambda w, st: time_strategies(
                w, self.tokens, self.repeats, self.threads, st, provider=self.provider, model=self.model
            )
        )
        self.recheck_measure = measure or (
            lambda w, st: time_strategies(
                w, self.tokens, 2 * self.repeats, self.threads, st, provider=self.provider, model=self.model
            )
        )

    @classmethod
    def from_config(cls, config: PassConfig) -> "TimedLowering":
        """The pass as ``config.timing`` says (cached in its folder when use_cache), with its cost model
        and measure."""
        t = config.timing
        return cls(
            t.tokens,
            t.repeats,
            t.threads,
            config.measure,
            provider=t.provider,
            cache=TuneCache(t.cache) if t.use_cache else None,
            model=config.cost_model,
            margin=t.margin,
            recheck_above=t.recheck_above,
        )

    def candidates(self, w: GBLRWeights) -> tuple[str, ...]:
        """What to time; only dense (nothing to time) when the structure has no block or costs at least
        as many multiply-adds as dense (gblrc.ir.cost.dense_by_flops, the decision's first rule)."""
        s = w.structure
        if dense_by_flops(s):
            return ("dense",)
        cands = self.strategies or candidate_strategies(w, self.model)
        # a lowering that multiplies more than dense cannot be faster; a timing that says so is noise
        return tuple(st for st in cands if st == "dense" or realised_macs(w, st) < s.dense_cost)

    def choose(self, times: dict[str, float], w: GBLRWeights) -> str:
        """The fastest strategy; dense unless the fastest measured below margin x dense
        (gblrc.ir.cost.lowering_decision on the measured times)."""
        unknown = sorted(set(times) - set(LOWERINGS))
        if unknown or not times:
            raise ValueError(f"timing returned unknown or no strategies: {unknown or 'none'}")
        bad = sorted(k for k, t in times.items() if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0))
        if bad:
            raise ValueError(f"timing returned no positive time for {', '.join(bad)}")
        return lowering_decision(
            w.structure,
            w.bias is not None,
            tile_indices(w),
            self.model or DEFAULT_COST_MODEL,
            measured=times,
            margin=self.margin,
        )[0]

    def decide(self, w: GBLRWeights, cands: tuple[str, ...]) -> tuple[str, dict, dict | None]:
        """(strategy, times of the candidates, times of the recheck or None), measured."""
        times = dict(_call_measure(self.measure, w, cands))
        strategy = self.choose(times, w)
        recheck = None
        if strategy != "dense" and "dense" in times and times[strategy] >= self.recheck_above * times["dense"]:
            recheck = dict(_call_measure(self.recheck_measure, w, ("dense", strategy)))
            recheck = {k: v for k, v in recheck.items() if k in ("dense", strategy)}
            if set(recheck) != {"dense", strategy} or self.choose(recheck, w) == "dense":
                strategy = "dense"
        return strategy, times, recheck

    def run(self, graph):
        counts = {f"lowered_{k}": 0 for k in LOWERINGS}
        details = []
        env = None
        for node in gblr_nodes(graph):
            w = read_gblr_node(node)
            cands = self.candidates(w)
            entry, key = None, None
            if cands == ("dense",):
                entry = {"times": {}, "recheck": None, "choice": "dense"}  # nothing to choose: not timed
            elif self.cache is not None:
                env = env or environment(resolve_provider(self.provider), self.threads, self.tokens)
                key = {
                    **layer_key(w, cands, env, self.model),
                    "margin": self.margin,
                    "recheck_above": self.recheck_above,
                }
                entry = self.cache.get(key)
            cached = entry is not None and key is not None
            if entry is None:
                strategy, times, recheck = self.decide(w, cands)
                entry = {"times": times, "recheck": recheck, "choice": strategy}
                if key is not None:
                    self.cache.put(key, times, strategy, recheck)
            strategy, times, recheck = entry["choice"], entry["times"], entry["recheck"]
            lower_node(graph, node, w, strategy, self.model)
            counts[f"lowered_{strategy}"] += 1
            s = w.structure
            last = recheck if recheck else times
            ratio = last[strategy] / last["dense"] if "dense" in last and strategy in last else 1.0
            details.append(
                {
                    "node": node.name or "",
                    "in": s.in_features,
                    "out": s.out_features,
                    "blocks": len(s.blocks),
                    "flop_ratio": s.cost_ratio(),
                    "choice": strategy,
                    "times": dict(times),
                    "recheck": recheck,
                    "ratio": ratio,
                    "cached": cached,
                }
            )
        changed = sum(counts.values()) > 0
        if changed:
            graph.cleanup().toposort()
        return PassResult(graph, changed, counts, details=details)
