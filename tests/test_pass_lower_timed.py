"""lower-timed: the lowering of each layer follows the measured times (autotuning)."""

import numpy as np
import onnx
import pytest

from _onnx_builders import assert_matches, chain_model, fixed_weights, gblr_model, op_counts, random_weights
from gblrc.passes import PASSES, TIMED_PIPELINE, PassError, run_pipeline
from gblrc.passes.base import run_passes
from gblrc.passes.lower_timed import TimedLowering, candidate_model, time_strategies
from gblrc.ir.structure import Block, Span


def _w():
    return fixed_weights(
        96, 80, [Block((Span(0, 40),), (Span(10, 30),), 4), Block((Span(30, 80),), (Span(50, 96),), 3)]
    )


@pytest.mark.parametrize(
    "fastest,ops",
    [
        ("dense", {"MatMul": 1, "Add": 1}),
        ("stacked", {"MatMul": 2, "Add": 1}),
        ("sliced", {"Slice": 2, "MatMul": 3, "Concat": 1, "Add": 1}),
    ],
)
def test_lowering_follows_the_measurement(fastest, ops):
    fake = lambda w: {"dense": 3.0, "stacked": 2.0, "sliced": 2.5} | {fastest: 1.0}
    out, res = run_passes(gblr_model(_w(), lead=2), [TimedLowering(measure=fake), PASSES["cleanup"]])
    assert res[0].counts[f"lowered_{fastest}"] == 1 and op_counts(out) == ops
    assert_matches(out, _w(), lead=(2, 3))


def test_real_timing_gives_a_time_per_strategy_and_a_correct_graph():
    w = _w()
    times = time_strategies(w, tokens=64, repeats=3)
    assert set(times) == {"dense", "stacked", "sliced"} and all(t > 0 for t in times.values())
    for st in times:
        onnx.checker.check_model(candidate_model(w, st, 64), full_check=True)
    rng = np.random.default_rng(2)
    m = chain_model([random_weights(rng, 48, 64, 4, 2), random_weights(rng, 64, 32, 3, 1)], ["l0", "l1"])
    out, res = run_pipeline(m, list(TIMED_PIPELINE))
    timed = next(r for r in res if r.name == "lower-timed")
    assert sum(v for k, v in timed.counts.items() if k.startswith("lowered_")) == 2
    assert not any(n.domain for n in out.graph.node)
    onnx.checker.check_model(out, full_check=True)


def test_lower_timed_is_idempotent_and_rejects_bad_measurements():
    fake = lambda w: {"stacked": 1.0, "dense": 2.0}
    once, _ = run_passes(gblr_model(_w()), [TimedLowering(measure=fake)])
    twice, res = run_passes(once, [TimedLowering(measure=fake)])
    assert not res[0].changed and op_counts(once) == op_counts(twice)
    with pytest.raises(PassError, match="^pass 'lower-timed': timing returned unknown"):
        run_passes(gblr_model(_w()), [TimedLowering(measure=lambda w: {"naive": 1.0})])
    with pytest.raises(ValueError):
        TimedLowering(tokens=0)
