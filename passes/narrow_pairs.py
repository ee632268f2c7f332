"""narrow-pairs: a GBLRLinear that reads one interval of its input columns, fed through elementwise ops by
another GBLRLinear, gets that interval alone: the producer computes only those rows, the ops run on the
narrow tensor, the consumer's columns shift to start at 0.

This is what makes kept FFN neurons cost what the budget charges (issue 28; docs/design.md §1,
"Block-sparse by neurons"): the down layer of a pruned FFN pair reads columns [0, k) of the intermediate
tensor, so the up layer computes rows [0, k) only and the activation runs on k features, not f -- no
padding to f, no Slice back to k.  The function is unchanged: the columns the consumer never reads are
never computed, whatever the activation makes of them.

The ops between the two nodes must be elementwise per feature (:data:`ELEMENTWISE`), their other inputs
scalar constants or tensors of the same subgraph (the exact GELU reads its input twice), and nothing
outside the subgraph may read its tensors (a graph output, a residual).  Each rewrite narrows both nodes'
structures (:func:`narrow_rows`, :func:`narrow_cols`) and the shapes of the tensors in between.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from gblrc.ir.structure import Block, GBLRWeights, Span, Structure

from .base import Pass, PassResult, gblr_nodes, read_gblr_node
from .build import write_gblr_node

__all__ = ["NarrowPairs", "ELEMENTWISE", "read_interval", "narrow_rows", "narrow_cols"]

# ops that act on each feature alone (with scalar constants, or other tensors of the same elementwise subgraph)
ELEMENTWISE = frozenset(
    {
        "Abs", "Add", "Cast", "Celu", "Div", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid", "HardSwish",
        "Identity", "LeakyRelu", "Log", "Mish", "Mul", "Neg", "Pow", "Relu", "Selu", "Sigmoid", "Softplus",
        "Softsign", "Sqrt", "Sub", "Tanh", "ThresholdedRelu",
    }
)  # fmt: skip


def read_interval(s: Structure) -> tuple[int, int] | None:
    """[a, b) when the columns the blocks of ``s`` read are within one interval shorter than the input (the
    smallest such interval), else None (the whole input, or no blocks)."""
    idx = [b.col_index() for b in s.blocks]
    if not idx:
        return None
    cols = np.unique(np.concatenate(idx))
    a, b = int(cols[0]), int(cols[-1]) + 1
    return (a, b) if b - a < s.in_features else None


def narrow_rows(w: GBLRWeights, a: int, b: int) -> GBLRWeights:
    """``w`` computing output rows [a, b) only (out_features b - a): each block's rows clipped to the interval
    and shifted, blocks outside it dropped, the bias sliced."""
    s = w.structure
    blocks, Us, Vs = [], [], []
    for blk, u, v in zip(s.blocks, w.U, w.V):
        rows = blk.row_index()
        keep = (rows >= a) & (rows < b)
        if not keep.any():
            continue
        spans = _spans(rows[keep] - a)
        blocks.append(Block(spans, blk.cols, blk.rank))
        Us.append(u[keep])  # (U rows follow the block rows, whose order the spans keep)
        Vs.append(v)
    bias = None if w.bias is None else w.bias[a:b]
    return GBLRWeights(Structure(s.in_features, b - a, tuple(blocks)), tuple(Us), tuple(Vs), bias).validate()


def narrow_cols(w: GBLRWeights, a: int, b: int) -> GBLRWeights:
    """``w`` reading input columns [a, b) only (in_features b - a): every block's columns shifted by -a (they
    must all lie in the interval)."""
    s = w.structure
    blocks = []
    for blk in s.blocks:
        cols = blk.col_index()
        if cols.min() < a or cols.max() >= b:
            raise ValueError(f"a block reads columns outside [{a}, {b})")
        blocks.append(Block(blk.rows, tuple(Span(sp.start - a, sp.stop - a) for sp in blk.cols), blk.rank))
    return GBLRWeights(Structure(b - a, s.out_features, tuple(blocks)), w.U, w.V, w.bias).validate()


def _spans(idx: np.ndarray) -> tuple[Span, ...]:
    """Sorted-run spans of the index list ``idx`` in its order (consecutive runs become one span)."""
    out, start = [], 0
    for i in range(1, len(idx) + 1):
        if i == len(idx) or idx[i] != idx[i - 1] + 1:
            out.append(Span(int(idx[start]), int(idx[i - 1]) + 1))
            start = i
    return tuple(out)


def _scalar(t) -> bool:
    """A constant of one value: an initializer, or the output of a Constant node (as torch exports them)."""
    if isinstance(t, gs.Constant):
        return int(np.asarray(t.values).size) == 1
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        return v is not None and int(np.asarray(getattr(v, "values", v)).size) == 1
    return False


def _between(graph: gs.Graph, up: gs.Node, down: gs.Node) -> list[gs.Node] | None:
    """The elementwise nodes from ``up``'s output to ``down``'s input (in a valid order), or None when the
    tensors in between are read by anything else, leave the graph, or pass through a non-elementwise op."""
    start, end = up.outputs[0], down.inputs[0]
    inside, tensors, todo = [], {start.name}, [start]
    outputs = {t.name for t in graph.outputs}
    while todo:
        t = todo.pop()
        if t.name in outputs:
            return None
        if t is end:
            if len(t.outputs) != 1:  # read by ``down`` alone
                return None
            continue
        for n in t.outputs:
            if n in inside:
                continue
            if n.op not in ELEMENTWISE or (n.domain or "") not in ("", "ai.onnx") or len(n.outputs) != 1:
                return None
            inside.append(n)
            tensors.add(n.outputs[0].name)
            todo.append(n.outputs[0])
    if end.name not in tensors:
        return None
    for n in inside:  # every other input a scalar constant or a tensor of the subgraph
        if any(not (_scalar(t) or t.name in tensors) for t in n.inputs):
            return None
    return inside


class NarrowPairs(Pass):
    name = "narrow-pairs"
    description = (
        "a GBLRLinear reading one interval of its input, fed elementwise by another: compute that interval only"
    )
    requires = frozenset({"gblr-nodes-valid"})

    def run(self, graph):
        producers = {n.outputs[0].name: n for n in gblr_nodes(graph)}
        narrowed = saved = 0
        for down in gblr_nodes(graph):
            wd = read_gblr_node(down)
            iv = read_interval(wd.structure)
            if iv is None:
                continue
            up = self._producer(down, producers)
            if up is None:
                continue
            wu = read_gblr_node(up)
            if wu.structure.out_features != wd.structure.in_features:
                continue
            chain = _between(graph, up, down)
            if chain is None:
                continue
            a, b = iv
            write_gblr_node(graph, up, narrow_rows(wu, a, b))
            write_gblr_node(graph, down, narrow_cols(wd, a, b))
            for t in [up.outputs[0]] + [n.outputs[0] for n in chain]:
                if t.shape is not None and len(t.shape) >= 1:
                    t.shape = list(t.shape[:-1]) + [b - a]
            narrowed += 1
            saved += wd.structure.in_features - (b - a)
        return PassResult(graph, narrowed > 0, {"pairs_narrowed": narrowed, "features_removed": saved})

    @staticmethod
    def _producer(down: gs.Node, producers: dict) -> gs.Node | None:
        """The GBLRLinear whose output reaches ``down``'s input through the nodes in between (walking back
        through single-input-tensor elementwise nodes), or None."""
        t, seen = down.inputs[0], 0
        while seen < 64:
            if t.name in producers:
                return producers[t.name]
            if not t.inputs:
                return None
            n = t.inputs[0]
            if n.op not in ELEMENTWISE:
                return None
            variables = [x for x in n.inputs if not _scalar(x)]
            if not variables:
                return None
            t, seen = variables[0], seen + 1
        return None
