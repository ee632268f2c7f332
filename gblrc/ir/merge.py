"""Block merging as a pure function on the structure IR (no ONNX, no torch).

Merging blocks b1, b2 gives one block on rows R1 ∪ R2 and columns C1 ∪ C2 of
rank r1 + r2 whose factors are the originals zero-padded: the dense matrix is
unchanged exactly, the multiply-adds grow, the number of ops shrinks.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable

import numpy as np

from gblrc.ir.structure import Block, GBLRWeights, Span, Structure

__all__ = ["union_spans", "merge_pair", "plan_merges", "merge_structure", "merge_blocks"]


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


def plan_merges(s: Structure, block_cost: Callable[[Block], float], *, max_blocks: int = 4096) -> list[tuple[int, int]]:
    """The merges that :func:`merge_blocks` makes, as (i, j) block positions in the order applied (each
    position in the structure as it is after the merges before it).

    Greedily the pair of blocks whose union saves the most estimated cost, until none saves.
    ``block_cost(block)`` estimates the time of one block's share of the lowered layer.  Deterministic.
    A heap of the saving pairs with lazy deletion (a merged block gets a new id) makes it O(B^2 log B)
    for B blocks.  Structure only: the cost model on the learning side uses it without factors.
    """
    blocks = list(s.blocks)
    if len(blocks) < 2 or len(blocks) > max_blocks:
        return []
    order = list(range(len(blocks)))  # ids of the live blocks, in block order
    blk = dict(enumerate(blocks))
    cost = {i: block_cost(b) for i, b in blk.items()}
    heap: list[tuple[float, int, int]] = []

    def push(a: int, b: int) -> None:
        d = block_cost(_union_block(blk[a], blk[b])) - cost[a] - cost[b]
        if d < -1e-12:
            heapq.heappush(heap, (d, min(a, b), max(a, b)))

    for a, b in itertools.combinations(order, 2):
        push(a, b)
    plan = []
    next_id = len(blocks)
    while heap:
        _, a, b = heapq.heappop(heap)
        if a not in blk or b not in blk:
            continue  # stale: one of them was merged already
        i, j = order.index(a), order.index(b)
        plan.append((i, j))
        lo, hi = min(i, j), max(i, j)
        union = _union_block(blk[a], blk[b])
        for gone in (a, b):
            del blk[gone], cost[gone]
        new, next_id = next_id, next_id + 1
        order[lo] = new
        del order[hi]
        blk[new] = union
        cost[new] = block_cost(union)
        for k in order:
            if k != new:
                push(k, new)
    return plan


def merge_structure(s: Structure, block_cost: Callable[[Block], float], *, max_blocks: int = 4096) -> Structure:
    """The structure :func:`merge_blocks` would give (no factors needed)."""
    blocks = list(s.blocks)
    for i, j in plan_merges(s, block_cost, max_blocks=max_blocks):
        lo, hi = min(i, j), max(i, j)
        blocks[lo] = _union_block(blocks[i], blocks[j])
        del blocks[hi]
    return Structure(s.in_features, s.out_features, tuple(blocks))


def merge_blocks(w: GBLRWeights, block_cost: Callable[[Block], float], *, max_blocks: int = 4096) -> GBLRWeights:
    """Merge blocks as :func:`plan_merges` plans (zero-padded factors): the dense matrix is preserved exactly."""
    for i, j in plan_merges(w.structure, block_cost, max_blocks=max_blocks):
        w = merge_pair(w, i, j)
    return w
