"""The cost model reproduces the orderings measured in docs/design.md §3 (x 1024 x 384, W 1536 x 384)."""

import numpy as np

from gblrc.passes.cost_model import DEFAULT_COST_MODEL as M, CostModel
from gblrc.ir.structure import Block, Span, Structure, cyclic_spans

N_IN, N_OUT = 384, 1536


def _half_width(n_blocks, seed=0):
    rng = np.random.default_rng(seed)
    rank = 192 // n_blocks
    return Structure(
        N_IN,
        N_OUT,
        tuple(
            Block(
                cyclic_spans(int(rng.integers(N_OUT)), N_OUT // 2, N_OUT),
                cyclic_spans(int(rng.integers(N_IN)), N_IN // 2, N_IN),
                rank,
            )
            for _ in range(n_blocks)
        ),
    )


def test_stacked_beats_dense_and_sliced_degrades_with_block_count():
    sliced = []
    for nb in (4, 8, 32, 96):
        s = _half_width(nb)
        d = M.dense(s, True)
        assert M.stacked(s, True) < d  # measured 0.36-0.63 x dense
        sliced.append(M.sliced(s, True) / d)
    assert sliced == sorted(sliced)  # measured 0.39, 0.59, 1.1, 2.1 x dense
    assert sliced[0] < 1 < sliced[-1]


def test_best_is_dense_when_total_rank_reaches_the_input_width():
    s = Structure(N_IN, N_OUT, tuple(Block((Span(0, N_OUT),), (Span(96 * i, 96 * i + 96),), 96) for i in range(4)))
    assert s.total_rank == N_IN
    assert M.best(s, True)[0] == "dense"


def test_best_realises_narrow_columns_by_slicing():
    # one rank-64 block reading 32 of 384 input columns: slicing them beats a full 384-row V product
    s = Structure(N_IN, N_OUT, (Block((Span(0, N_OUT),), (Span(100, 132),), 64),))
    assert M.best(s, False)[0] == "sliced"


def test_thin_products_are_penalised_and_overhead_is_charged():
    m = CostModel(op_overhead=1e-6)
    assert m.matmul(384, 1) > m.matmul(384, 16) / 16
    assert m.matmul(0, 5) == m.op_overhead
    assert m.copy(0) == m.op_overhead
