"""The structure IR against GBLRLinear (docs/design.md §2): dense rebuild, cost, apply, validation, ONNX."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gblrc.nn.layer import GBLRLinear
from gblrc.ir.structure import (
    Block,
    GBLRWeights,
    Span,
    Structure,
    StructureError,
    cyclic_spans,
    from_onnx_attributes,
    pack_factors,
    to_onnx_attributes,
    unpack_factors,
)


@st.composite
def random_layer(draw):
    """A float64 eval-mode GBLRLinear with random intervals (zero/full widths, wrap-around, duplicates)."""
    n_in, n_out = draw(st.integers(1, 37)), draw(st.integers(1, 37))
    K, r = draw(st.integers(1, 6)), draw(st.sampled_from([1, 1, 2, 3]))
    iv = []
    for k in range(K):
        if k and draw(st.integers(0, 3)) == 0:  # same intervals as an earlier component: one block
            iv.append(iv[draw(st.integers(0, k - 1))])
            continue
        wc = draw(st.one_of(st.just(0), st.just(n_in), st.integers(0, n_in)))
        wr = draw(st.one_of(st.just(0), st.just(n_out), st.integers(0, n_out)))
        iv.append((wc, draw(st.integers(0, 3 * n_in)), wr, draw(st.integers(0, 3 * n_out))))
    layer = GBLRLinear(
        n_in, n_out, num_components=K, rank_per_component=r, bias=draw(st.booleans()), dtype=torch.float64
    )
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    with torch.no_grad():
        layer.U.copy_(torch.randn(layer.U.shape, generator=g, dtype=torch.float64))
        layer.V.copy_(torch.randn(layer.V.shape, generator=g, dtype=torch.float64))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(n_out, generator=g, dtype=torch.float64))
    layer.set_intervals(*zip(*iv))
    return layer.eval(), iv, g


@settings(max_examples=220)
@given(random_layer())
def test_ir_matches_eval_layer(case):
    layer, iv, g = case
    n_in, n_out, r = layer.in_features, layer.out_features, layer.rank_per_component
    ir = layer.structure()
    s = ir.structure
    with torch.no_grad():
        W = layer.dense_weight().numpy()
    np.testing.assert_allclose(ir.dense(), W, atol=1e-12, rtol=0)
    assert s.cost() == layer.flops()
    # the cost by hand, from the intervals that were set
    live = [(min(wc, n_in), lc % n_in, min(wr, n_out), lr % n_out) for wc, lc, wr, lr in iv if wc and wr]
    assert layer.product_flops() == sum(r * (a + b) for a, _, b, _ in live)
    # components with the same intervals are one block of higher rank, which costs its thin products or,
    # where that is less, its dense tile (the one cost function: what the lowering runs)
    norm = {(a, c if a < n_in else 0, b, d if b < n_out else 0) for a, c, b, d in live}
    ranks = {
        k: r * sum(1 for a, c, b, d in live if (a, c if a < n_in else 0, b, d if b < n_out else 0) == k) for k in norm
    }
    assert layer.flops() == sum(min(rk * (a + b), a * b) for (a, _, b, _), rk in ranks.items())
    assert len(s.blocks) == len(norm) and s.total_rank == r * len(live)
    for b in s.blocks:
        assert sum(len(sp) for sp in b.rows) == b.n_rows and b.n_rows <= n_out and b.n_cols <= n_in
        assert len(b.rows) <= 2 and len(b.cols) <= 2
    # outputs with leading batch dimensions
    x = torch.randn(2, 3, n_in, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x).numpy()
    np.testing.assert_allclose(ir.apply(x.numpy()), y, atol=1e-10, rtol=1e-12)
    # ONNX attributes and packed factors round-trip exactly
    attrs = to_onnx_attributes(s)
    assert all(isinstance(v, int) or all(isinstance(i, int) for i in v) for v in attrs.values())
    assert from_onnx_attributes(attrs) == s
    u, v = pack_factors(ir, dtype=np.float64)
    back = unpack_factors(from_onnx_attributes(attrs), u, v, ir.bias)
    for a, b in zip(back.U + back.V, ir.U + ir.V):
        assert np.array_equal(a, b)
    np.testing.assert_allclose(back.dense(), ir.dense(), atol=1e-12, rtol=0)  # same factors; BLAS order


def test_cyclic_spans():
    assert cyclic_spans(5, 0, 8) == ()
    assert cyclic_spans(5, 8, 8) == (Span(0, 8),) == cyclic_spans(3, 9, 8)
    assert cyclic_spans(2, 3, 8) == (Span(2, 5),)
    assert cyclic_spans(6, 3, 8) == (Span(6, 8), Span(0, 1))
    assert cyclic_spans(14, 3, 8) == (Span(6, 8), Span(0, 1))
    with pytest.raises(StructureError):
        cyclic_spans(0, 1, 0)


def _weights(blocks, n_in=6, n_out=5, U=None, V=None, bias=None):
    s = Structure(n_in, n_out, tuple(blocks))
    U = U if U is not None else [np.ones((b.n_rows, b.rank)) for b in blocks]
    V = V if V is not None else [np.ones((b.rank, b.n_cols)) for b in blocks]
    return GBLRWeights(s, U, V, bias)


@pytest.mark.parametrize(
    "bad",
    [lambda: Span(3, 3), lambda: Span(-1, 2), lambda: Span(0.5, 2), lambda: Block((Span(0, 1),), (Span(0, 1),), 0)],
)
def test_bad_spans_and_blocks_raise(bad):
    with pytest.raises(StructureError):
        bad()


@pytest.mark.parametrize(
    "blocks",
    [
        [Block((Span(0, 6),), (Span(0, 2),), 1)],  # rows past out_features = 5
        [Block((Span(0, 2),), (Span(4, 7),), 1)],  # cols past in_features = 6
        [Block((Span(0, 3), Span(2, 4)), (Span(0, 2),), 1)],  # overlapping row spans
        [Block((), (Span(0, 2),), 1)],  # no rows
    ],
)
def test_validation_rejects_bad_structures(blocks):
    with pytest.raises(StructureError):
        _weights(blocks).validate()


def test_validation_rejects_bad_factors():
    b = Block((Span(0, 2),), (Span(1, 4),), 2)
    _weights([b]).validate()
    with pytest.raises(StructureError):
        _weights([b], U=[np.ones((2, 1))]).validate()
    with pytest.raises(StructureError):
        _weights([b], V=[np.ones((2, 4))]).validate()
    with pytest.raises(StructureError):
        _weights([b], U=[np.full((2, 2), np.nan)]).validate()
    with pytest.raises(StructureError):
        _weights([b], U=[]).validate()
    with pytest.raises(StructureError):
        _weights([b], bias=np.zeros(6)).validate()
    with pytest.raises(StructureError):
        Structure(0, 3, ()).validate()


def test_onnx_attribute_errors():
    s = Structure(6, 5, (Block((Span(3, 5), Span(0, 1)), (Span(1, 4),), 2),)).validate()
    attrs = to_onnx_attributes(s)
    assert from_onnx_attributes(attrs) == s
    for key, val in [("ranks", [2, 1]), ("row_spans", attrs["row_spans"][:-2]), ("col_spans", [1, 9])]:
        with pytest.raises(StructureError):
            from_onnx_attributes({**attrs, key: val})
    with pytest.raises(StructureError):
        from_onnx_attributes({k: v for k, v in attrs.items() if k != "in_features"})
    w = _weights(list(s.blocks))
    u, v = pack_factors(w)
    assert u.dtype == np.float32 and u.size == 3 * 2 and v.size == 2 * 3
    with pytest.raises(StructureError):
        unpack_factors(s, u[:-1], v)


@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 60))
def test_block_cost_is_what_runs_thin_products_or_one_tile(n_rows, n_cols, rank):
    b = Block((Span(0, n_rows),), (Span(0, n_cols),), rank)
    assert b.product_cost() == rank * (n_rows + n_cols) and b.tile_cost() == n_rows * n_cols
    assert b.cost() == min(b.product_cost(), b.tile_cost())
    # at or above rank |R||C| / (|R| + |C|) the tile is the cheaper way: a full-rank block costs its dense product
    if rank >= min(n_rows, n_cols):
        assert b.cost() == n_rows * n_cols


def test_a_full_rank_block_costs_its_dense_product():
    """Kept FFN neurons as a GBLR layer: k components over rows [0, k) x all columns cost k x n_in, not
    k (k + n_in): the budget, the report and `inspect` charge what the lowered MatMul runs."""
    n_in, n_out, k = 24, 96, 30
    layer = GBLRLinear(n_in, n_out, num_components=n_in, bias=False)
    layer.set_intervals([n_in] * n_in, [0] * n_in, [k] * n_in, [0] * n_in)
    s = layer.eval().hard_structure()
    assert len(s.blocks) == 1 and s.blocks[0].rank == n_in
    assert layer.flops() == s.cost() == k * n_in < layer.product_flops() == n_in * (k + n_in)
