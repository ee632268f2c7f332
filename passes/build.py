"""Small helpers that append standard ONNX nodes to an onnx-graphsurgeon graph."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from gblrc.ir.structure import GBLRWeights, pack_factors, to_onnx_attributes

__all__ = ["Builder", "write_gblr_node", "detach", "unique_prefix"]


def unique_prefix(graph: gs.Graph, base: str) -> str:
    """`base`, or `base_<k>` for the smallest k, such that no tensor or node name starts with it + '/'.

    Deterministic (the same graph gives the same names), and unnamed or equally named nodes
    never produce clashing tensor names."""
    taken = {n.name for n in graph.nodes} | set(graph.tensors().keys())
    taken_prefixes = {t.split("/", 1)[0] for t in taken if "/" in t}
    cand, k = base, 0
    while cand in taken_prefixes:
        k += 1
        cand = f"{base}_{k}"
    return cand


class Builder:
    """Appends nodes named `<prefix>/<op>_<i>`; the last op can write into a given output tensor."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix, self.i = graph, prefix, 0

    def _name(self, op: str) -> str:
        self.i += 1
        return f"{self.prefix}/{op}_{self.i}"

    def const(self, values: np.ndarray, dtype=np.float32) -> gs.Constant:
        return gs.Constant(self._name("const"), np.ascontiguousarray(values, dtype=dtype))

    def node(self, op: str, inputs: list, out: gs.Variable | None = None, **attrs) -> gs.Variable:
        name = self._name(op)
        out = out if out is not None else gs.Variable(f"{name}:0", dtype=np.float32)
        self.graph.nodes.append(gs.Node(op, name, attrs=attrs, inputs=inputs, outputs=[out]))
        return out

    def matmul(self, x, W: np.ndarray, out=None) -> gs.Variable:
        return self.node("MatMul", [x, self.const(W)], out)

    def slice_last(self, x, start: int, stop: int) -> gs.Variable:
        i64 = lambda v: self.const(np.array([v]), np.int64)
        return self.node("Slice", [x, i64(start), i64(stop), i64(-1)])

    def concat_last(self, xs: list, out=None) -> gs.Variable:
        return xs[0] if len(xs) == 1 and out is None else self.node("Concat", list(xs), out, axis=-1)

    def add_bias(self, y, bias: np.ndarray | None, out=None) -> gs.Variable:
        if bias is None:
            return y
        return self.node("Add", [y, self.const(bias)], out)

    def final_matmul(self, z, W: np.ndarray, bias: np.ndarray | None, out: gs.Variable) -> None:
        """out = z @ W (+ bias), writing into the original output tensor (reused, so consumers stay wired)."""
        if bias is None:
            self.matmul(z, W, out)
        else:
            self.add_bias(self.matmul(z, W), bias, out)


def detach(node: gs.Node) -> None:
    """Disconnect a replaced node so that graph.cleanup() drops it."""
    node.inputs.clear()
    node.outputs.clear()


def write_gblr_node(graph: gs.Graph, node: gs.Node, w: GBLRWeights) -> None:
    """Rewrite a GBLRLinear node in place with new structure and factors."""
    u, v = pack_factors(w)
    attrs = to_onnx_attributes(w.structure)
    node.attrs.clear()
    node.attrs.update(attrs)
    x = node.inputs[0]
    node.inputs.clear()  # the old factors are no longer referenced (their names become free)
    node.inputs.append(x)
    p = unique_prefix(graph, (node.name or "gblr").replace("/", "_"))
    node.inputs.extend([gs.Constant(f"{p}/U_flat", u), gs.Constant(f"{p}/V_flat", v)])
    if w.bias is not None:
        node.inputs.append(gs.Constant(f"{p}/bias", np.asarray(w.bias, dtype=np.float32)))
