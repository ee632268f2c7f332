"""Test helpers: random GBLR weights and one-node ONNX models holding a GBLRLinear node."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gblrc.structure import ONNX_DOMAIN, ONNX_OP, GBLRWeights, Structure, cyclic_spans, merge_same_intervals, pack_factors, to_onnx_attributes


def random_weights(rng: np.random.Generator, n_in: int, n_out: int, K: int, r: int = 1, bias: bool = True,
                   zero_frac: float = 0.1, full_frac: float = 0.1) -> GBLRWeights:
    comps = []
    for _ in range(K):
        def interval(n):
            u = rng.random()
            w = 0 if u < zero_frac else n if u < zero_frac + full_frac else int(rng.integers(1, n + 1))
            return cyclic_spans(int(rng.integers(0, n)), w, n)
        rows, cols = interval(n_out), interval(n_in)
        if not rows or not cols:
            continue
        nr, nc = sum(len(s) for s in rows), sum(len(s) for s in cols)
        comps.append((rows, cols, rng.standard_normal((nr, r)), rng.standard_normal((r, nc))))
    blocks, U, V = merge_same_intervals(comps)
    b = rng.standard_normal(n_out) if bias else None
    return GBLRWeights(Structure(n_in, n_out, tuple(blocks)), tuple(U), tuple(V), b).validate()


def gblr_model(w: GBLRWeights, lead: int = 1, opset: int = 17) -> onnx.ModelProto:
    """One GBLRLinear node; X has `lead` dynamic leading dims and float32 I/O."""
    s = w.structure
    u, v = pack_factors(w)
    inits = [numpy_helper.from_array(u, "U_flat"), numpy_helper.from_array(v, "V_flat")]
    ins = ["X", "U_flat", "V_flat"]
    if w.bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(w.bias, np.float32), "bias"))
        ins.append("bias")
    dims = [f"d{i}" for i in range(lead)]
    node = helper.make_node(ONNX_OP, ins, ["Y"], name="layer0", domain=ONNX_DOMAIN, **to_onnx_attributes(s))
    g = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, dims + [s.in_features])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, dims + [s.out_features])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ONNX_DOMAIN, 1)])


def ort_run(model: onnx.ModelProto, x: np.ndarray, optimize: bool = False) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out
