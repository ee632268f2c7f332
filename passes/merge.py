"""Block merging as a pure function on the structure IR (no ONNX, no torch).

Merging blocks b1, b2 gives one block on rows R1 ∪ R2 and columns C1 ∪ C2 of
rank r1 + r2 whose factors are the originals zero-padded: the dense matrix is
unchanged exactly, the multiply-adds grow, the number of ops shrinks.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from gblrc.structure import Block, GBLRWeights, Span, Structure

__all__ = ["union_spans", "merge_pair", "merge_blocks"]


def union_spans(a: tuple[Span, ...], b: tuple[Span, ...]) -> tuple[Span, ...]:
    """Sorted union of two span sets; overlapping or touching spans fuse."""
    out: list[list[int]] = []
    for sp in sorted(a + b):
        if out and sp.start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], sp.stop)
        else:
            out.append([sp.start, sp.stop])
    return tuple(Span(s, e) for s, e in out)


def _place(index: np.ndarray, union: np.ndarray) -> np.ndarray:
    return np.searchsorted(union, index)


def merge_pair(w: GBLRWeights, i: int, j: int) -> GBLRWeights:
    """Merge blocks i and j of `w` (i != j) into one zero-padded block at position min(i, j)."""
    s = w.structure
    bi, bj = s.blocks[i], s.blocks[j]
    rows, cols = union_spans(bi.rows, bj.rows), union_spans(bi.cols, bj.cols)
    nb = Block(rows, cols, bi.rank + bj.rank)
    ridx, cidx = nb.row_index(), nb.col_index()
    dtype = np.result_type(w.U[i], w.U[j], w.V[i], w.V[j])
    U = np.zeros((nb.n_rows, nb.rank), dtype=dtype)
    V = np.zeros((nb.rank, nb.n_cols), dtype=dtype)
    U[_place(bi.row_index(), ridx), : bi.rank] = w.U[i]
    U[_place(bj.row_index(), ridx), bi.rank :] = w.U[j]
    V[: bi.rank, _place(bi.col_index(), cidx)] = w.V[i]
    V[bi.rank :, _place(bj.col_index(), cidx)] = w.V[j]
    lo, hi = min(i, j), max(i, j)
    blocks, Us, Vs = list(s.blocks), list(w.U), list(w.V)
    blocks[lo], Us[lo], Vs[lo] = nb, U, V
    del blocks[hi], Us[hi], Vs[hi]
    return GBLRWeights(Structure(s.in_features, s.out_features, tuple(blocks)), tuple(Us), tuple(Vs), w.bias)


def _union_block(a: Block, b: Block) -> Block:
    return Block(union_spans(a.rows, b.rows), union_spans(a.cols, b.cols), a.rank + b.rank)


def merge_blocks(w: GBLRWeights, block_cost: Callable[[Block], float], *, max_blocks: int = 512) -> GBLRWeights:
    """Greedily merge the pair of blocks whose union saves the most estimated cost, until none saves.

    ``block_cost(block)`` estimates the time of one block's share of the lowered layer.
    Deterministic; the dense matrix is preserved exactly.
    """
    blocks = list(w.structure.blocks)
    if len(blocks) < 2 or len(blocks) > max_blocks:
        return w
    cost = [block_cost(b) for b in blocks]

    def delta(i: int, j: int) -> float:
        return block_cost(_union_block(blocks[i], blocks[j])) - cost[i] - cost[j]

    pairs = {(i, j): delta(i, j) for i in range(len(blocks)) for j in range(i + 1, len(blocks))}
    while pairs:
        (i, j), d = min(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if d >= -1e-12:
            break
        w = merge_pair(w, i, j)
        blocks = list(w.structure.blocks)
        cost[i] = block_cost(blocks[i])
        del cost[j]
        # re-index pair deltas: drop pairs touching i or j, shift indices above j down by one
        shifted = {}
        for (a, b), v in pairs.items():
            if a in (i, j) or b in (i, j):
                continue
            a2, b2 = a - (a > j), b - (b > j)
            shifted[(a2, b2)] = v
        for k in range(len(blocks)):
            if k != i:
                shifted[(min(i, k), max(i, k))] = delta(min(i, k), max(i, k))
        pairs = shifted
    return w
