"""export_onnx: one gblrc::GBLRLinear node per GBLR layer, carrying exactly the layer's structure IR."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from _samples import randomize
from gblrc import GBLRLinear
from gblrc.export.graph import export_onnx
from gblrc.export.reference import reference_run
from gblrc.ir.structure import from_onnx_attributes, pack_factors, to_onnx_attributes


def random_layer(n_in, n_out, K, r, bias, seed, empty=False):
    rng = np.random.default_rng(seed)
    layer = GBLRLinear(n_in, n_out, num_components=K, rank_per_component=r, bias=bias)
    randomize(layer, rng, seed)
    if empty:
        layer.set_intervals([0] * K, [0] * K, [0] * K, [0] * K)
    return layer


def mlp(seed=0, bias=True):
    return nn.Sequential(
        random_layer(12, 20, 5, 2, bias, seed), nn.ReLU(), random_layer(20, 7, 4, 1, not bias, seed + 1)
    ).eval()


def gblr_nodes(model):
    return [n for n in model.graph.node if n.op_type == "GBLRLinear"]


def attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_one_node_per_layer_with_the_layer_structure():
    m = mlp()
    model = export_onnx(m, (torch.randn(3, 12),))
    nodes = gblr_nodes(model)
    assert len(nodes) == 2
    assert all(n.domain == "gblrc" for n in nodes)
    assert ("gblrc", 1) in {(o.domain, o.version) for o in model.opset_import}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node, layer in zip(nodes, (m[0], m[2])):
        ir = layer.structure()
        assert attrs(node) == to_onnx_attributes(ir.structure)
        assert from_onnx_attributes(attrs(node)) == ir.structure
        u, v = pack_factors(ir)
        np.testing.assert_array_equal(inits[node.input[1]], u)
        np.testing.assert_array_equal(inits[node.input[2]], v)
        assert inits[node.input[1]].dtype == np.float32
        if layer.bias is None:
            assert len(node.input) == 3
        else:
            np.testing.assert_array_equal(inits[node.input[3]], layer.bias.detach().numpy())
    onnx.checker.check_model(model, full_check=True)


def test_export_restores_the_module():
    m = mlp()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    export_onnx(m, (torch.randn(2, 12),))
    assert m.training and m[0].training  # mode restored
    assert "forward" not in m[0].__dict__  # patch removed
    after = m.state_dict()
    assert set(after) == set(before)  # no leftover buffers
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_empty_structure_layers_export_and_evaluate():
    """Layers with no blocks: Y = bias (or zeros); two such layers share equal (empty) factors."""
    m = nn.Sequential(
        random_layer(6, 5, 3, 1, True, 0, empty=True), nn.Tanh(), random_layer(5, 4, 2, 1, False, 1, empty=True)
    ).eval()
    x = torch.randn(4, 6)
    model = export_onnx(m, (x,))
    nodes = gblr_nodes(model)
    assert len(nodes) == 2
    inits = {i.name for i in model.graph.initializer}
    assert all(name in inits for n in nodes for name in n.input[1:])
    onnx.checker.check_model(model, full_check=True)
    (y,) = reference_run(model, {"input": x.numpy()})
    np.testing.assert_array_equal(y, np.zeros((4, 4), np.float32))
    with torch.no_grad():
        np.testing.assert_allclose(m[0](x).numpy(), np.broadcast_to(m[0].bias.numpy(), (4, 5)))


def test_named_inputs_and_dynamic_axes():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = random_layer(8, 6, 3, 1, True, 3), random_layer(8, 6, 3, 2, False, 4)

        def forward(self, x, z):
            return self.a(x) * self.b(z)

    ex = OrderedDict(x=torch.randn(2, 5, 8), z=torch.randn(2, 5, 8))
    model = export_onnx(Two().eval(), ex)
    assert [i.name for i in model.graph.input] == ["x", "z"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence", 8]
    out_dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == ["batch", "sequence", 6]
    assert len(gblr_nodes(model)) == 2


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), bias=st.booleans(), three_d=st.booleans())
def test_exported_graph_computes_the_layer(seed, bias, three_d):
    """The GBLRLinear node (evaluated with the IR's numpy kernel) equals PyTorch in float64."""
    m = mlp(seed, bias)
    shape = (2, 3, 12) if three_d else (5, 12)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    model = export_onnx(m, (x,))
    (y,) = reference_run(model, {"input": x.numpy()})
    with torch.no_grad():
        ref = m.double()(x.double()).numpy()
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_export_writes_file(tmp_path):
    p = tmp_path / "m.onnx"
    export_onnx(mlp(), (torch.randn(2, 12),), p)
    assert len(gblr_nodes(onnx.load(p))) == 2


# ------------------------------------------------------------- lowering round trip (gblrc.lower)
def _ort_run(path, feeds):
    from gblrc.runtime import make_session

    return make_session(path, log=False).run(None, feeds)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), bias=st.booleans(), three_d=st.booleans())
def test_lower_round_trip_matches_float64(tmp_path_factory, seed, bias, three_d):
    """Random structures, with/without bias, 2-D/3-D inputs: the lowered file runs in ORT (standard
    ops only), on a batch size other than the export's, and matches PyTorch in float64."""
    import gblrc

    m = mlp(seed, bias)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*((2, 3, 12) if three_d else (4, 12)), generator=g)
    path = tmp_path_factory.mktemp("low") / "m.onnx"
    rep = gblrc.lower(m, (x,), path)
    assert path.is_file() and rep.provider.endswith("ExecutionProvider")
    assert rep.ops_before.get("gblrc.GBLRLinear") == 2 and "gblrc.GBLRLinear" not in rep.ops_after
    model = onnx.load(path)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert rep.max_rel_err <= 1e-4
    x2 = torch.randn(*((3, 5, 12) if three_d else (7, 12)), generator=g)
    (y,) = _ort_run(path, {"input": x2.numpy()})
    with torch.no_grad():
        ref = m.double()(x2.double()).numpy()
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_lower_keep_gblr_ops(tmp_path):
    import gblrc

    path = tmp_path / "k.onnx"
    rep = gblrc.lower(mlp(), OrderedDict(input=torch.randn(3, 12)), path, keep_gblr_ops=True)
    assert "GBLRLinear evaluated as dense MatMul" in rep.provider and rep.passes == []
    assert len(gblr_nodes(onnx.load(path))) == 2 and rep.max_rel_err <= 1e-6


def test_lower_failure_leaves_no_file(tmp_path, monkeypatch):
    """A lowering that breaks the numbers is caught by the parity check; nothing is written."""
    import gblrc
    import gblrc.export.lowering as L
    from gblrc.errors import GblrcError

    def corrupt(model, names=None):  # scale the first bias: a wrong result, still a valid graph
        model = onnx.ModelProto.FromString(model.SerializeToString())
        b = next(i for i in model.graph.initializer if i.name.endswith("bias"))
        arr = onnx.numpy_helper.to_array(b) * 3 + 1
        b.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), b.name))
        return model, []

    monkeypatch.setattr(L, "run_passes", corrupt)
    path = tmp_path / "bad.onnx"
    with pytest.raises(GblrcError, match="does not match PyTorch"):
        gblrc.lower(mlp(), (torch.randn(3, 12),), path)
    assert list(tmp_path.iterdir()) == []


def test_lower_rejects_unknown_pass(tmp_path):
    import gblrc
    from gblrc.errors import GblrcError

    with pytest.raises(GblrcError, match="unknown pass"):
        gblrc.lower(mlp(), (torch.randn(3, 12),), tmp_path / "x.onnx", passes=["no-such-pass"])
    assert not (tmp_path / "x.onnx").exists()


def test_export_rejects_non_finite_factors():
    from gblrc.errors import GblrcError

    m = mlp()
    with torch.no_grad():
        m[2].U[0].fill_(float("nan"))
    with pytest.raises(GblrcError, match="'2' cannot be exported"):
        export_onnx(m, (torch.randn(2, 12),))
    assert "forward" not in m[2].__dict__ and "_gblrc_u_flat" not in m[0]._buffers
