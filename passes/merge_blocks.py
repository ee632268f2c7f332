"""merge-blocks: merge GBLR blocks into fewer, larger zero-padded blocks when the cost model says it pays."""

from __future__ import annotations

from .base import Pass, PassResult, gblr_nodes, read_gblr_node
from .build import write_gblr_node
from .cost_model import CostModelPass
from gblrc.ir.merge import merge_blocks


class MergeBlocks(CostModelPass, Pass):
    name = "merge-blocks"
    description = "merge blocks into their zero-padded union where fewer, larger products are faster"

    def run(self, graph):
        merged = 0
        for node in gblr_nodes(graph):
            w = read_gblr_node(node)
            n_in = w.structure.in_features
            new = merge_blocks(w, lambda b: self.model.block_codes(b, n_in))
            d = len(w.structure.blocks) - len(new.structure.blocks)
            if d > 0:
                write_gblr_node(graph, node, new)
                merged += d
        return PassResult(graph, merged > 0, {"blocks_merged": merged})
