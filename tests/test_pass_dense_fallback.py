"""dense-fallback: a layer whose lowered cost is not below one dense MatMul becomes MatMul (+Add)."""

import pytest

from _onnx_builders import assert_matches, fixed_weights, gblr_model, op_counts
from gblrc.passes import PASSES, run_pipeline
from gblrc.passes.base import gblr_nodes, import_graph, run_passes
from gblrc.passes.dense_fallback import DenseFallback
from gblrc.ir.structure import Block, Span


@pytest.mark.parametrize("bias", [False, True])
def test_structure_costlier_than_dense_becomes_one_matmul(bias):
    # rank 40 on a 64 x 64 layer: 40 * 128 multiply-adds > 64 * 64
    w = fixed_weights(64, 64, [Block((Span(0, 64),), (Span(0, 64),), 40)], bias=bias)
    res = DenseFallback()(import_graph(gblr_model(w)))
    assert res.changed and res.counts == {"dense_layers": 1} and not gblr_nodes(res.graph)
    out, _ = run_pipeline(gblr_model(w, lead=2))
    assert op_counts(out) == ({"MatMul": 1, "Add": 1} if bias else {"MatMul": 1})
    (W,) = [i for i in out.graph.initializer if tuple(i.dims) == (64, 64)]
    assert_matches(out, w, lead=(2, 5))


def test_cheap_wide_structure_is_left_to_the_lowering():
    # one full-width rank-32 block on 384 -> 1536: a quarter of dense multiply-adds, thick products
    w = fixed_weights(384, 1536, [Block((Span(0, 1536),), (Span(0, 384),), 32)])
    res = DenseFallback()(import_graph(gblr_model(w)))
    assert not res.changed and len(gblr_nodes(res.graph)) == 1


def test_many_rank1_slivers_on_a_small_layer_fall_back_to_dense():
    # 24 rank-1 blocks on a 32 -> 32 layer: thin products and copies cost more than one small MatMul
    blocks = [Block((Span(i, i + 8),), (Span(i, i + 8),), 1) for i in range(24)]
    w = fixed_weights(32, 32, blocks, bias=False)
    assert w.structure.cost_ratio() < 1
    out, res = run_pipeline(gblr_model(w))
    assert op_counts(out) == {"MatMul": 1}
    assert_matches(out, w)


def test_dense_fallback_is_idempotent():
    w = fixed_weights(64, 64, [Block((Span(0, 64),), (Span(0, 64),), 40)])
    once, _ = run_passes(gblr_model(w), [PASSES["dense-fallback"]])
    twice, res = run_passes(once, [PASSES["dense-fallback"]])
    assert not res[0].changed and op_counts(once) == op_counts(twice) == {"MatMul": 1, "Add": 1}
