"""The "segmented" lowering: realise the row widths of a GBLR layer as well as its column widths.

The sliced lowering computes every block's codes from its column slice of X, then multiplies all
codes by one zero-padded U_stacked (R x n_out): it pays for the full output width of every block.
Here the output rows are cut into segments at every row-span boundary; each segment is produced by
the codes of the blocks that cover it only,

    Y[:, seg] = Concat(codes_b for b covering seg) @ U_seg          (R_seg x |seg|)
    Y = Concat(Y[:, seg] for seg in order) (+ bias)

so the products cost sum_b T r_b (|C_b| + |R_b|) multiply-adds, the layer's FLOP count.  Many narrow
segments mean many small MatMuls, so adjacent segments are merged (their block sets united) while
the cost model says that is cheaper; a segment no block covers is always merged into a neighbour.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gblrc.structure import GBLRWeights, Structure

from .build import Builder
from .choose_products import is_tile
from .cost_model import CostModel

__all__ = ["Segment", "plan_segments", "segmented_cost", "lower_segmented"]


@dataclass(frozen=True)
class Segment:
    """Output rows [start, stop) computed from the codes of ``blocks`` (block indices, sorted)."""

    start: int
    stop: int
    blocks: tuple[int, ...]

    @property
    def width(self) -> int:
        return self.stop - self.start


def _rank(s: Structure, blocks) -> int:
    return sum(s.blocks[i].rank for i in blocks)


def _segment_cost(model: CostModel, s: Structure, seg: Segment) -> float:
    r = _rank(s, seg.blocks)
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
        segs[best:best + 2] = [merged(segs[best], segs[best + 1])]
    return segs


def _codes_cost(model: CostModel, s: Structure, tiles: frozenset[int]) -> float:
    full = [b for b in s.blocks if b.n_cols == s.in_features and len(b.cols) == 1]
    t = model.matmul(s.in_features, sum(b.rank for b in full)) if full else 0.0
    for i, b in enumerate(s.blocks):
        if not (b.n_cols == s.in_features and len(b.cols) == 1):
            t += model.block_codes(b, s.in_features, i in tiles)
    return t


def segmented_cost(model: CostModel, s: Structure, bias: bool, tiles: frozenset[int] = frozenset()) -> float:
    """Estimated seconds of the segmented lowering of a layer."""
    segs = plan_segments(s, model)
    t = _codes_cost(model, s, tiles) + sum(_segment_cost(model, s, g) for g in segs)
    if len(segs) > 1:
        t += model.copy(s.out_features)
    return t + (model.copy(s.out_features) if bias else 0.0)


def lower_segmented(bld: Builder, x, w: GBLRWeights, out, model: CostModel | None = None) -> None:
    """Append the segmented subgraph computing ``out`` from ``x``."""
    from .cost_model import DEFAULT_COST_MODEL

    s = w.structure
    segs = plan_segments(s, model or DEFAULT_COST_MODEL)
    full = [i for i, b in enumerate(s.blocks) if b.n_cols == s.in_features and len(b.cols) == 1]
    codes: dict[int, object] = {}
    if full:
        Vf = np.concatenate([w.V[i][:, np.argsort(s.blocks[i].col_index())] for i in full], axis=0)
        shared = bld.matmul(x, Vf.T)
        off = 0
        for i in full:
            r = s.blocks[i].rank
            codes[i] = shared if len(full) == 1 else bld.slice_last(shared, off, off + r)
            off += r
    for i, b in enumerate(s.blocks):
        if i in codes:
            continue
        xc = bld.concat_last([bld.slice_last(x, sp.start, sp.stop) for sp in b.cols])
        codes[i] = xc if is_tile(w.V[i]) else bld.matmul(xc, w.V[i].T)
    products = []  # (codes, U_seg) per segment
    for g in segs:
        if not g.blocks:  # no block anywhere: Y = 0 (from any input column, times zeros)
            products.append((bld.slice_last(x, 0, 1), np.zeros((1, g.width))))
            continue
        Ug = np.zeros((_rank(s, g.blocks), g.width))
        off = 0
        for i in g.blocks:
            b = s.blocks[i]
            rows = b.row_index()
            sel = (rows >= g.start) & (rows < g.stop)
            Ug[off:off + b.rank, rows[sel] - g.start] = w.U[i][sel].T
            off += b.rank
        products.append((bld.concat_last([codes[i] for i in g.blocks]), Ug))
    if len(products) == 1:
        bld.final_matmul(*products[0], w.bias, out)
        return
    pieces = [bld.matmul(z, U) for z, U in products]
    if w.bias is None:
        bld.concat_last(pieces, out)
    else:
        bld.add_bias(bld.concat_last(pieces), w.bias, out)
