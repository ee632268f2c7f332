"""Gaudi masks (docs/design.md §1): exact boxcar without the Gaussian, mean = width, useful gradients."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gblrc.nn.masks import boxcar_mask, gaudi_mask, hard_locations, hard_widths, quantize_ste


@st.composite
def grid_interval(draw, n_min=2, n_max=2048):
    n = draw(st.integers(n_min, n_max))
    k = draw(st.integers(0, n))  # width in elements, zero and full included
    j = draw(st.integers(0, n - 1))  # start; k + j > n wraps around
    return n, k, j


def reference_boxcar(n, k, j):
    i = np.arange(n)
    return ((i - j) % n < k).astype(np.float64)


@settings(max_examples=100)
@given(grid_interval())
def test_hard_gaudi_mask_is_the_cyclic_boxcar(nkj):
    n, k, j = nkj
    w = torch.tensor(k / n, dtype=torch.float64)
    l = torch.tensor(j / n, dtype=torch.float64)
    m = gaudi_mask(w, l, n, sigma=None).numpy()
    ref = reference_boxcar(n, k, j)
    assert m.shape == (n,)
    np.testing.assert_allclose(m, ref, atol=1e-9, rtol=0)
    assert abs(m.mean() - k / n) < 1e-12
    # the eval-mode boxcar and the integer conversions agree with the same interval
    np.testing.assert_array_equal(boxcar_mask(w, l, n, torch.float64).numpy(), ref)
    assert int(hard_widths(w, n)) == k and int(hard_locations(l, n)) == j % n


def test_wraparound_example_by_hand():
    m = gaudi_mask(torch.tensor(3 / 8, dtype=torch.float64), torch.tensor(6 / 8, dtype=torch.float64), 8)
    np.testing.assert_allclose(m.numpy(), [1, 0, 0, 0, 0, 0, 1, 1], atol=1e-12)


@settings(max_examples=40)
@given(st.integers(2, 2048), st.data())
def test_mask_mean_is_width_off_grid(n, data):
    # the mean (spectrum at f = 0) is the width for any width, also off the grid and with a Gaussian
    w = data.draw(st.floats(0.0, 1.0))
    l = data.draw(st.floats(0.0, 1.0))
    for sigma in (None, 1.0, 10.0):
        m = gaudi_mask(torch.tensor(w, dtype=torch.float64), torch.tensor(l, dtype=torch.float64), n, sigma)
        assert abs(float(m.mean()) - w) < 1e-12


@settings(max_examples=60)
@given(grid_interval(n_min=3), st.integers(0, 2**31 - 1))
def test_sigma_one_gradients_are_finite_and_nonzero(nkj, seed):
    n, k, j = nkj
    k = min(max(k, 1), n - 1)  # a full or empty mask is constant in location
    w = torch.tensor(k / n, dtype=torch.float64, requires_grad=True)
    l = torch.tensor(j / n, dtype=torch.float64, requires_grad=True)
    target = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    loss = ((gaudi_mask(w, l, n, sigma=1.0) - target) ** 2).sum()
    gw, gl = torch.autograd.grad(loss, (w, l))
    assert torch.isfinite(gw) and torch.isfinite(gl)
    assert gw != 0 and gl != 0


@pytest.mark.parametrize("n", [2, 7, 16, 33])
@pytest.mark.parametrize("sigma", [None, 1.0, 5.0])
def test_gradcheck_float64(n, sigma):
    g = torch.Generator().manual_seed(n)
    w = (0.1 + 0.8 * torch.rand(3, generator=g, dtype=torch.float64)).requires_grad_()
    l = torch.rand(3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: gaudi_mask(a, b, n, sigma), (w, l), eps=1e-6, atol=1e-6)


def test_batched_shape_and_convergence_to_boxcar():
    n = 64
    w = torch.tensor([[0.25, 0.5], [1.0, 0.0]], dtype=torch.float64)
    l = torch.tensor([[0.875, 0.1], [0.3, 0.2]], dtype=torch.float64)
    m = gaudi_mask(w, l, n)
    assert m.shape == (2, 2, n)
    hard = gaudi_mask(w[0, :1], l[0, :1], n, None)
    errs = [float((gaudi_mask(w[0, :1], l[0, :1], n, s) - hard).abs().max()) for s in (1.0, 10.0, 100.0, 1e4)]
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-3  # σ → ∞ hardens the mask


def test_quantize_ste_rounds_forward_and_passes_gradient():
    n = 10
    x = torch.tensor([0.04, 0.123, 0.55, 0.96], dtype=torch.float64, requires_grad=True)
    q = quantize_ste(x, n, min_one=True)
    np.testing.assert_allclose(q.detach().numpy(), [0.0, 0.1, 0.6, 1.0], atol=1e-15)  # 0.04 < 1/n -> 0
    (q * torch.arange(1.0, 5.0, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [1, 2, 3, 4])


def test_bad_length_raises():
    with pytest.raises(ValueError):
        gaudi_mask(torch.tensor(0.5), torch.tensor(0.0), 0)
