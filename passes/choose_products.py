"""choose-products: per block, two thin products (x V^T, then U) or one dense tile (x_cols, then U V)."""

from __future__ import annotations

import numpy as np

from gblrc.ir.structure import Block, GBLRWeights, Structure

from .base import Pass, PassResult, gblr_nodes, read_gblr_node
from .build import write_gblr_node
from .cost_model import CostModelPass, lowering_decision

__all__ = ["ChooseProducts", "is_tile", "tile_indices", "as_tile"]


def is_tile(v: np.ndarray) -> bool:
    """A block is a dense tile when its V factor is the identity (codes are the input columns)."""
    return v.shape[0] == v.shape[1] and np.array_equal(v, np.eye(v.shape[0], dtype=v.dtype))


def tile_indices(w: GBLRWeights) -> frozenset[int]:
    """The blocks of ``w`` that are dense tiles."""
    return frozenset(i for i, v in enumerate(w.V) if is_tile(v))


def as_tile(w: GBLRWeights, i: int) -> GBLRWeights:
    """Block i rewritten exactly as a tile: V = I (|C| x |C|), U = U_i V_i (|R| x |C|)."""
    s = w.structure
    b = s.blocks[i]
    tile = w.U[i].astype(np.float64) @ w.V[i].astype(np.float64)
    blocks, Us, Vs = list(s.blocks), list(w.U), list(w.V)
    blocks[i] = Block(b.rows, b.cols, b.n_cols)
    Us[i], Vs[i] = tile, np.eye(b.n_cols)
    return GBLRWeights(Structure(s.in_features, s.out_features, tuple(blocks)), tuple(Us), tuple(Vs), w.bias)


class ChooseProducts(CostModelPass, Pass):
    name = "choose-products"
    description = "per block, keep two thin products or switch to one dense tile, whichever the cost model prefers"

    def run(self, graph):
        tiles = 0
        for node in gblr_nodes(graph):
            w = read_gblr_node(node)
            changed = False
            for i in range(len(w.structure.blocks)):
                if is_tile(w.V[i]):
                    continue
                cand = as_tile(w, i)
                bias = w.bias is not None
                # judged on the whole layer's estimate: a tile raises the total rank, which a stacked lowering
                # pays for (the FLOP rule is dense-fallback's and lower-gblr's, after this pass)
                old = lowering_decision(w.structure, bias, tile_indices(w), self.model, flops=False)[1]
                new = lowering_decision(cand.structure, bias, tile_indices(cand), self.model, flops=False)[1]
                if new < old:
                    w, changed = cand, True
                    tiles += 1
            if changed:
                write_gblr_node(graph, node, w)
        return PassResult(graph, tiles > 0, {"tiles": tiles})
