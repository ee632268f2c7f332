"""GBLRLinear: Gaudi masks with straight-through rounding in training, hard masks in evaluation."""

import numpy as np
import pytest
import torch

from gblrc.nn.layer import GBLRLinear
from gblrc.nn.masks import boxcar_mask, gaudi_mask


def make(n_in=12, n_out=9, K=4, r=2, seed=0):
    torch.manual_seed(seed)
    layer = GBLRLinear(n_in, n_out, num_components=K, rank_per_component=r, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.normal_()
        layer.widths.copy_(torch.tensor([[0.26, 0.5, 1.0, 0.7], [0.4, 0.95, 0.3, 0.6]], dtype=torch.float64))
        layer.locations.copy_(torch.tensor([[0.9, 0.13, 0.0, 0.5], [0.7, 0.2, 0.55, 0.0]], dtype=torch.float64))
    return layer


def test_train_mode_uses_rounded_gaudi_masks():
    layer = make().train()
    layer.sigma.fill_(1.0)
    mc, mr = layer.masks()
    n_in, n_out = layer.in_features, layer.out_features
    q = lambda x, n: torch.round(x.detach() * n) / n
    np.testing.assert_allclose(
        mc.detach(), gaudi_mask(q(layer.widths[0], n_in), q(layer.locations[0], n_in), n_in, 1.0), atol=1e-12
    )
    np.testing.assert_allclose(
        mr.detach(), gaudi_mask(q(layer.widths[1], n_out), q(layer.locations[1], n_out), n_out, 1.0), atol=1e-12
    )
    # a soft mask is not the hard one, and as sigma grows training converges to evaluation
    We = make().eval().dense_weight().detach()
    assert float((layer.dense_weight().detach() - We).abs().max()) > 1e-2
    layer.sigma.fill_(1e5)
    np.testing.assert_allclose(layer.dense_weight().detach(), We, atol=1e-3)


def test_gradients_reach_widths_and_locations():
    layer = make().train()
    layer.sigma.fill_(1.0)
    x = torch.randn(5, 3, layer.in_features, dtype=torch.float64)
    loss = (layer(x) ** 2).sum()
    loss.backward()
    for p in (layer.widths, layer.locations, layer.U, layer.V, layer.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    # partial widths (not full, not zero) get non-zero gradients in width and location
    partial = (layer.widths > 1 / 12) & (layer.widths < 1)
    assert (layer.widths.grad[partial] != 0).all()
    assert (layer.locations.grad[partial] != 0).all()


def test_straight_through_rounding():
    layer = make().train()
    a = layer.dense_weight().detach().clone()
    with torch.no_grad():  # moves within the same 1/n cell change nothing in the forward pass
        layer.widths.add_(0.001)
        layer.locations.sub_(0.001)
    np.testing.assert_allclose(layer.dense_weight().detach(), a, atol=1e-12)
    with torch.no_grad():  # crossing a cell boundary does (3.1 -> 3.7 columns rounds to 4)
        layer.widths[0, 0] += 0.05
    assert float((layer.dense_weight().detach() - a).abs().max()) > 1e-3


def test_eval_mode_hard_masks_and_widths_under_one_element():
    layer = make(n_in=12, n_out=9, K=4).eval()
    with torch.no_grad():
        layer.widths[0, 0] = 0.9 / 12  # under one column: the component is off
    mc, mr = layer.masks()
    assert set(np.unique(mc.numpy())) <= {0.0, 1.0} and set(np.unique(mr.numpy())) <= {0.0, 1.0}
    assert mc[0].sum() == 0
    np.testing.assert_array_equal(mc, boxcar_mask(layer.widths[0], layer.locations[0], 12, torch.float64))
    # component 1: 6 columns from 2 (0.13*12 = 1.56 -> 2), 9 rows (0.95*9 = 8.55 -> 9 = full)
    np.testing.assert_array_equal(mc[1].numpy(), (np.arange(12) >= 2) & (np.arange(12) < 8))
    assert mr[1].sum() == 9
    # component 0 of the row side wraps around: 4 rows (0.4*9=3.6) from row 6 (0.7*9=6.3)
    np.testing.assert_array_equal(mr[0].numpy(), np.isin(np.arange(9), [6, 7, 8, 0]))
    wc, _, wr, _ = layer.hard_intervals()
    assert wc.tolist() == [0, 6, 12, 8] and wr.tolist() == [4, 9, 3, 5]
    r = layer.rank_per_component
    assert layer.flops() == r * ((6 + 9) + (12 + 3) + (8 + 5))
    # the train-mode mask also drops the under-one-element width
    layer.train()
    assert float(layer.masks()[0][0].detach().abs().max()) < 1e-12


def test_eval_forward_matches_dense_weight():
    layer = make().eval()
    x = torch.randn(2, 4, layer.in_features, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        ref = x @ layer.dense_weight().t() + layer.bias
    np.testing.assert_allclose(y, ref, atol=1e-12)


def test_cost_is_differentiable_and_matches_flops_on_the_grid():
    layer = make()
    layer.set_intervals([3, 6, 12, 8], [0, 2, 0, 6], [4, 9, 3, 5], [6, 2, 5, 0])
    c = layer.cost()
    assert c.requires_grad
    assert abs(float(c.detach()) - layer.product_flops()) < 1e-9
    # as it runs: each block its thin products or its dense tile, whichever multiplies less (3 x 4 at rank 2: the tile)
    widths = [(3, 4), (6, 9), (12, 3), (8, 5)]
    assert layer.flops() == sum(min(2 * (a + b), a * b) for a, b in widths) == 98
    c.backward()
    r = layer.rank_per_component
    np.testing.assert_allclose(layer.widths.grad[0], r * 12)
    np.testing.assert_allclose(layer.widths.grad[1], r * 9)


def test_bad_constructor_arguments():
    for args, kw in [((0, 3), {}), ((3, 3), {"num_components": 0}), ((3, 3), {"rank_per_component": 0})]:
        with pytest.raises(ValueError):
            GBLRLinear(*args, **kw)


def test_hard_forward_uses_boxcar_values_with_gaudi_gradients():
    layer = make().train()
    layer.hard_forward = True
    We = make().eval().dense_weight().detach()
    np.testing.assert_allclose(layer.dense_weight().detach(), We, atol=1e-12)
    (layer(torch.randn(4, layer.in_features, dtype=torch.float64)) ** 2).sum().backward()
    partial = (layer.widths > 1 / 12) & (layer.widths < 1)
    assert (layer.widths.grad[partial] != 0).all() and (layer.locations.grad[partial] != 0).all()


@pytest.mark.parametrize("shape", [(5, 3), (3, 5)])
def test_a_block_sparse_layer_stores_its_block_alone_and_is_the_gblr_layer_it_stands_for(shape):
    """BlockSparseLinear: factors on the block (+ bias) are all it stores; its forward, dense weight, IR and the
    components' factors it makes on demand agree (float64); it costs the block's dense product; its structure is
    fixed."""
    from gblrc.nn.layer import BlockSparseLinear

    g = torch.Generator().manual_seed(0)
    T = torch.randn(*shape, generator=g, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    m = GBLRLinear.from_tile(T, 8, 7, row_start=2, col_start=1, bias=b, family="heads")
    assert isinstance(m, BlockSparseLinear) and m.family == "heads"
    k = min(shape)
    assert sum(p.numel() for p in m.parameters()) == T.numel() + k * k + 8  # u, v on the block; widths are buffers
    W = torch.zeros(8, 7, dtype=torch.float64)
    W[2 : 2 + shape[0], 1 : 1 + shape[1]] = T
    torch.testing.assert_close(m.dense_weight(), W)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(m(x), x @ W.t() + b)
    np.testing.assert_allclose(m.structure().dense(), W.numpy(), atol=1e-14)
    torch.testing.assert_close(torch.einsum("kor,kri->oi", m.U, m.V), W)
    assert m.flops() == T.numel() and len(m.hard_structure().blocks) == 1
    m.train()
    torch.testing.assert_close(m(x), x @ W.t() + b)  # train mode: the same (boxcar) structure
    with pytest.raises(ValueError, match="outside"):
        BlockSparseLinear(T, 4, 4, row_start=2)
