"""dense-fallback: a GBLR layer whose best lowering is not faster than one dense MatMul becomes that MatMul."""

from __future__ import annotations

from .base import Pass, PassResult, gblr_nodes, read_gblr_node
from .choose_products import tile_indices
from .cost_model import CostModelPass, lowering_decision
from .lower_gblr import lower_node


class DenseFallback(CostModelPass, Pass):
    name = "dense-fallback"
    description = "replace a GBLR layer by one dense MatMul (+Add) when that is estimated faster or cheaper"

    def run(self, graph):
        n = 0
        for node in gblr_nodes(graph):
            w = read_gblr_node(node)
            if lowering_decision(w.structure, w.bias is not None, tile_indices(w), self.model)[0] == "dense":
                lower_node(graph, node, w, "dense")
                n += 1
        if n:
            graph.cleanup().toposort()
        return PassResult(graph, n > 0, {"dense_layers": n})
