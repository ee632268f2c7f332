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

import numpy as np

from gblrc.ir.structure import GBLRWeights

from .build import Builder
from .choose_products import is_tile
from .cost_model import DEFAULT_COST_MODEL, CostModel, is_full_width, plan_segments

__all__ = ["lower_segmented"]


def lower_segmented(bld: Builder, x, w: GBLRWeights, out, model: CostModel | None = None) -> None:
    """Append the segmented subgraph computing ``out`` from ``x``."""

    s = w.structure
    segs = plan_segments(s, model or DEFAULT_COST_MODEL)
    full = [i for i, b in enumerate(s.blocks) if is_full_width(b, s.in_features)]
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
        Ug = np.zeros((g.rank(s), g.width))
        off = 0
        for i in g.blocks:
            b = s.blocks[i]
            rows = b.row_index()
            sel = (rows >= g.start) & (rows < g.stop)
            Ug[off : off + b.rank, rows[sel] - g.start] = w.U[i][sel].T
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
