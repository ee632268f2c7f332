"""merge-blocks: the pure merge algorithm (hypothesis: the matrix is preserved exactly) and the pass."""

import numpy as np
from hypothesis import given, settings, strategies as st

from _onnx_builders import assert_matches, fixed_weights, gblr_model, op_counts, random_weights
from gblrc.passes import PASSES, run_pipeline
from gblrc.passes.base import gblr_nodes, import_graph, read_gblr_node, run_passes
from gblrc.passes.cost_model import CostModel
from gblrc.ir.merge import merge_blocks, merge_pair, union_spans
from gblrc.passes.merge_blocks import MergeBlocks
from gblrc.ir.structure import Block, Span

seeds = st.integers(0, 2**32 - 1)


def _tol(w):
    return 1e-12 * max(1.0, np.abs(w.dense()).max())


@settings(max_examples=300, deadline=None)
@given(seed=seeds, n_in=st.integers(1, 70), n_out=st.integers(1, 70), K=st.integers(2, 10), r=st.integers(1, 3))
def test_merge_pair_preserves_matrix(seed, n_in, n_out, K, r):
    rng = np.random.default_rng(seed)
    w = random_weights(rng, n_in, n_out, K, r)
    B = len(w.structure.blocks)
    if B < 2:
        return
    i, j = (int(v) for v in rng.choice(B, 2, replace=False))
    m = merge_pair(w, i, j).validate()
    assert len(m.structure.blocks) == B - 1
    assert m.structure.total_rank == w.structure.total_rank
    np.testing.assert_allclose(m.dense(), w.dense(), rtol=0, atol=_tol(w))


@settings(max_examples=200, deadline=None)
@given(
    seed=seeds,
    n_in=st.integers(1, 90),
    n_out=st.integers(1, 90),
    K=st.integers(0, 14),
    overhead=st.sampled_from([0.0, 1e-7, 4e-6, 1e-3]),
)
def test_merge_blocks_preserves_matrix_and_never_adds_blocks(seed, n_in, n_out, K, overhead):
    rng = np.random.default_rng(seed)
    w = random_weights(rng, n_in, n_out, K, 2)
    model = CostModel(op_overhead=overhead)
    m = merge_blocks(w, lambda b: model.block_codes(b, n_in)).validate()
    assert len(m.structure.blocks) <= len(w.structure.blocks)
    np.testing.assert_allclose(m.dense(), w.dense(), rtol=0, atol=_tol(w))
    # greedy merging stops at a fixed point: a second run changes nothing
    assert merge_blocks(m, lambda b: model.block_codes(b, n_in)).structure == m.structure


def test_union_spans_fuses_overlapping_and_touching():
    a = (Span(0, 3), Span(10, 12))
    b = (Span(2, 5), Span(12, 14), Span(20, 21))
    assert union_spans(a, b) == (Span(0, 5), Span(10, 14), Span(20, 21))


def test_merge_with_huge_overhead_gives_one_block_and_none_with_zero_overhead():
    w = random_weights(np.random.default_rng(3), 64, 48, 8, 1, zero_frac=0.0, full_frac=0.0)
    heavy = CostModel(op_overhead=1.0)
    assert len(merge_blocks(w, lambda b: heavy.block_codes(b, 64)).structure.blocks) == 1
    free = CostModel(op_overhead=0.0, bandwidth=1e30, thin=1e-9)  # pure multiply-adds: merging only adds work
    assert merge_blocks(w, lambda b: free.block_codes(b, 64)).structure == w.structure


def _overlapping_thin_blocks():
    # 12 rank-2 blocks on heavily overlapping column windows of a 256 -> 192 layer: many thin products
    return fixed_weights(
        256, 192, [Block((Span(16 * i, 16 * i + 16),), (Span(8 * i, 8 * i + 64),), 2) for i in range(12)]
    )


def test_pass_merges_overlapping_thin_blocks_and_keeps_numerics():
    w = _overlapping_thin_blocks()
    res = MergeBlocks()(import_graph(gblr_model(w)))
    assert res.changed and res.counts["blocks_merged"] > 0
    (node,) = gblr_nodes(res.graph)
    m = read_gblr_node(node)
    assert len(m.structure.blocks) == 12 - res.counts["blocks_merged"] < 12
    assert m.structure.total_rank == w.structure.total_rank
    np.testing.assert_allclose(m.dense(), w.dense(), rtol=0, atol=1e-5 * np.abs(w.dense()).max())
    # fewer blocks lower to fewer code MatMuls (sliced lowering: one per non-full-width block, plus the U product)
    merged, _ = run_pipeline(gblr_model(w, lead=2), ["merge-blocks", "lower-gblr", "cleanup"])
    unmerged, _ = run_pipeline(gblr_model(w), ["lower-gblr", "cleanup"])
    assert op_counts(merged).get("MatMul", 0) <= op_counts(unmerged).get("MatMul", 0)
    assert_matches(merged, w, lead=(2, 3))


def test_pass_is_idempotent_and_leaves_disjoint_wide_blocks_alone():
    w = _overlapping_thin_blocks()
    once, _ = run_passes(gblr_model(w), [PASSES["merge-blocks"]])
    twice, res = run_passes(once, [PASSES["merge-blocks"]])
    assert not res[0].changed and res[0].counts == {"blocks_merged": 0}
    # two disjoint wide rank-64 blocks: the union would double the work of each product
    wide = fixed_weights(
        512, 512, [Block((Span(0, 256),), (Span(0, 256),), 64), Block((Span(256, 512),), (Span(256, 512),), 64)]
    )
    res = MergeBlocks()(import_graph(gblr_model(wide)))
    assert not res.changed
