"""The segmented lowering: output rows cut at block boundaries, each segment from its own blocks' codes."""

import numpy as np
import pytest

from _onnx_builders import assert_matches, fixed_weights, gblr_model, op_counts, random_weights
from gblrc.passes import PASSES, DEFAULT_COST_MODEL, CostModel
from gblrc.passes.base import run_passes
from gblrc.passes.lower_gblr import LowerGBLR
from gblrc.passes.cost_model import Segment, plan_segments, segmented_cost
from gblrc.ir.structure import Block, Span, Structure


def two_row_bands(rank=32):
    """Rows [0, 768) from input columns [0, 192); rows [768, 1536) from columns [192, 384)."""
    return [Block((Span(0, 768),), (Span(0, 192),), rank), Block((Span(768, 1536),), (Span(192, 384),), rank)]


def test_disjoint_row_bands_give_one_segment_each():
    s = Structure(384, 1536, tuple(two_row_bands()))
    assert plan_segments(s, DEFAULT_COST_MODEL) == [Segment(0, 768, (0,)), Segment(768, 1536, (1,))]


def test_segmented_golden_op_counts_and_numerics():
    w = fixed_weights(384, 1536, two_row_bands())
    out, res = run_passes(gblr_model(w, lead=2), [LowerGBLR(force="segmented"), PASSES["cleanup"]])
    # per block: Slice + MatMul (codes); per segment: MatMul; Concat of the two output pieces; bias Add
    assert op_counts(out) == {"Slice": 2, "MatMul": 4, "Concat": 1, "Add": 1}
    shapes = sorted(tuple(i.dims) for i in out.graph.initializer if len(i.dims) == 2)
    assert shapes == [(32, 768), (32, 768), (192, 32), (192, 32)]  # no zero-padded R x n_out factor
    assert_matches(out, w, lead=(2, 3))


def test_narrow_segments_merge_when_the_model_says_so():
    # many 8-row bands: tiny MatMuls cost more in overhead than the zeros a merged segment multiplies
    blocks = [Block((Span(8 * i, 8 * i + 8),), (Span(0, 64),), 2) for i in range(8)]
    s = Structure(64, 64, tuple(blocks))
    costly = CostModel(op_overhead=1e-3)
    assert len(plan_segments(s, costly)) == 1
    assert len(plan_segments(s, CostModel(op_overhead=0.0, thin=1.0))) == 8


def test_uncovered_rows_are_zero_and_merged_into_a_neighbour():
    w = fixed_weights(40, 30, [Block((Span(5, 12),), (Span(0, 40),), 3), Block((Span(20, 25),), (Span(3, 9),), 2)])
    segs = plan_segments(w.structure, DEFAULT_COST_MODEL)
    assert segs[0].start == 0 and segs[-1].stop == 30 and all(g.blocks for g in segs)
    assert all(a.stop == b.start for a, b in zip(segs, segs[1:]))
    out, _ = run_passes(gblr_model(w), [LowerGBLR(force="segmented"), PASSES["cleanup"]])
    assert_matches(out, w)


def test_segmented_cost_counts_row_widths():
    s_full = Structure(384, 1536, (Block((Span(0, 1536),), (Span(0, 384),), 64),))
    s_half = Structure(384, 1536, tuple(two_row_bands()))
    M = CostModel(bandwidth=100e9)  # copies cheap next to products (as measured on ORT CPU)
    # same total rank; the banded layer's products are half as big on each side
    assert segmented_cost(M, s_half, True) < 0.75 * segmented_cost(M, s_full, True)
    assert M.best(s_half, True)[0] == "segmented"


@pytest.mark.parametrize("seed", range(12))
def test_random_structures_match_the_reference(seed):
    rng = np.random.default_rng(seed)
    w = random_weights(
        rng,
        int(rng.integers(1, 90)),
        int(rng.integers(1, 90)),
        int(rng.integers(1, 10)),
        int(rng.integers(1, 4)),
        bool(seed % 2),
    )
    out, _ = run_passes(gblr_model(w, lead=2), [LowerGBLR(force="segmented"), PASSES["cleanup"]])
    assert all(n.domain in ("", "ai.onnx") for n in out.graph.node)
    assert_matches(out, w, lead=(2, 3))
