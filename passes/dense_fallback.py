"""dense-fallback: a GBLR layer whose best lowering is not faster than one dense MatMul becomes that MatMul."""
from __future__ import annotations

from .base import Pass, PassResult, gblr_nodes, read_gblr_node
from .choose_products import is_tile
from .cost_model import CostModelPass
from .lower_gblr import lower_node


class DenseFallback(CostModelPass, Pass):
    name = "dense-fallback"
    description = "replace a GBLR layer by one dense MatMul (+Add) when that is estimated faster or cheaper"
    def run(self, graph):
        n = 0
        for node in gblr_nodes(graph):
            w = read_gblr_node(node)
            tiles = frozenset(i for i, v in enumerate(w.V) if is_tile(v))
            strategy, _ = self.model.best(w.structure, w.bias is not None, tiles)
            if strategy == "dense" or w.structure.cost() >= w.structure.dense_cost:
                lower_node(graph, node, w, "dense")
                n += 1
        if n:
            graph.cleanup().toposort()
        return PassResult(graph, n > 0, {"dense_layers": n})
