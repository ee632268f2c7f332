"""fit_dense: GBLR initialisation from a dense weight, never worse than truncated SVD at the same cost."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gblrc.nn.fit import relative_error, svd_rank_for_budget
from gblrc.nn.layer import fit_dense, svd_layer
from gblrc.nn.layer import GBLRLinear


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # tiny matrices: thread start-up dominates on a loaded 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def linear_from(W, bias=True):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=bias, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        if bias:
            lin.bias.normal_()
    return lin


def err(layer, W):
    with torch.no_grad():
        return relative_error(W.double().numpy(), layer.eval().dense_weight().double().numpy())


def check_result(g, lin, budget, r=1):
    W = lin.weight.detach()
    assert isinstance(g, GBLRLinear) and not g.training
    assert g.rank_per_component == r and g.num_components >= 1
    assert g.flops() <= budget * W.numel()
    ir = g.structure()  # validates
    assert ir.structure.cost() == g.flops()
    np.testing.assert_allclose(ir.dense(), g.dense_weight().detach().double().numpy(), atol=1e-6)
    if lin.bias is not None:
        np.testing.assert_array_equal(g.bias.detach().numpy(), lin.bias.detach().numpy())
    x = torch.randn(3, 2, W.shape[1], dtype=W.dtype)
    with torch.no_grad():
        np.testing.assert_allclose(g(x).numpy(), ir.apply(x.double().numpy()), atol=1e-5)


@settings(max_examples=25)
@given(
    st.integers(2, 40),
    st.integers(2, 40),
    st.floats(0.02, 1.0),
    st.sampled_from([1, 1, 2, 3]),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_never_worse_than_svd_and_within_budget(n_out, n_in, budget, r, seed, planted):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    if planted:  # add a local block so that the pursuit has something to find
        a, b = max(1, n_out // 3), max(1, n_in // 3)
        W[:a, -b:] += (
            5
            * torch.randn(a, 1, generator=g, dtype=torch.float64)
            @ torch.randn(1, b, generator=g, dtype=torch.float64)
        )
    lin = linear_from(W)
    fit = fit_dense(lin, budget, rank_per_component=r)
    svd = svd_layer(lin, budget, rank_per_component=r)
    check_result(fit, lin, budget, r)
    assert err(fit, W) <= err(svd, W) + 1e-12
    # the SVD baseline is the Eckart-Young optimum at its rank
    k = min(svd_rank_for_budget(n_in, n_out, budget, r) * r, min(n_in, n_out))
    S = torch.linalg.svdvals(W)
    assert abs(err(svd, W) - float(S[k:].norm() / S.norm())) < 1e-9
    assert svd.flops() <= budget * W.numel()


@pytest.mark.parametrize("shape", [(96, 64), (63, 81)])
@pytest.mark.parametrize("budget", [0.2, 0.4, 0.6])
def test_float32_random_weights(shape, budget):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    lin = linear_from(W)
    fit = fit_dense(lin, budget)
    check_result(fit, lin, budget)
    assert err(fit, W) <= err(svd_layer(lin, budget), W)


def test_clear_win_on_block_diagonal():
    g = torch.Generator().manual_seed(0)
    n_out, n_in = 64, 48
    W = 0.01 * torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    for i in range(4):
        W[16 * i : 16 * (i + 1), 12 * i : 12 * (i + 1)] += torch.randn(
            16, 2, generator=g, dtype=torch.float64
        ) @ torch.randn(2, 12, generator=g, dtype=torch.float64)
    lin = linear_from(W)
    fit, svd = fit_dense(lin, 0.25), svd_layer(lin, 0.25)
    check_result(fit, lin, 0.25)
    e_fit, e_svd = err(fit, W), err(svd, W)
    assert e_fit < 0.2 * e_svd and e_fit < 0.05, (e_fit, e_svd)


def test_clear_win_on_off_diagonal_blocks_that_wrap_around():
    g = torch.Generator().manual_seed(1)
    n_out, n_in = 64, 48
    W = 0.01 * torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    blocks = [((56, 16), (42, 12)), ((8, 16), (18, 12)), ((40, 16), (6, 12))]  # the first wraps on both axes
    for (rs, a), (cs, b) in blocks:
        ri, ci = (rs + torch.arange(a)) % n_out, (cs + torch.arange(b)) % n_in
        W[ri[:, None], ci[None, :]] += torch.randn(a, 2, generator=g, dtype=torch.float64) @ torch.randn(
            2, b, generator=g, dtype=torch.float64
        )
    lin = linear_from(W, bias=False)
    budget = 3 * 2 * (16 + 12) / (n_in * n_out) + 1e-3  # exactly the three rank-2 blocks
    fit, svd = fit_dense(lin, budget), svd_layer(lin, budget)
    check_result(fit, lin, budget)
    e_fit, e_svd = err(fit, W), err(svd, W)
    assert e_fit < 0.1 * e_svd and e_fit < 0.05, (e_fit, e_svd)
    assert any(len(b.rows) == 2 and len(b.cols) == 2 for b in fit.structure().structure.blocks)


def test_rank_per_component_above_one_on_local_structure():
    g = torch.Generator().manual_seed(2)
    W = 0.01 * torch.randn(40, 40, generator=g, dtype=torch.float64)
    for i in range(2):  # two diagonal rank-4 blocks: SVD at this budget affords only one rank-4 component
        W[20 * i : 20 * (i + 1), 20 * i : 20 * (i + 1)] += torch.randn(
            20, 4, generator=g, dtype=torch.float64
        ) @ torch.randn(4, 20, generator=g, dtype=torch.float64)
    lin = linear_from(W)
    fit = fit_dense(lin, 0.21, rank_per_component=4)
    check_result(fit, lin, 0.21, r=4)
    assert err(fit, W) < 0.1 * err(svd_layer(lin, 0.21, rank_per_component=4), W)


def test_tiny_budget_gives_an_empty_but_valid_layer():
    lin = linear_from(torch.randn(8, 8, dtype=torch.float64))
    fit = fit_dense(lin, 0.05)  # 3 multiply-adds: no component fits
    assert fit.flops() == 0 and fit.structure().structure.blocks == ()
    with torch.no_grad():
        np.testing.assert_allclose(
            fit(torch.zeros(2, 8, dtype=torch.float64)).numpy(), lin.bias.detach().expand(2, 8).numpy()
        )


@pytest.mark.parametrize("budget", [0, -0.5, 1.0001, 2, math.nan, math.inf, "0.5x", None])
def test_bad_budget_raises(budget):
    lin = linear_from(torch.randn(6, 5))
    for f in (fit_dense, svd_layer):
        with pytest.raises(ValueError):
            f(lin, budget)


def test_bad_weight_and_options_raise():
    W = torch.randn(6, 5)
    W[2, 3] = float("nan")
    with pytest.raises(ValueError):
        fit_dense(linear_from(W), 0.5)
    W[2, 3] = float("inf")
    with pytest.raises(ValueError):
        fit_dense(linear_from(W), 0.5)
    lin = linear_from(torch.randn(6, 5))
    with pytest.raises(TypeError):
        fit_dense(lin, 0.5, no_such_option=1)
    with pytest.raises(ValueError):
        fit_dense(lin, 0.5, method="magic")
    with pytest.raises(TypeError):
        fit_dense(nn.Conv1d(3, 3, 1), 0.5)


def test_method_svd_and_from_dense():
    W = torch.randn(20, 30, generator=torch.Generator().manual_seed(3))
    lin = linear_from(W)
    a = fit_dense(lin, 0.3, method="svd")
    np.testing.assert_array_equal(a.dense_weight().detach(), svd_layer(lin, 0.3).eval().dense_weight().detach())
    b = GBLRLinear.from_dense(lin, 0.3)
    assert err(b, W) <= err(a, W) and b.flops() <= 0.3 * W.numel()


def test_thread_setting_is_restored():
    lin = linear_from(torch.randn(20, 30, generator=torch.Generator().manual_seed(4)))
    torch.set_num_threads(2)
    fit_dense(lin, 0.3)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)


def test_budget_just_under_a_whole_component_is_respected():
    # 0.9999999999999999 * 16 = 15.99..: two rank-1 components of a 4x4 (cost 16) would exceed it
    b = 0.9999999999999999
    assert svd_rank_for_budget(4, 4, b) == 1 and svd_rank_for_budget(4, 4, 1.0) == 2
    lin = linear_from(torch.randn(4, 4, dtype=torch.float64))
    for layer in (svd_layer(lin, b), fit_dense(lin, b)):
        assert layer.flops() <= b * 16
