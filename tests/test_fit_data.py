"""Data-aware structure search (gblrc.nn.fit_data, issue 12): fitted in the metric of the layer's inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gblrc.nn.fit_data import fit_inputs, output_error, second_moment, whitened_svd_fit
from gblrc.nn.layer import GBLRLinear


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def correlated_inputs(n, d, g, parts=2):
    """``parts`` sets of n rows from one distribution with a decaying spectrum, a few large features and a
    nonzero mean (like real activations): calibration rows and held-out rows."""
    A = torch.randn(d, d, generator=g, dtype=torch.float64) * (torch.arange(1, d + 1, dtype=torch.float64) ** -0.7)
    out = []
    for _ in range(parts):
        X = torch.randn(n, d, generator=g, dtype=torch.float64) @ A.t() + 0.3
        X[:, :3] *= 6.0
        out.append(X)
    return out


def weight(kind, n_out, n_in, g):
    if kind == "dense":
        return torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / math.sqrt(n_in)
    W = torch.zeros(n_out, n_in, dtype=torch.float64)  # rank-6 32 x 32 tiles on the diagonal, plus noise
    for i in range(0, min(n_out, n_in), 32):
        W[i : i + 32, i : i + 32] = torch.randn(32, 6, generator=g, dtype=torch.float64) @ torch.randn(
            6, 32, generator=g, dtype=torch.float64
        )
    return W + 0.05 * torch.randn(n_out, n_in, generator=g, dtype=torch.float64)


def held_out_error(f, W, X):
    return float((X @ (W - f.dense()).t()).norm() / (X @ W.t()).norm())


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["dense", "tiles"]),
    shape=st.sampled_from([(64, 96), (96, 64), (64, 64)]),
    budget=st.sampled_from([0.2, 0.4, 0.6]),
)
def test_never_worse_than_whitened_svd_on_held_out_rows_and_within_budget(seed, kind, shape, budget):
    g = torch.Generator().manual_seed(seed)
    n_out, n_in = shape
    W = weight(kind, n_out, n_in, g)
    X, Xh = correlated_inputs(3000, n_in, g)
    C = second_moment(X)
    f = fit_inputs(W, C, budget, tile=16)
    base = whitened_svd_fit(W, C, budget)
    assert f.flops() <= budget * n_in * n_out and base.flops() <= budget * n_in * n_out
    assert output_error(W, f.dense(), C) <= output_error(W, base.dense(), C) + 1e-12  # by construction
    assert held_out_error(f, W, Xh) <= held_out_error(base, W, Xh) * 1.005


def test_clear_win_where_the_weight_has_blocks():
    g = torch.Generator().manual_seed(3)
    W = weight("tiles", 128, 128, g)
    X, Xh = correlated_inputs(4000, 128, g)
    C = second_moment(X)
    f, info = fit_inputs(W, C, 0.2, tile=32, return_info=True)
    assert info["chose"] == "gblr" and info["n_blocks"] > 0
    assert held_out_error(f, W, Xh) < 0.7 * held_out_error(whitened_svd_fit(W, C, 0.2), W, Xh)


def test_from_dense_with_inputs_gives_the_fitted_layer():
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(64, 48)
    X = correlated_inputs(2000, 64, g, parts=1)[0].float()
    layer = GBLRLinear.from_dense(lin, 0.4, inputs=X, tile=16)
    assert isinstance(layer, GBLRLinear) and not layer.training
    assert layer.flops() <= 0.4 * 64 * 48
    W = lin.weight.detach().double()
    f = fit_inputs(W, second_moment(X), 0.4, tile=16)
    torch.testing.assert_close(layer.dense_weight().double(), f.dense(), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(X[:4]), X[:4] @ layer.dense_weight().t() + lin.bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        GBLRLinear.from_dense(lin, 0.4, inputs=torch.randn(10, 63))
    with pytest.raises(ValueError, match="budget"):
        GBLRLinear.from_dense(lin, 0.0, inputs=X)


def test_tiny_budget_falls_back_to_an_empty_layer():
    lin = nn.Linear(32, 32)
    layer = GBLRLinear.from_dense(lin, 0.01, inputs=torch.randn(100, 32))
    assert layer.flops() == 0
