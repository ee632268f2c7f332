"""The merge algorithm is a pure function on the IR: merging preserves the matrix exactly."""
import numpy as np
from hypothesis import given, settings, strategies as st

from gblrc.passes.cost_model import CostModel
from gblrc.passes.merge import merge_blocks, merge_pair, union_spans
from gblrc.structure import Span
from onnx_builders import random_weights

seeds = st.integers(0, 2**32 - 1)


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
    np.testing.assert_allclose(m.dense(), w.dense(), rtol=0, atol=1e-12 * max(1.0, np.abs(w.dense()).max()))


@settings(max_examples=200, deadline=None)
@given(seed=seeds, n_in=st.integers(1, 90), n_out=st.integers(1, 90), K=st.integers(0, 14),
       overhead=st.sampled_from([0.0, 1e-7, 4e-6, 1e-3]))
def test_merge_blocks_preserves_matrix_and_never_adds_blocks(seed, n_in, n_out, K, overhead):
    rng = np.random.default_rng(seed)
    w = random_weights(rng, n_in, n_out, K, 2)
    model = CostModel(op_overhead=overhead)
    m = merge_blocks(w, lambda b: model.block_codes(b, n_in)).validate()
    assert len(m.structure.blocks) <= len(w.structure.blocks)
    np.testing.assert_allclose(m.dense(), w.dense(), rtol=0, atol=1e-12 * max(1.0, np.abs(w.dense()).max()))
    # greedy merging stops at a fixed point: a second run changes nothing
    m2 = merge_blocks(m, lambda b: model.block_codes(b, n_in))
    assert m2.structure == m.structure


def test_union_spans_fuses_overlapping_and_touching():
    a = (Span(0, 3), Span(10, 12))
    b = (Span(2, 5), Span(12, 14), Span(20, 21))
    assert union_spans(a, b) == (Span(0, 5), Span(10, 14), Span(20, 21))


def test_merge_with_huge_overhead_gives_one_block_and_none_with_zero_overhead():
    rng = np.random.default_rng(3)
    w = random_weights(rng, 64, 48, 8, 1, zero_frac=0.0, full_frac=0.0)
    heavy = CostModel(op_overhead=1.0)
    assert len(merge_blocks(w, lambda b: heavy.block_codes(b, 64)).structure.blocks) == 1
    free = CostModel(op_overhead=0.0, bandwidth=1e30, thin=1e-9)  # pure multiply-adds: merging only adds work
    assert merge_blocks(w, lambda b: free.block_codes(b, 64)).structure == w.structure
