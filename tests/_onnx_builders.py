"""Test helpers: random GBLR weights and one-node ONNX models holding a GBLRLinear node."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gblrc.ir.structure import (
    ONNX_DOMAIN,
    ONNX_OP,
    GBLRWeights,
    Structure,
    cyclic_spans,
    merge_same_intervals,
    pack_factors,
    to_onnx_attributes,
)


def random_weights(
    rng: np.random.Generator,
    n_in: int,
    n_out: int,
    K: int,
    r: int = 1,
    bias: bool = True,
    zero_frac: float = 0.1,
    full_frac: float = 0.1,
    max_col_frac: float = 1.0,
) -> GBLRWeights:
    """K random rank-r components on cyclic intervals (so they may wrap around, overlap, be empty or full);
    components on the same intervals are grouped into one block.  Column widths are at most
    max(1, max_col_frac * n_in) unless full."""
    comps = []
    for _ in range(K):

        def interval(n, frac=1.0):
            u = rng.random()
            hi = max(1, int(frac * n))
            w = 0 if u < zero_frac else n if u < zero_frac + full_frac else int(rng.integers(1, hi + 1))
            return cyclic_spans(int(rng.integers(0, n)), w, n)

        rows, cols = interval(n_out), interval(n_in, max_col_frac)
        if not rows or not cols:
            continue
        nr, nc = sum(len(s) for s in rows), sum(len(s) for s in cols)
        comps.append((rows, cols, rng.standard_normal((nr, r)), rng.standard_normal((r, nc))))
    blocks, U, V = merge_same_intervals(comps)
    b = rng.standard_normal(n_out) if bias else None
    return GBLRWeights(Structure(n_in, n_out, tuple(blocks)), tuple(U), tuple(V), b).validate()


def factor_inputs(w: GBLRWeights) -> tuple[list, list[str]]:
    """(initializers, node input names) of a GBLR node reading X: X, U_flat, V_flat[, bias]."""
    u, v = pack_factors(w)
    inits = [numpy_helper.from_array(u, "U_flat"), numpy_helper.from_array(v, "V_flat")]
    ins = ["X", "U_flat", "V_flat"]
    if w.bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(w.bias, np.float32), "bias"))
        ins.append("bias")
    return inits, ins


def gblr_model(w: GBLRWeights, lead: int = 1, opset: int = 17) -> onnx.ModelProto:
    """One GBLRLinear node; X has `lead` dynamic leading dims and float32 I/O."""
    s = w.structure
    inits, ins = factor_inputs(w)
    dims = [f"d{i}" for i in range(lead)]
    node = helper.make_node(ONNX_OP, ins, ["Y"], name="layer0", domain=ONNX_DOMAIN, **to_onnx_attributes(s))
    g = helper.make_graph(
        [node],
        "g",
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


def fixed_weights(n_in: int, n_out: int, blocks, bias: bool = True, seed: int = 0) -> GBLRWeights:
    """Random factors for a given list of Blocks."""
    rng = np.random.default_rng(seed)
    s = Structure(n_in, n_out, tuple(blocks)).validate()
    U = tuple(rng.standard_normal((b.n_rows, b.rank)) for b in s.blocks)
    V = tuple(rng.standard_normal((b.rank, b.n_cols)) for b in s.blocks)
    return GBLRWeights(s, U, V, rng.standard_normal(n_out) if bias else None).validate()


def max_rel_err(model: onnx.ModelProto, w: GBLRWeights, x: np.ndarray, optimize: bool = False) -> float:
    """max |ORT(model)(x) - reference| / scale, the reference computed in float64 (GBLRWeights.apply).

    scale = max (|x| @ |W|^T + |bias|) (>= max |reference|): the size of the terms summed, the scale of
    float32 rounding error.  Plain max |reference| fails on outputs that cancel (hypothesis found a single
    output made of two nearly opposite terms, 1.2e-5 relative) although every term is exact to float32."""
    x64 = x.astype(np.float32).astype(np.float64)
    ref = w.apply(x64)
    y = ort_run(model, x.astype(np.float32), optimize)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    mag = np.abs(x64) @ np.abs(w.dense()).T + (0 if w.bias is None else np.abs(w.bias))
    scale = max(float(np.max(mag, initial=0.0)), 1e-30)
    return float(np.abs(y - ref).max(initial=0.0) / scale)


def assert_matches(model: onnx.ModelProto, w: GBLRWeights, lead=(4,), rtol: float = 1e-5) -> None:
    x = np.random.default_rng(1).standard_normal(tuple(lead) + (w.structure.in_features,)).astype(np.float32)
    for optimize in (False, True):
        err = max_rel_err(model, w, x, optimize)
        assert err <= rtol, (err, optimize, op_counts(model))


def chain_model(ws: list[GBLRWeights], names: list[str]) -> onnx.ModelProto:
    """X -> GBLRLinear -> Relu -> GBLRLinear -> ... (one Relu between consecutive layers), 2 dynamic leading dims."""
    nodes, inits, cur = [], [], "X"
    for i, (w, name) in enumerate(zip(ws, names)):
        u, v = pack_factors(w)
        ins = [cur, f"u{i}", f"v{i}"]
        inits += [numpy_helper.from_array(u, f"u{i}"), numpy_helper.from_array(v, f"v{i}")]
        if w.bias is not None:
            inits.append(numpy_helper.from_array(np.asarray(w.bias, np.float32), f"b{i}"))
            ins.append(f"b{i}")
        out = "Y" if i == len(ws) - 1 else f"h{i}"
        nodes.append(
            helper.make_node(ONNX_OP, ins, [out], name=name, domain=ONNX_DOMAIN, **to_onnx_attributes(w.structure))
        )
        if out != "Y":
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            cur = f"r{i}"
    g = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["a", "b", ws[0].structure.in_features])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["a", "b", ws[-1].structure.out_features])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ONNX_DOMAIN, 1)])
