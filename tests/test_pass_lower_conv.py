"""lower-gblr-conv: GBLRConv nodes -> standard Conv ops (dense kernel or V conv + 1x1 U conv), checked in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from _onnx_builders import factor_inputs, op_counts, ort_run, random_weights
from gblrc import GBLRConv2d
from gblrc.ir.conv import ONNX_CONV_OP, ConvGeometry, conv_from_onnx_attributes, conv_to_onnx_attributes
from gblrc.export.graph import export_onnx
from gblrc.export.reference import reference_run
from gblrc.ir.structure import ONNX_DOMAIN, ONNX_OP, StructureError, pack_factors, to_onnx_attributes
from gblrc.passes import DEFAULT_PIPELINE, PASSES, TIMED_PIPELINE, PassError, run_pipeline
from gblrc.passes.base import PROPERTIES, import_graph, run_passes
from gblrc.passes.lower_gblr_conv import LowerGBLRConv, choose_conv_strategy

pytestmark = pytest.mark.usefixtures("one_thread")


def conv_node_model(w, geo: ConvGeometry, hw=(7, 9), extra_linear=None) -> onnx.ModelProto:
    """X (N, C, H, W) -> one GBLRConv node [-> Flatten -> GBLRLinear ``extra_linear``]."""
    s = w.structure
    c = geo.in_channels(s.in_features)
    inits, ins = factor_inputs(w)
    nodes = [
        helper.make_node(ONNX_CONV_OP, ins, ["Y"], name="conv0", domain=ONNX_DOMAIN, **conv_to_onnx_attributes(s, geo))
    ]
    ho, wo = geo.output_size(*hw)
    out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", s.out_features, ho, wo])
    if extra_linear is not None:
        lu, lv = pack_factors(extra_linear)
        inits += [numpy_helper.from_array(lu, "lu"), numpy_helper.from_array(lv, "lv")]
        nodes += [
            helper.make_node("Flatten", ["Y"], ["F"]),
            helper.make_node(
                ONNX_OP,
                ["F", "lu", "lv"],
                ["Z"],
                name="lin0",
                domain=ONNX_DOMAIN,
                **to_onnx_attributes(extra_linear.structure),
            ),
        ]
        out = helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["n", extra_linear.structure.out_features])
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", c, *hw])], [out], inits
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ONNX_DOMAIN, 1)])


def reference(w, geo: ConvGeometry, x: np.ndarray) -> tuple[np.ndarray, float]:
    """float64 PyTorch output and the scale of its terms (|x| conv |W| + |b|, for float32 rounding)."""
    s = w.structure
    k = torch.from_numpy(w.dense(np.float64).reshape(s.out_features, -1, *geo.kernel_shape))
    b = None if w.bias is None else torch.from_numpy(np.asarray(w.bias, np.float64))
    x64 = torch.from_numpy(x.astype(np.float32).astype(np.float64))
    t, l, bo, r = geo.pads
    conv = lambda xx, kk, bb: F.conv2d(F.pad(xx, (l, r, t, bo)), kk, bb, geo.strides, 0, geo.dilations)  # noqa: E731
    ref = conv(x64, k, b)
    mag = conv(x64.abs(), k.abs(), None if b is None else b.abs())
    return ref.numpy(), max(float(mag.max()), 1e-30)


GEOMETRIES = [
    ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1)),
    ConvGeometry((3, 3), (2, 2), (0, 0, 0, 0)),
    ConvGeometry((1, 1), (2, 1), (2, 2, 2, 2)),
    ConvGeometry((3, 2), (1, 2), (2, 0, 1, 1), (2, 1)),
]


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: f"k{g.kernel_shape}s{g.strides}p{g.pads}d{g.dilations}")
@pytest.mark.parametrize("force", ["dense", "stacked"])
def test_conv_node_lowers_to_standard_conv_ops_matching_float64(geo, force):
    rng = np.random.default_rng(hash((geo, force)) % 2**32)
    for seed in range(3):
        c_in, c_out = int(rng.integers(2, 6)), int(rng.integers(3, 9))
        w = random_weights(
            rng, c_in * geo.kernel_size, c_out, int(rng.integers(1, 6)), int(rng.integers(1, 3)), bias=seed != 1
        )
        m = conv_node_model(w, geo)
        out, res = run_passes(m, [LowerGBLRConv(force=force), PASSES["cleanup"]])
        onnx.checker.check_model(out, full_check=True)
        assert all(n.domain in ("", "ai.onnx") for n in out.graph.node)
        assert all(o.domain != ONNX_DOMAIN for o in out.opset_import)
        used = "dense" if not w.structure.blocks else force
        assert op_counts(out) == {"Conv": 1 if used == "dense" else 2}
        assert res[0].counts == {
            "lowered_conv_dense": int(used == "dense"),
            "lowered_conv_stacked": int(used == "stacked"),
        }
        x = rng.standard_normal((2, c_in, 7, 9)).astype(np.float32)
        ref, scale = reference(w, geo, x)
        y = ort_run(out, x)  # graph optimisations off
        assert y.shape == ref.shape
        assert np.abs(y - ref).max() <= 1e-5 * scale
        # the dense stand-in used to check graphs that keep the node agrees
        np.testing.assert_allclose(reference_run(m, {"X": x})[0], y, rtol=0, atol=1e-5 * scale)


def test_empty_structure_lowers_to_bias_only():
    w = random_weights(np.random.default_rng(0), 18, 4, 0)
    geo = ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1))
    out, _ = run_passes(conv_node_model(w, geo), [LowerGBLRConv(force="stacked")])
    x = np.random.default_rng(1).standard_normal((1, 2, 7, 9)).astype(np.float32)
    y = ort_run(out, x)
    np.testing.assert_allclose(y, np.broadcast_to(w.bias[None, :, None, None], y.shape), rtol=1e-6)


def test_strategy_by_flops_and_cost_model():
    rng = np.random.default_rng(0)
    from gblrc.ir.structure import Block, GBLRWeights, Span, Structure

    def full(n_in, n_out, R):
        s = Structure(n_in, n_out, (Block((Span(0, n_out),), (Span(0, n_in),), R),))
        return GBLRWeights(s, (rng.standard_normal((n_out, R)),), (rng.standard_normal((R, n_in)),), None)

    assert choose_conv_strategy(full(576, 64, 16)) == "stacked"  # 16 * 640 << 576 * 64
    assert choose_conv_strategy(full(576, 64, 56)) == "dense"  # 56 * 640 ~ 0.97 x dense
    assert choose_conv_strategy(full(144, 16, 2)) == "dense"  # few flops, but a thin (2-channel) conv


def test_pipeline_properties_and_counts_with_conv_and_linear_nodes():
    rng = np.random.default_rng(3)
    geo = ConvGeometry((3, 3), (2, 2), (1, 1, 1, 1))
    wc = random_weights(rng, 4 * 9, 6, 4, 2)
    wl = random_weights(rng, 6 * 4 * 5, 5, 3, 1, bias=False)
    m = conv_node_model(wc, geo, extra_linear=wl)
    g = import_graph(m)
    assert not PROPERTIES["standard-ops-only"](g)  # GBLRConv is not a standard op
    assert PROPERTIES["gblr-nodes-valid"](g)
    # the GBLRLinear passes leave the conv node alone; lower-gblr then cannot claim standard ops only
    with pytest.raises(PassError, match="standard-ops-only"):
        run_pipeline(m, ["merge-blocks", "choose-products", "dense-fallback", "lower-gblr"])
    out, res = run_pipeline(m)
    assert [r.name for r in res] == list(DEFAULT_PIPELINE)
    conv_res = res[DEFAULT_PIPELINE.index("lower-gblr-conv")]
    assert conv_res.counts["lowered_conv_dense"] + conv_res.counts["lowered_conv_stacked"] == 1
    onnx.checker.check_model(out, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in out.graph.node) and "Conv" in op_counts(out)
    x = rng.standard_normal((3, 4, 7, 9)).astype(np.float32)
    y = ort_run(out, x)
    h, scale = reference(wc, geo, x)
    ref = wl.apply(h.reshape(3, -1))
    assert np.abs(y - ref).max() <= 1e-5 * scale * np.abs(wl.dense()).sum(1).max()
    # the timed pipeline (gblrc lower --tune's order) lowers the conv node too, with the same numerics
    timed, _ = run_pipeline(m, list(TIMED_PIPELINE))
    assert all(n.domain in ("", "ai.onnx") for n in timed.graph.node)
    assert np.abs(ort_run(timed, x) - ref).max() <= 1e-5 * scale * np.abs(wl.dense()).sum(1).max()
    # lower-gblr-conv alone: the GBLRLinear node stays, the gblrc opset with it
    part, _ = run_pipeline(m, ["lower-gblr-conv"])
    assert [n.op_type for n in part.graph.node if n.domain == ONNX_DOMAIN] == [ONNX_OP]
    assert any(o.domain == ONNX_DOMAIN for o in part.opset_import)


def test_malformed_conv_node_is_rejected():
    w = random_weights(np.random.default_rng(0), 20, 4, 2)  # 20 columns: not a multiple of 3 x 3
    attrs = {**to_onnx_attributes(w.structure), "kernel_shape": [3, 3]}
    with pytest.raises(StructureError, match="multiple"):
        conv_from_onnx_attributes(attrs)
    m = conv_node_model(random_weights(np.random.default_rng(0), 18, 4, 2), ConvGeometry((3, 3)))
    node = m.graph.node[0]
    for a in node.attribute:
        if a.name == "kernel_shape":
            a.ints[:] = [2, 2]
    with pytest.raises(PassError, match="gblr-nodes-valid"):
        run_pipeline(m)
    with pytest.raises(ValueError, match="strategy"):
        LowerGBLRConv(force="sliced")


@pytest.mark.parametrize("stride,padding,k", [(1, 1, 3), (2, 0, 3), (2, 2, 1)])
def test_exported_gblr_conv2d_lowers_with_parity(stride, padding, k):
    torch.manual_seed(stride * 10 + padding)
    rng = np.random.default_rng(padding)
    m = GBLRConv2d(3, 8, k, stride, padding, num_components=5, rank_per_component=2)
    m.set_intervals(
        rng.integers(0, m.in_features + 1, 5),
        rng.integers(0, m.in_features, 5),
        rng.integers(0, 9, 5),
        rng.integers(0, 8, 5),
    )
    with torch.no_grad():
        m.bias.normal_()
    m.eval()
    x = torch.randn(2, 3, 6, 10)
    model = export_onnx(m, (x,))
    nodes = [n for n in model.graph.node if n.domain == ONNX_DOMAIN]
    assert [n.op_type for n in nodes] == [ONNX_CONV_OP]
    s, geo = conv_from_onnx_attributes({a.name: helper.get_attribute_value(a) for a in nodes[0].attribute})
    assert s == m.structure().structure and geo == m.geometry()
    ref = m.double()(x.double()).detach().numpy()
    for force in ("dense", "stacked"):
        out, _ = run_passes(model, [LowerGBLRConv(force=force), PASSES["cleanup"]])
        assert op_counts(out) == {"Conv": 1 if force == "dense" else 2}
        y = ort_run(out, x.numpy())
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
