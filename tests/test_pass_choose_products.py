"""choose-products: narrow, high-rank blocks become dense tiles (V = I); wide low-rank blocks stay products."""

import numpy as np

from _onnx_builders import assert_matches, fixed_weights, gblr_model, op_counts
from gblrc.passes import PASSES
from gblrc.passes.base import gblr_nodes, import_graph, read_gblr_node, run_passes
from gblrc.passes.lower_gblr import LowerGBLR
from gblrc.passes.choose_products import ChooseProducts, as_tile, is_tile
from gblrc.ir.structure import Block, Span


def _mixed():
    # block 0: 8 columns at rank 10 (as after merging) -> the tile (8 codes, no MatMul) beats an 8 x 10 product
    # block 1: 128 columns at rank 16 -> a 128-wide tile would add 112 rows to the U product
    return fixed_weights(
        256, 300, [Block((Span(0, 40),), (Span(100, 108),), 10), Block((Span(40, 300),), (Span(0, 128),), 16)]
    )


def test_as_tile_preserves_the_matrix():
    w = _mixed()
    t = as_tile(w, 0).validate()
    assert is_tile(t.V[0]) and t.structure.blocks[0].rank == 8
    np.testing.assert_allclose(t.dense(), w.dense(), rtol=0, atol=1e-12 * np.abs(w.dense()).max())


def test_narrow_block_becomes_tile_wide_block_stays():
    w = _mixed()
    res = ChooseProducts()(import_graph(gblr_model(w)))
    assert res.changed and res.counts == {"tiles": 1}
    (node,) = gblr_nodes(res.graph)
    c = read_gblr_node(node)
    assert is_tile(c.V[0]) and not is_tile(c.V[1])
    assert c.structure.blocks[1].rank == 16


def test_tile_saves_a_matmul_in_the_lowered_graph_and_keeps_numerics():
    w = _mixed()
    lower = [LowerGBLR(force="sliced"), PASSES["cleanup"]]
    chosen, _ = run_passes(gblr_model(w), [PASSES["choose-products"]] + lower)
    plain, _ = run_passes(gblr_model(w), lower)
    assert op_counts(plain) == {"Slice": 2, "MatMul": 3, "Concat": 1, "Add": 1}
    assert op_counts(chosen)["MatMul"] == op_counts(plain)["MatMul"] - 1
    assert_matches(chosen, w, lead=(3,))


def test_choose_products_is_idempotent():
    once, _ = run_passes(gblr_model(_mixed()), [PASSES["choose-products"]])
    _, res = run_passes(once, [PASSES["choose-products"]])
    assert not res[0].changed and res[0].counts == {"tiles": 0}
