"""lower-gblr-conv: replace each GBLRConv node (a convolution whose kernel matrix is GBLR) by standard Conv ops.

The kernel matrix W (out x in*kh*kw, column c*kh*kw + i*kw + j) is applied at every output position.
Strategies, chosen per node:

- dense:   Y = Conv(X, W.reshape(out, in, kh, kw), B)                    (one Conv)
- stacked: Z = Conv(X, V_stacked^T.reshape(R, in, kh, kw))               (R = total rank, zero-padded
           Y = Conv(Z, U_stacked^T.reshape(out, R, 1, 1), B)              stacked factors; 1x1 Conv)

Both use the node's strides, pads and dilations on the first Conv.  Stacked costs R*(in*kh*kw + out)
multiply-adds per output position against out*in*kh*kw for dense, but it ignores the widths (like the
stacked MatMul lowering) and its first Conv is thin; it is chosen only when it is clearly cheaper in
multiply-adds (at most ``flop_ratio`` x dense, default 0.75) *and* the cost model (per output position,
:class:`passes.cost_model.CostModel` matrix products) estimates it faster.  A node with no blocks lowers
to a zero kernel (+ bias), which keeps the output's shape.  The original output tensor is reused, so
consumers stay wired.  GBLRLinear nodes are left to lower-gblr / lower-timed.
"""

from __future__ import annotations

import numpy as np

from gblrc.ir.conv import ConvGeometry
from gblrc.ir.structure import GBLRWeights

from .base import Pass, PassResult, gblr_conv_nodes, read_gblr_conv_node
from .build import Builder, detach, unique_prefix
from .cost_model import DEFAULT_COST_MODEL, CostModel
from .lower_gblr import stacked_factors

__all__ = ["LowerGBLRConv", "lower_conv_node", "choose_conv_strategy", "CONV_STRATEGIES"]

CONV_STRATEGIES = ("dense", "stacked")


def _conv_attrs(g: ConvGeometry) -> dict:
    return {
        "kernel_shape": list(g.kernel_shape),
        "strides": list(g.strides),
        "pads": list(g.pads),
        "dilations": list(g.dilations),
    }


def _bias_input(bld: Builder, w: GBLRWeights) -> list:
    return [] if w.bias is None else [bld.const(np.asarray(w.bias).ravel())]


def _lower_dense(bld: Builder, x, w: GBLRWeights, g: ConvGeometry, out) -> None:
    s = w.structure
    kernel = w.dense(np.float64).reshape(s.out_features, g.in_channels(s.in_features), *g.kernel_shape)
    bld.node("Conv", [x, bld.const(kernel)] + _bias_input(bld, w), out, **_conv_attrs(g))


def _lower_stacked(bld: Builder, x, w: GBLRWeights, g: ConvGeometry, out) -> None:
    s = w.structure
    Vs, Us = stacked_factors(w)  # (n_in x R), (R x n_out)
    R = Vs.shape[1]
    kv = Vs.T.reshape(R, g.in_channels(s.in_features), *g.kernel_shape)
    z = bld.node("Conv", [x, bld.const(kv)], None, **_conv_attrs(g))
    ku = Us.T.reshape(s.out_features, R, 1, 1)
    bld.node("Conv", [z, bld.const(ku)] + _bias_input(bld, w), out, kernel_shape=[1, 1])


_LOWERINGS = {"dense": _lower_dense, "stacked": _lower_stacked}


def choose_conv_strategy(w: GBLRWeights, model: CostModel = DEFAULT_COST_MODEL, flop_ratio: float = 0.75) -> str:
    """ "stacked" when clearly fewer multiply-adds and estimated faster by ``model``, else "dense"."""
    s = w.structure
    n_in, n_out, R = s.in_features, s.out_features, s.total_rank
    if R == 0 or R * (n_in + n_out) > flop_ratio * n_in * n_out:
        return "dense"
    dense = model.matmul(n_in, n_out)
    stacked = model.matmul(n_in, R) + model.matmul(R, n_out)
    return "stacked" if stacked < dense else "dense"


def lower_conv_node(graph, node, w: GBLRWeights, g: ConvGeometry, strategy: str) -> None:
    """Replace ``node`` (a GBLRConv) by the subgraph of ``strategy``, writing into its output tensor."""
    if strategy not in _LOWERINGS:
        raise ValueError(f"unknown conv lowering strategy {strategy!r}; choose one of {list(CONV_STRATEGIES)}")
    x, out = node.inputs[0], node.outputs[0]
    if not w.structure.blocks:
        strategy = "dense"  # no blocks: a zero kernel (+ bias)
    detach(node)
    prefix = unique_prefix(graph, (node.name or "gblr_conv").replace("/", "_"))
    _LOWERINGS[strategy](Builder(graph, prefix), x, w, g, out)
    return strategy


class LowerGBLRConv(Pass):
    name = "lower-gblr-conv"
    description = "lower GBLRConv nodes to standard Conv ops (dense kernel, or V then 1x1 U convolutions)"
    requires = frozenset({"gblr-nodes-valid"})
    ensures = frozenset()

    def __init__(self, model: CostModel = DEFAULT_COST_MODEL, force: str | None = None, flop_ratio: float = 0.75):
        if force is not None and force not in _LOWERINGS:
            raise ValueError(f"unknown conv lowering strategy {force!r}; choose one of {list(CONV_STRATEGIES)}")
        self.model, self.force, self.flop_ratio = model, force, float(flop_ratio)

    @classmethod
    def from_config(cls, config):
        """The pass with ``config.cost_model`` (a gblrc.passes.base.PassConfig), no forced strategy."""
        return cls(config.cost_model)

    def run(self, graph):
        counts = {k: 0 for k in CONV_STRATEGIES}
        for node in gblr_conv_nodes(graph):
            w, g = read_gblr_conv_node(node)
            strategy = self.force or choose_conv_strategy(w, self.model, self.flop_ratio)
            counts[lower_conv_node(graph, node, w, g, strategy)] += 1
        changed = sum(counts.values()) > 0
        if changed:
            graph.cleanup().toposort()
        return PassResult(graph, changed, {f"lowered_conv_{k}": v for k, v in counts.items()})
