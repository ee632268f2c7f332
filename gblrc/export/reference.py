"""A plainly correct stand-in for GBLRLinear nodes, used only to *check* graphs that still hold them.

Each ``gblrc::GBLRLinear`` node becomes ``MatMul(X, W^T) [+ bias]`` with W the dense matrix the
node's structure and factors define (each ``gblrc::GBLRConv`` node one ``Conv`` with the kernel
``W.reshape(out, in, kh, kw)``) (:meth:`gblrc.ir.structure.GBLRWeights.dense`), so the whole
graph runs in ONNX Runtime.  This is the definition of the node, not an optimisation: the
passes in gblrc.passes do the real lowering.  (onnx.reference is not used: its GatherElements
fails on BERT graphs.)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gblrc.ir.conv import ONNX_CONV_OP, conv_from_onnx_attributes
from gblrc.ir.structure import ONNX_DOMAIN, ONNX_OP, from_onnx_attributes, unpack_factors

__all__ = ["dense_reference_model", "reference_run", "REFERENCE_NOTE"]

REFERENCE_NOTE = "GBLRLinear evaluated as dense MatMul"


def dense_reference_model(model: onnx.ModelProto, only=None) -> onnx.ModelProto:
    """A copy of ``model`` with every GBLRLinear node replaced by its dense MatMul (+ Add).

    only: a predicate on the node; when given, only the nodes it accepts are replaced (and the gblrc
    opset import is kept when others remain)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    nodes = []
    for n in g.node:
        if n.domain == ONNX_DOMAIN and n.op_type == ONNX_CONV_OP and (only is None or only(n)):
            nodes.append(_dense_conv(n, g, inits))
            continue
        if not (n.domain == ONNX_DOMAIN and n.op_type == ONNX_OP) or (only is not None and not only(n)):
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        arr = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
        w = unpack_factors(from_onnx_attributes(attrs), arr(n.input[1]), arr(n.input[2])).dense(np.float64)
        dtype = numpy_helper.to_array(inits[n.input[1]]).dtype
        wt = f"{n.output[0]}__gblrc_dense_wt"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T.astype(dtype)), wt))
        if len(n.input) > 3 and n.input[3]:
            mm = f"{n.output[0]}__gblrc_dense_mm"
            nodes.append(helper.make_node("MatMul", [n.input[0], wt], [mm]))
            nodes.append(helper.make_node("Add", [mm, n.input[3]], [n.output[0]]))
        else:
            nodes.append(helper.make_node("MatMul", [n.input[0], wt], [n.output[0]]))
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    if any(n.domain == ONNX_DOMAIN for n in g.node):
        return out
    ops = [o for o in out.opset_import if o.domain != ONNX_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(ops)
    return out


def _dense_conv(n: onnx.NodeProto, g: onnx.GraphProto, inits: dict) -> onnx.NodeProto:
    """A GBLRConv node as one Conv with its dense kernel (+ its bias input)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    s, geo = conv_from_onnx_attributes(attrs)
    arr = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
    w = unpack_factors(s, arr(n.input[1]), arr(n.input[2])).dense(np.float64)
    k = w.reshape(s.out_features, geo.in_channels(s.in_features), *geo.kernel_shape)
    name = f"{n.output[0]}__gblrc_dense_kernel"
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(k.astype(arr(n.input[1]).dtype)), name))
    ins = [n.input[0], name] + ([n.input[3]] if len(n.input) > 3 and n.input[3] else [])
    return helper.make_node(
        "Conv",
        ins,
        [n.output[0]],
        kernel_shape=list(geo.kernel_shape),
        strides=list(geo.strides),
        pads=list(geo.pads),
        dilations=list(geo.dilations),
    )


def reference_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """Outputs of ``model`` (GBLRLinear nodes included) in ONNX Runtime, via the dense stand-in."""
    from gblrc.runtime import make_session

    return make_session(dense_reference_model(model), log=False, exact=True).run(None, feeds)
