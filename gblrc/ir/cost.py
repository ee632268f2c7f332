"""Cost model for lowering decisions: estimated seconds, not FLOPs.

docs/design.md §3 measured that multiply-adds do not predict time: op count,
thin matrix products and copies dominate.  The model charges

    MatMul (T x k) @ (k x n):  T k n / (PEAK * eff(k, n)) + OP
    Slice / Concat / Add:      bytes moved / BANDWIDTH + OP

with eff(k, n) = min(1, k / THIN) * min(1, n / THIN) penalising thin products.
The constants live in `CostModel`; gblrc.passes.calibrate fits them to timings of the
target provider (``gblrc lower --tune``).  Pure functions on the structure IR: the
decision passes (gblrc.passes.cost_model) and the time budget of ``compress``
(gblrc.learn.budget, :func:`lowered_estimate`) share them.

Estimates err, and a structured lowering that is estimated barely faster than
dense can be slower in fact: `best` picks a sliced or segmented lowering only
when its estimate is below DENSE_MARGIN x the dense estimate (the static
pipeline's guard against being slower than dense; with --tune, timing decides).
The stacked lowering (two MatMuls, no copies) is predicted well -- measured
time / dense within about 0.05 of the estimate on MiniLM's shapes at FLOP
ratios 0.4-0.9 (benchmarks/lowrank_margin.py) -- so it has its own, looser
STACKED_MARGIN.

The lowering decision itself -- structured or dense -- is made in one place,
:func:`lowering_decision`: dense when the structure multiplies at least as much
as dense (:func:`dense_by_flops`), else the fastest lowering below its margin x
dense, by the estimates or by measured times.  The passes (choose-products,
dense-fallback, lower-gblr, lower-timed) and the time budget
(:func:`lowered_estimate`) ask it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from gblrc.ir.structure import Block, Structure

__all__ = [
    "CostModel",
    "DEFAULT_COST_MODEL",
    "TOKENS",
    "DENSE_MARGIN",
    "STACKED_MARGIN",
    "Segment",
    "plan_segments",
    "segmented_cost",
    "is_full_width",
    "dense_by_flops",
    "lowering_decision",
    "lowered_estimate",
]

TOKENS = 1024  # rows of X the estimates assume (batch x sequence)
DENSE_MARGIN = 0.6  # a sliced / segmented lowering must be estimated below this fraction of dense to be chosen
# (0.9 let estimates of 0.66-0.84 through that measured 1.02-1.34 x dense in benchmarks/lowering_sweep.py)
STACKED_MARGIN = 0.9  # the stacked lowering: estimates 0.82 measured 0.80-0.93 x dense, 0.91 measured 0.91-0.98
# (benchmarks/lowrank_margin.py; with 0.6, low rank at FLOP ratios 0.6-0.8 stayed dense, 0.61-0.85 x lost)


def is_full_width(b: Block, n_in: int) -> bool:
    """Whether block ``b`` reads all ``n_in`` input columns as one span: its codes need no Slice or
    Concat, and the full-width blocks of a layer share one MatMul (X @ V_full^T)."""
    return b.n_cols == n_in and len(b.cols) == 1


def dense_by_flops(s: Structure) -> bool:
    """ "Cost >= dense means dense": no blocks, or at least as many multiply-adds as the dense layer,
    so no structured lowering can be faster (nothing to estimate or time)."""
    return not s.blocks or s.cost() >= s.dense_cost


def _fastest_below_margin(seconds: Mapping[str, float], dense: float | None, margin: Callable[[str], float]) -> str:
    """The fastest structured lowering in ``seconds`` whose time is below ``margin(strategy)`` x ``dense``
    (every one when ``dense`` is None), the first in ``seconds``' order on a tie; "dense" when none is."""
    ok = {k: v for k, v in seconds.items() if k != "dense" and (dense is None or v < margin(k) * dense)}
    return min(ok, key=ok.get) if ok else "dense"


@dataclass(frozen=True)
class CostModel:
    # Fitted by hand to the docs/design.md §3 measurements (2 cores, ORT 1.32 CPU, x 1024 x 384,
    # W 1536 x 384): dense ≈ 5.5 ms, stacked R=192 ≈ 0.4-0.6 x dense, sliced 4/8/32/96 blocks
    # ≈ 0.4/0.6/1.1/2.1 x dense (model: 0.66/0.71/1.27/2.91).  Replace by timing the provider.
    peak_macs: float = 110e9  # multiply-adds per second of a large MatMul (2 cores)
    bandwidth: float = 12e9  # bytes per second of a copy (Slice, Concat, Add)
    op_overhead: float = 2e-6  # seconds per node
    thin: float = 16.0  # inner/outer size under which a MatMul loses efficiency
    tokens: int = TOKENS
    dense_margin: float = DENSE_MARGIN  # sliced / segmented only when estimated below this x dense
    stacked_margin: float = STACKED_MARGIN  # stacked only when estimated below this x dense

    # -- primitives -------------------------------------------------------
    def matmul(self, k: int, n: int) -> float:
        if k <= 0 or n <= 0:
            return self.op_overhead
        eff = min(1.0, k / self.thin) * min(1.0, n / self.thin)
        return self.tokens * k * n / (self.peak_macs * eff) + self.op_overhead

    def copy(self, elements_per_token: int) -> float:
        return 4.0 * self.tokens * elements_per_token / self.bandwidth + self.op_overhead

    # -- lowerings of one layer --------------------------------------------
    def dense(self, s: Structure, bias: bool) -> float:
        return self.matmul(s.in_features, s.out_features) + (self.copy(s.out_features) if bias else 0.0)

    def stacked(self, s: Structure, bias: bool) -> float:
        """X @ V_stacked (n_in x R) @ U_stacked (R x n_out): ignores the widths."""
        R = s.total_rank
        return (
            self.matmul(s.in_features, R)
            + self.matmul(R, s.out_features)
            + (self.copy(s.out_features) if bias else 0.0)
        )

    def block_codes(self, b: Block, n_in: int, tile: bool = False) -> float:
        """Codes of one block from X: slice its columns (unless full), then X_cols @ V_b^T."""
        t = 0.0
        if not is_full_width(b, n_in):
            t += sum(self.copy(len(sp)) for sp in b.cols)
            if len(b.cols) > 1:
                t += self.copy(b.n_cols)  # concat of the pieces
        if not tile:
            t += self.matmul(b.n_cols, b.rank)
        return t

    def sliced(self, s: Structure, bias: bool, tiles: frozenset[int] = frozenset()) -> float:
        """Per block Slice -> MatMul (full-width blocks share one MatMul), Concat, one stacked U MatMul."""
        full = [b for b in s.blocks if is_full_width(b, s.in_features)]
        part = [(i, b) for i, b in enumerate(s.blocks) if not is_full_width(b, s.in_features)]
        t = self.matmul(s.in_features, sum(b.rank for b in full)) if full else 0.0
        t += sum(self.block_codes(b, s.in_features, i in tiles) for i, b in part)
        pieces = (1 if full else 0) + len(part)
        if pieces > 1:
            t += self.copy(s.total_rank)
        t += self.matmul(s.total_rank, s.out_features)
        return t + (self.copy(s.out_features) if bias else 0.0)

    def best(self, s: Structure, bias: bool, tiles: frozenset[int] = frozenset()) -> tuple[str, float]:
        """(strategy, estimated seconds) of the fastest lowering of the layer whose estimate is below its
        margin x dense (``stacked_margin`` for stacked, ``dense_margin`` for the others), else dense."""
        dense = self.dense(s, bias)
        if not s.blocks:
            return "dense", dense
        options = {
            "stacked": self.stacked(s, bias),
            "sliced": self.sliced(s, bias, tiles),
            "segmented": segmented_cost(self, s, bias, tiles),
        }
        name = _fastest_below_margin(
            options, dense, lambda k: self.stacked_margin if k == "stacked" else self.dense_margin
        )
        return name, options.get(name, dense)


# -- the segmented lowering's plan and cost (lower_segmented.py builds it) --------------------


@dataclass(frozen=True)
class Segment:
    """Output rows [start, stop) computed from the codes of ``blocks`` (block indices, sorted)."""

    start: int
    stop: int
    blocks: tuple[int, ...]

    @property
    def width(self) -> int:
        return self.stop - self.start

    def rank(self, s: Structure) -> int:
        """Codes this segment reads: the summed rank of its blocks."""
        return sum(s.blocks[i].rank for i in self.blocks)


def _segment_cost(model: CostModel, s: Structure, seg: Segment) -> float:
    r = seg.rank(s)
    gather = model.copy(r) if len(seg.blocks) > 1 else 0.0
    return gather + model.matmul(max(r, 1), seg.width)


def _boundaries(s: Structure) -> list[int]:
    cuts = {0, s.out_features}
    for b in s.blocks:
        for sp in b.rows:
            cuts.update((sp.start, sp.stop))
    return sorted(cuts)


def plan_segments(s: Structure, model: CostModel) -> list[Segment]:
    """Row segments covering [0, n_out), in order, merged greedily while the estimate drops."""
    cuts = _boundaries(s)
    segs = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        cover = tuple(i for i, blk in enumerate(s.blocks) if any(sp.start <= a and b <= sp.stop for sp in blk.rows))
        segs.append(Segment(a, b, cover))
    if not any(g.blocks for g in segs):
        return [Segment(0, s.out_features, ())]

    def merged(x: Segment, y: Segment) -> Segment:
        return Segment(x.start, y.stop, tuple(sorted(set(x.blocks) | set(y.blocks))))

    while len(segs) > 1:
        best, gain = None, 0.0
        for i in range(len(segs) - 1):
            x, y = segs[i], segs[i + 1]
            g = _segment_cost(model, s, x) + _segment_cost(model, s, y) - _segment_cost(model, s, merged(x, y))
            if not x.blocks or not y.blocks:
                g = float("inf")  # an uncovered segment has nothing to compute it from
            if g > gain:
                best, gain = i, g
        if best is None:
            break
        segs[best : best + 2] = [merged(segs[best], segs[best + 1])]
    return segs


def _codes_cost(model: CostModel, s: Structure, tiles: frozenset[int]) -> float:
    full = [b for b in s.blocks if is_full_width(b, s.in_features)]
    t = model.matmul(s.in_features, sum(b.rank for b in full)) if full else 0.0
    for i, b in enumerate(s.blocks):
        if not is_full_width(b, s.in_features):
            t += model.block_codes(b, s.in_features, i in tiles)
    return t


def segmented_cost(model: CostModel, s: Structure, bias: bool, tiles: frozenset[int] = frozenset()) -> float:
    """Estimated seconds of the segmented lowering of a layer."""
    segs = plan_segments(s, model)
    t = _codes_cost(model, s, tiles) + sum(_segment_cost(model, s, g) for g in segs)
    if len(segs) > 1:
        t += model.copy(s.out_features)
    return t + (model.copy(s.out_features) if bias else 0.0)


DEFAULT_COST_MODEL = CostModel()


def lowering_decision(
    s: Structure,
    bias: bool,
    tiles: frozenset[int] = frozenset(),
    model: CostModel = DEFAULT_COST_MODEL,
    *,
    measured: Mapping[str, float] | None = None,
    margin: float = 1.0,
    flops: bool = True,
) -> tuple[str, float]:
    """(strategy, seconds): how one GBLR layer is lowered, structured or dense -- the one place that decides.

    1. Dense when no structured lowering can be faster: no blocks, or (``flops``) at least as many
       multiply-adds as dense (:func:`dense_by_flops`).
    2. Else the fastest structured lowering whose seconds are below its margin x the dense seconds,
       else dense.  The seconds are ``model``'s estimates with its margins (``model.best``: stacked_margin
       for stacked, dense_margin for the others), or with ``measured`` ({strategy: seconds}, timed by
       lower-timed) the measured times with the one ``margin`` (ties: the first strategy by name).

    ``flops=False`` skips the FLOP rule: choose-products compares the estimates of a layer before and
    after a tile switch, and the decision after it (dense-fallback, lower-gblr) applies the rule.
    """
    if not s.blocks or (flops and dense_by_flops(s)):
        return "dense", (model.dense(s, bias) if measured is None else measured.get("dense", float("nan")))
    if measured is None:
        return model.best(s, bias, tiles)
    name = _fastest_below_margin({k: measured[k] for k in sorted(measured)}, measured.get("dense"), lambda k: margin)
    return name, measured.get(name, float("nan"))


def lowered_estimate(s: Structure, bias: bool, model: CostModel = DEFAULT_COST_MODEL) -> tuple[str, float]:
    """(strategy, estimated seconds) of the layer as the default pipeline lowers it: blocks merged where
    the model says it pays (merge-blocks), then :func:`lowering_decision` (dense-fallback, lower-gblr).
    The per-block tile switch of choose-products is left out (it only lowers the estimate further).
    The learning side's time budget (``compress --budget-unit time``) charges this."""
    from gblrc.ir.merge import merge_structure

    merged = merge_structure(s, lambda b: model.block_codes(b, s.in_features))
    return lowering_decision(merged, bias, model=model)
