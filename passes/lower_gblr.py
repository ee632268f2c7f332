"""lower-gblr: replace each GBLRLinear node by an explicit subgraph of standard ops.

Strategies (the cost model picks one per layer; never the naive padded sum):
- dense:   Y = X @ W^T                                   (one MatMul)
- stacked: Y = (X @ V_stacked) @ U_stacked               (two MatMuls; zero-padded n_in x R, R x n_out)
- sliced:  codes_b = Slice(X, C_b) @ V_b^T per block (full-width blocks share one MatMul, tiles skip it),
           Y = Concat(codes) @ U_stacked                 (realises the column widths)
- segmented: sliced codes, then each segment of output rows from the codes of the blocks covering it
           (realises the row widths too; lower_segmented.py)
plus Add(bias).  The original output tensor is reused, so consumers stay wired.
"""

from __future__ import annotations

import numpy as np

from gblrc.ir.structure import GBLRWeights

from .base import Pass, PassResult, gblr_nodes, read_gblr_node
from .build import Builder, detach, unique_prefix
from .choose_products import is_tile, tile_indices
from .cost_model import DEFAULT_COST_MODEL, CostModel, is_full_width, lowering_decision
from .lower_segmented import lower_segmented

__all__ = ["LowerGBLR", "lower_node", "stacked_factors"]


def stacked_factors(w: GBLRWeights) -> tuple[np.ndarray, np.ndarray]:
    """V_stacked (n_in x R) and U_stacked (R x n_out), zero-padded, block order."""
    s = w.structure
    R = s.total_rank
    Vs = np.zeros((s.in_features, R))
    Us = np.zeros((R, s.out_features))
    off = 0
    for b, u, v in zip(s.blocks, w.U, w.V):
        Vs[b.col_index(), off : off + b.rank] = v.T
        Us[off : off + b.rank, b.row_index()] = u.T
        off += b.rank
    return Vs, Us


def _lower_dense(bld: Builder, x, w: GBLRWeights, out) -> None:
    bld.final_matmul(x, w.dense().T, w.bias, out)


def _lower_stacked(bld: Builder, x, w: GBLRWeights, out) -> None:
    Vs, Us = stacked_factors(w)
    bld.final_matmul(bld.matmul(x, Vs), Us, w.bias, out)


def _lower_sliced(bld: Builder, x, w: GBLRWeights, out) -> None:
    s = w.structure
    full = [i for i, b in enumerate(s.blocks) if is_full_width(b, s.in_features)]
    part = [i for i in range(len(s.blocks)) if i not in full]
    order = full + part  # code order == row order of U_stacked
    codes = []
    if full:
        Vf = np.concatenate([w.V[i][:, np.argsort(s.blocks[i].col_index())] for i in full], axis=0)
        codes.append(bld.matmul(x, Vf.T))
    for i in part:
        b, v = s.blocks[i], w.V[i]
        pieces = [bld.slice_last(x, sp.start, sp.stop) for sp in b.cols]
        xc = bld.concat_last(pieces)
        codes.append(xc if is_tile(v) else bld.matmul(xc, v.T))
    Us = np.zeros((s.total_rank, s.out_features))
    off = 0
    for i in order:
        b = s.blocks[i]
        Us[off : off + b.rank, b.row_index()] = w.U[i].T
        off += b.rank
    z = bld.concat_last(codes)
    bld.final_matmul(z, Us, w.bias, out)


LOWERINGS = {"dense": _lower_dense, "stacked": _lower_stacked, "sliced": _lower_sliced, "segmented": lower_segmented}


def lower_node(graph, node, w: GBLRWeights, strategy: str, model: CostModel | None = None) -> None:
    """Replace ``node`` by the ``strategy`` subgraph; ``model`` plans the segments of "segmented"."""
    x, out = node.inputs[0], node.outputs[0]
    if not w.structure.blocks:
        strategy = "dense"  # no blocks: Y = X @ 0 (+ bias); keeps the output's shape and dtype
    detach(node)
    prefix = unique_prefix(graph, (node.name or "gblr").replace("/", "_"))
    bld = Builder(graph, prefix)
    if strategy == "segmented" and model is not None:
        lower_segmented(bld, x, w, out, model)
    else:
        LOWERINGS[strategy](bld, x, w, out)


class LowerGBLR(Pass):
    name = "lower-gblr"
    description = "lower GBLRLinear nodes to Slice/MatMul/Concat subgraphs (dense, stacked or sliced, by cost model)"
    requires = frozenset({"gblr-nodes-valid"})
    ensures = frozenset({"standard-ops-only"})

    def __init__(self, model: CostModel = DEFAULT_COST_MODEL, force: str | None = None):
        if force is not None and force not in LOWERINGS:
            raise ValueError(f"unknown lowering strategy {force!r}; choose one of {sorted(LOWERINGS)}")
        self.model, self.force = model, force

    @classmethod
    def from_config(cls, config):
        """The pass with ``config.cost_model`` (a gblrc.passes.base.PassConfig), no forced strategy."""
        return cls(config.cost_model)

    def run(self, graph):
        counts = {k: 0 for k in LOWERINGS}
        for node in gblr_nodes(graph):
            w = read_gblr_node(node)
            strategy = (
                self.force
                if self.force is not None
                else lowering_decision(w.structure, w.bias is not None, tile_indices(w), self.model)[0]
            )
            lower_node(graph, node, w, strategy, self.model)
            counts[strategy] += 1
        changed = sum(counts.values()) > 0
        if changed:
            graph.cleanup().toposort()
        return PassResult(graph, changed, {f"lowered_{k}": v for k, v in counts.items()})
