"""cleanup: remove dead nodes, fold constants, sort topologically, infer shapes."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .base import Pass, PassResult, gblr_conv_nodes, gblr_nodes


class Cleanup(Pass):
    name = "cleanup"
    description = "graph-surgeon cleanup + constant folding + toposort + ONNX shape inference"
    requires = frozenset()
    ensures = frozenset()

    def run(self, graph):
        before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        graph.fold_constants(error_ok=True).cleanup().toposort()
        if not gblr_nodes(graph) and not gblr_conv_nodes(graph):
            model = gs.export_onnx(graph)
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
            graph = gs.import_onnx(model)
        removed = before - len(graph.nodes)
        return PassResult(graph, removed > 0, {"nodes_removed": removed})
