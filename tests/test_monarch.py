"""The Monarch baseline (gblrc.nn.monarch): projection, forward, cost, budget choice, replacement, ONNX."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from _samples import load_families
import gblrc
from gblrc.nn.monarch import (
    MonarchLinear,
    monarch_cost,
    monarch_links,
    monarch_project,
    monarch_shapes,
    nblocks_for_budget,
    replace_with_monarch,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(16, 16, 4), (64, 64, 8), (24, 40, 3), (40, 24, 5), (30, 50, 4), (17, 9, 3), (64, 64, 16), (12, 12, 1)]


def families():
    return load_families()


def random_monarch(n_in, n_out, b, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return MonarchLinear(n_in, n_out, b).to(dtype)


@pytest.mark.parametrize("n_in,n_out,b", SHAPES)
def test_forward_is_the_dense_matrix(n_in, n_out, b):
    m = random_monarch(n_in, n_out, b)
    w = m.dense_weight()
    assert w.shape == (n_out, n_in)
    x = torch.randn(3, 5, n_in, dtype=torch.float64)
    torch.testing.assert_close(m(x), x @ w.t() + m.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_in,n_out,b", SHAPES)
def test_projection_recovers_an_exact_monarch_matrix(n_in, n_out, b):
    w = random_monarch(n_in, n_out, b, seed=1).dense_weight()
    r, l = monarch_project(w, b)
    m = MonarchLinear(n_in, n_out, b, bias=False).double()
    with torch.no_grad():
        m.blkdiag1.copy_(r)
        m.blkdiag2.copy_(l)
    assert (m.dense_weight() - w).norm() / w.norm() < 1e-12


def test_square_case_is_rank_one_per_block_pair_and_projection_is_optimal():
    n, b = 16, 4  # n = b^2: every (output block, input block) pair is linked exactly once
    links = monarch_links(b, monarch_shapes(n, n, b)[1])
    assert all(len(links[i][j]) == 1 for i in range(b) for j in range(b))
    torch.manual_seed(0)
    w = torch.randn(n, n, dtype=torch.float64)
    m = MonarchLinear(n, n, b, bias=False).double()
    r0, l0 = monarch_project(w, b)
    with torch.no_grad():
        m.blkdiag1.copy_(r0)
        m.blkdiag2.copy_(l0)
    err = (m.dense_weight() - w).norm() ** 2
    # the optimum: the energy beyond the first singular value of every 4x4 tile
    tails = sum(
        float((torch.linalg.svdvals(w[4 * i : 4 * i + 4, 4 * j : 4 * j + 4])[1:] ** 2).sum())
        for i in range(b)
        for j in range(b)
    )
    assert float(err) == pytest.approx(tails, rel=1e-10)
    for seed in range(3):  # any other Monarch matrix nearby is farther away
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            r = m.blkdiag1 + 1e-3 * torch.randn(m.blkdiag1.shape, generator=g, dtype=torch.float64)
            q = MonarchLinear(n, n, b, bias=False).double()
            q.blkdiag1.copy_(r)
            q.blkdiag2.copy_(m.blkdiag2)
        assert (q.dense_weight() - w).norm() ** 2 > err


@pytest.mark.parametrize("n_in,n_out,b", SHAPES)
def test_cost_formula(n_in, n_out, b):
    m = MonarchLinear(n_in, n_out, b)
    p, q, s = math.ceil(n_in / b), min(math.ceil(n_in / b), math.ceil(n_out / b)), math.ceil(n_out / b)
    assert monarch_cost(n_in, n_out, b) == b * q * (p + s) == m.flops()
    # one multiply-add per factor entry and input vector
    assert m.flops() == m.blkdiag1.numel() + m.blkdiag2.numel()
    assert m.dense_flops() == n_in * n_out


def test_square_cost_is_2_n_to_the_1_5():
    for b in (4, 8, 16):
        assert monarch_cost(b * b, b * b, b) == 2 * (b * b) ** 1.5


@pytest.mark.parametrize("n_in,n_out", [(64, 64), (128, 512), (512, 128), (96, 40), (17, 33)])
@pytest.mark.parametrize("budget", [0.2, 0.3, 0.5, 0.9])
def test_nblocks_for_budget_is_the_closest_under_the_budget(n_in, n_out, budget):
    costs = {b: monarch_cost(n_in, n_out, b) for b in range(1, max(n_in, n_out) + 1)}
    b = nblocks_for_budget(n_in, n_out, budget)
    assert costs[b] <= budget * n_in * n_out
    assert costs[b] == max(c for c in costs.values() if c <= budget * n_in * n_out)


def test_nblocks_for_budget_errors():
    with pytest.raises(ValueError, match="budget"):
        nblocks_for_budget(64, 64, 0.0)
    with pytest.raises(ValueError, match="no Monarch block count"):
        nblocks_for_budget(64, 64, 0.01)  # the cheapest (b = 64) costs 2/64
    with pytest.raises(ValueError, match="nblocks"):
        MonarchLinear(8, 8, 9)


def _onnx(module, x, dynamic=True):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}} if dynamic else None,
        )
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("n_in,n_out,b", [(64, 64, 8), (30, 50, 4), (50, 30, 4)])
def test_onnx_export_standard_ops_and_parity(n_in, n_out, b):
    torch.manual_seed(0)
    m = MonarchLinear(n_in, n_out, b).eval()
    model = _onnx(m, torch.randn(2, 3, n_in))
    onnx.checker.check_model(model, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMul", "Reshape", "Transpose"} <= ops and ops <= {
        "MatMul",
        "Reshape",
        "Transpose",
        "Pad",
        "Slice",
        "Add",
        "Shape",
        "Gather",
        "Unsqueeze",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Cast",
        "Squeeze",
    }
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 7, n_in)  # not the export shape
    (y,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, m(x).numpy(), rtol=1e-5, atol=1e-5)


def test_replace_with_monarch_keeps_the_budget_and_lowers(tmp_path):
    fam = families()
    model = fam.build("vit", "tiny")
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        dense = model(x)
    model, rep = replace_with_monarch(model, 0.5)
    names = [r["name"] for r in rep["layers"]]
    assert names == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert type(model.head) is nn.Linear and type(model.patch_embed) is nn.Linear  # head, too small
    assert all(isinstance(model.get_submodule(n), MonarchLinear) for n in names)
    assert rep["achieved_ratio"] <= 0.5 and rep["monarch_cost"] == sum(r["monarch_cost"] for r in rep["layers"])
    for r in rep["layers"]:
        assert r["monarch_cost"] == monarch_cost(r["shape"][1], r["shape"][0], r["nblocks"]) <= 0.5 * r["dense_cost"]
    with torch.no_grad():
        cos = nn.functional.cosine_similarity(model(x).flatten(), dense.flatten(), dim=0)
    assert cos > 0.5  # the projection keeps the function roughly (random weights: far from Monarch)
    lrep = gblrc.lower(model, x, tmp_path / "vit_monarch.onnx")
    assert lrep.max_rel_err <= 1e-4 and all("gblrc" not in k for k in lrep.ops_after)


def test_replace_with_monarch_gpt2_conv1d_and_skips_convolutions():
    fam = families()
    g = fam.build("gpt2", "tiny")
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before = g(input_ids=ids).logits
        w = g.transformer.h[0].attn.c_attn.weight.t().clone()  # Conv1D stores (in, out)
    g, rep = replace_with_monarch(g, 0.5, include=r"h\.0\.attn\.c_attn$")
    layer = g.transformer.h[0].attn.c_attn
    assert isinstance(layer, MonarchLinear) and (layer.in_features, layer.out_features) == (32, 96)
    r, l = monarch_project(w, layer.nblocks)
    torch.testing.assert_close(layer.blkdiag1.detach(), r)
    with torch.no_grad():
        assert g(input_ids=ids).logits.shape == before.shape
    cnn = fam.build("cnn", "tiny")
    cnn, rep = replace_with_monarch(cnn, 0.5, include=r"conv|head")
    assert [r["name"] for r in rep["layers"]] == ["head"] and rep["layers"][0]["nblocks"] == 4  # 32 -> 10
    assert rep["skipped"] and all("Conv2d is not a linear layer" in s["reason"] for s in rep["skipped"])
    with pytest.raises(ValueError, match="no linear layer"):
        replace_with_monarch(fam.build("cnn", "tiny"), 0.5, include="conv")
