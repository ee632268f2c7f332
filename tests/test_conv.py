"""GBLRConv2d: a convolution whose kernel matrix (out x in*kh*kw) is GBLR; cost weighted by output positions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _samples import randomize
from gblrc import GBLRConv2d, GBLRLinear
from gblrc.learn.budget import compact, cost_ratio, fit_to_budget
from gblrc.learn.calib import input_covariances, layer_rows, whiten_layer
from gblrc.nn.layer import svd_layer
from gblrc.nn.replace import find_linears, replace_linears

pytestmark = pytest.mark.usefixtures("one_thread")


def random_conv(c_in, c_out, k, stride=1, padding=0, K=5, r=1, bias=True, seed=0, dilation=1, full=False):
    rng = np.random.default_rng(seed)
    m = GBLRConv2d(
        c_in,
        c_out,
        k,
        stride,
        padding,
        dilation,
        num_components=K,
        rank_per_component=r,
        bias=bias,
        dtype=torch.float64,
    )
    return randomize(m, rng, seed, full)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, 2])
def test_forward_is_conv2d_with_the_dense_kernel(k, stride, padding):
    for seed, (K, r) in enumerate([(3, 1), (40, 2)]):  # few components: V/U convs; many: the dense kernel
        m = random_conv(4, 6, k, stride, padding, K=K, r=r, bias=seed == 0, seed=seed)
        x = torch.randn(2, 4, 7, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        ref = F.conv2d(x, m.conv_weight(), m.bias, stride, padding)
        y = m(x)
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        assert int(m.positions) == ref.shape[-2] * ref.shape[-1]
        # the kernel is the layer's GBLR matrix reshaped
        torch.testing.assert_close(m.conv_weight().reshape(6, -1), m.dense_weight())


def test_train_mode_masks_dilation_asymmetric_same_padding_and_unbatched_input():
    m = random_conv(3, 5, (3, 2), 1, "same", K=4, seed=3, dilation=(2, 1)).train()
    m.sigma.fill_(1.0)  # smooth Gaudi masks
    x = torch.randn(2, 3, 6, 9, dtype=torch.float64)
    with pytest.warns(UserWarning, match="same"):  # torch pads a copy of the input for this case, as we do
        ref = F.conv2d(x, m.conv_weight(), m.bias, 1, "same", (2, 1))
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)
    assert m.padding == (2, 0, 2, 1)  # torch's 'same': the odd extra pad goes bottom/right
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x[0]), m(x[:1])[0])


def test_groups_and_bad_geometry_are_rejected_clearly():
    with pytest.raises(ValueError, match="groups=1"):
        GBLRConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups=2"):
        GBLRConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), 0.5)
    with pytest.raises(ValueError, match="padding_mode"):
        GBLRConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), 0.5)
    with pytest.raises(ValueError, match="kernel_size"):
        GBLRConv2d(4, 4, 0)


def test_from_conv_reproduces_a_low_rank_conv_at_full_budget():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1).double()
    with torch.no_grad():  # a rank-3 kernel matrix: representable exactly within the dense cost
        conv.weight.copy_(
            (torch.randn(8, 3, dtype=torch.float64) @ torch.randn(3, 36, dtype=torch.float64)).reshape(8, 4, 3, 3)
        )
    x = torch.randn(3, 4, 9, 6, dtype=torch.float64)
    for fit in (None, svd_layer):
        g = GBLRConv2d.from_conv(conv, 1.0, fit=fit)
        assert isinstance(g, GBLRConv2d) and not g.training
        assert (g.kernel_size, g.stride, g.padding) == ((3, 3), (2, 2), (1, 1, 1, 1))
        torch.testing.assert_close(g(x), conv(x), rtol=1e-9, atol=1e-9)
        assert g.flops() <= g.dense_flops()
    # a random (full-rank) kernel at a budget close to 1: close, never worse than SVD
    conv2 = nn.Conv2d(3, 16, 3, padding=1)
    g = GBLRConv2d.from_conv(conv2, 0.9)
    with torch.no_grad():
        err = float((g.conv_weight() - conv2.weight).norm() / conv2.weight.norm())
    assert err < 0.35 and g.flops() <= 0.9 * g.dense_flops()


def test_flops_are_weighted_by_output_positions():
    m = random_conv(4, 6, 3, 2, 1, K=4, seed=1)
    per_vector = GBLRLinear.flops(m)
    assert int(m.positions) == 1 and m.flops() == per_vector and m.dense_flops() == 36 * 6
    m(torch.randn(1, 4, 8, 12, dtype=torch.float64))  # 4 x 6 output positions
    assert int(m.positions) == 24
    assert m.flops() == 24 * per_vector and m.dense_flops() == 24 * 36 * 6
    assert m.cost().item() == pytest.approx(24 * GBLRLinear.cost(m).item())
    # a mixed model's global ratio counts real multiply-adds
    lin = GBLRLinear(30, 20, num_components=3, dtype=torch.float64).eval()
    want = (m.flops() + lin.flops()) / (m.dense_flops() + lin.dense_flops())
    assert cost_ratio([m, lin]) == pytest.approx(want)
    # compact keeps the class, geometry, positions and function
    c = compact(m)
    assert isinstance(c, GBLRConv2d) and int(c.positions) == 24 and c.padding == m.padding
    x = torch.randn(1, 4, 8, 12, dtype=torch.float64)
    torch.testing.assert_close(c(x), m(x))


def test_fit_to_budget_with_weighted_conv_costs():
    torch.manual_seed(0)
    convs = [
        GBLRConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1).double(), 0.9, fit=svd_layer),
        GBLRConv2d.from_conv(nn.Conv2d(16, 16, 3, stride=2, padding=1).double(), 0.9, fit=svd_layer),
    ]
    lin = svd_layer(nn.Linear(64, 32).double(), 0.9).eval()
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    convs[1](convs[0](x))
    assert [int(c.positions) for c in convs] == [64, 16]
    layers = convs + [lin]
    for budget in (0.5, 0.3):
        ratio = fit_to_budget(layers, budget)
        assert ratio == cost_ratio(layers) and budget - 0.02 <= ratio <= budget


def test_replace_selects_conv2d_and_calibrates_on_receptive_fields():
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2),
            nn.Flatten(),
            nn.Linear(512, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )
        .double()
        .eval()
    )
    # conv 0: 1*3*3 < 16 inputs (first conv stays dense); conv 4: groups=2; "8": the output layer
    assert [n for n, _ in find_linears(model)] == ["2", "6"]
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    covs = input_covariances(model, ["2"], [x])
    h = model[1](model[0](x))
    cols = F.unfold(h, 3, padding=1).transpose(1, 2).reshape(-1, 144)
    torch.testing.assert_close(layer_rows(model[2], h), cols)
    torch.testing.assert_close(covs["2"], cols.t() @ cols / cols.shape[0])
    dense = copy.deepcopy(model)
    W = model[2].weight.detach().reshape(16, -1).clone()
    new = replace_linears(model, ["2", "6"], 0.3, fit=svd_layer)
    assert isinstance(new["2"], GBLRConv2d) and type(new["6"]) is GBLRLinear and model[2] is new["2"]
    g = new["2"]
    plain = copy.deepcopy(g)
    assert whiten_layer(g, W, covs["2"])
    err = lambda m: float((m(h) - dense[2](h)).detach().norm())  # noqa: E731
    assert err(g) < err(plain)  # data-aware init fits the layer's outputs better than plain SVD
    assert model(x).shape == (16, 10)
