"""lower-gblr: GBLRLinear -> standard ops; goldens per strategy, every strategy against a float64 reference."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st

from _onnx_builders import assert_matches, fixed_weights, gblr_model, max_rel_err, op_counts, random_weights
from gblrc.passes import PASSES, run_pipeline
from gblrc.passes.base import run_passes
from gblrc.passes.lower_gblr import LowerGBLR, stacked_factors
from gblrc.ir.structure import Block, Span


def test_full_width_structure_lowers_to_rank_R_pair_of_products():
    # 384 -> 1536, one full-width block of rank 96: cost 0.31 of dense
    w = fixed_weights(384, 1536, [Block((Span(0, 1536),), (Span(0, 384),), 96)])
    out, res = run_pipeline(gblr_model(w), ["lower-gblr", "cleanup"])
    assert op_counts(out) == {"MatMul": 2, "Add": 1}
    shapes = sorted(tuple(i.dims) for i in out.graph.initializer if len(i.dims) == 2)
    assert shapes == [(96, 1536), (384, 96)]  # 2-D constant weights (ORT prepacks them)
    assert_matches(out, w)


def test_sliced_lowering_golden_with_wraparound_block():
    # block 0 wraps around the input axis (two column pieces), block 1 is full width
    w = fixed_weights(
        50,
        40,
        [Block((Span(30, 40), Span(0, 5)), (Span(45, 50), Span(0, 7)), 3), Block((Span(0, 40),), (Span(0, 50),), 2)],
    )
    out, _ = run_passes(gblr_model(w, lead=2), [LowerGBLR(force="sliced"), PASSES["cleanup"]])
    # full-width codes: 1 MatMul; wrapped block: 2 Slices + Concat + MatMul; Concat codes; stacked U MatMul; bias Add
    assert op_counts(out) == {"MatMul": 3, "Slice": 2, "Concat": 2, "Add": 1}
    assert_matches(out, w, lead=(2, 3))


def test_stacked_factors_reproduce_the_matrix():
    w = random_weights(np.random.default_rng(5), 33, 21, 7, 2)
    Vs, Us = stacked_factors(w)
    np.testing.assert_allclose((Vs @ Us).T, w.dense(), atol=1e-12)


def test_no_naive_pad_sum_lowering_for_many_blocks():
    blocks = [Block((Span(96 * i, 96 * i + 96),), (Span(24 * i, 24 * i + 24),), 4) for i in range(16)]
    w = fixed_weights(384, 1536, blocks)
    out, _ = run_pipeline(gblr_model(w))
    ops = op_counts(out)
    assert "Pad" not in ops and "Sum" not in ops and ops.get("MatMul", 0) <= 17
    assert_matches(out, w)


def test_empty_structure_lowers_to_bias_only_output():
    w = fixed_weights(10, 7, [], bias=True)
    out, _ = run_pipeline(gblr_model(w))
    assert_matches(out, w)


def test_unknown_forced_strategy_is_rejected():
    with pytest.raises(ValueError, match="naive"):
        LowerGBLR(force="naive")


def test_lower_gblr_is_idempotent():
    w = random_weights(np.random.default_rng(7), 200, 150, 10, 3)
    once, r1 = run_passes(gblr_model(w), [PASSES["lower-gblr"]])
    twice, r2 = run_passes(once, [PASSES["lower-gblr"]])
    assert r1[0].changed and not r2[0].changed
    assert op_counts(once) == op_counts(twice)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_in=st.integers(1, 200),
    n_out=st.integers(1, 200),
    K=st.integers(1, 12),
    r=st.integers(1, 4),
    bias=st.booleans(),
    strategy=st.sampled_from(["dense", "stacked", "sliced", "segmented"]),
    decide=st.booleans(),
)
def test_every_lowering_strategy_matches_reference(seed, n_in, n_out, K, r, bias, strategy, decide):
    """The cost model picks dense for small layers; force each lowering so that all are tested."""
    rng = np.random.default_rng(seed)
    w = random_weights(rng, n_in, n_out, K, r, bias)
    x = rng.standard_normal((2, 3, n_in)).astype(np.float32)
    pre = [PASSES["merge-blocks"], PASSES["choose-products"]] if decide else []
    out, _ = run_passes(gblr_model(w, lead=2), pre + [LowerGBLR(force=strategy), PASSES["cleanup"]])
    onnx.checker.check_model(out, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in out.graph.node)
    for optimize in (False, True):
        assert max_rel_err(out, w, x, optimize) <= 1e-5
