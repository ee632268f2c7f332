"""Pipelines of configured pass instances (Pipeline / PassManager), the one unknown-pass check, the one
default timing config and the one lowering decision (gblrc.ir.cost.lowering_decision)."""

import dataclasses

import numpy as np
import pytest

from _onnx_builders import chain_model, fixed_weights, gblr_model, random_weights
from gblrc.errors import GblrcError
from gblrc.export.lowering import check_pass_names
from gblrc.ir.cost import dense_by_flops, is_full_width, lowered_estimate, lowering_decision
from gblrc.ir.merge import merge_structure
from gblrc.ir.structure import Block, Span, Structure
from gblrc.passes import (
    DEFAULT_PIPELINE,
    DEFAULT_TIMING,
    PASSES,
    TIMED_PIPELINE,
    Pass,
    PassConfig,
    PassError,
    PassManager,
    PassResult,
    Pipeline,
    TuneConfig,
    UnknownPassError,
    default_pipeline,
    passes_from_names,
    run_pipeline,
    run_tuned_pipeline,
    timed_pipeline,
    tuned_pipeline,
)
from gblrc.passes.base import gblr_nodes, import_graph
from gblrc.passes.choose_products import tile_indices
from gblrc.passes.cleanup import Cleanup
from gblrc.passes.cost_model import DEFAULT_COST_MODEL, CostModel
from gblrc.passes.dense_fallback import DenseFallback
from gblrc.passes.lower_gblr import LowerGBLR
from gblrc.passes.lower_timed import TimedLowering
from gblrc.passes.merge_blocks import MergeBlocks
from gblrc.passes.narrow_pairs import NarrowPairs
from gblrc.passes.timing import CACHE_ENV
from gblrc.passes.tune import prepare_tuning

CM = CostModel(dense_margin=0.95, stacked_margin=1.0, thin=8.0)


def _model(seed=0):
    return gblr_model(random_weights(np.random.default_rng(seed), 120, 90, 6, 2), lead=2)


# ----------------------------------------------------------------- the Pipeline object
def test_a_pipeline_of_instances_runs_them_in_order_and_returns_each_result():
    pipe = default_pipeline()
    assert isinstance(pipe, Pipeline) and PassManager is Pipeline
    assert pipe.names == DEFAULT_PIPELINE and len(pipe) == len(DEFAULT_PIPELINE)
    assert all(isinstance(p, Pass) for p in pipe) and repr(pipe).startswith("Pipeline([narrow-pairs, merge-blocks")
    out, results = pipe(_model())
    assert [r.name for r in results] == list(DEFAULT_PIPELINE) and all(isinstance(r, PassResult) for r in results)
    ref, _ = run_pipeline(_model())
    assert out.SerializeToString() == ref.SerializeToString()
    again, _ = Pipeline([NarrowPairs(), MergeBlocks(), *passes_from_names(DEFAULT_PIPELINE[2:])]).run(_model())
    assert again.SerializeToString() == ref.SerializeToString()


def test_a_pipeline_holds_passes_only_and_tracks_requires_and_ensures():
    with pytest.raises(TypeError, match="Pass instances"):
        Pipeline(["lower-gblr"])

    class Scramble(Pass):
        name, invalidates = "scramble", frozenset({"gblr-nodes-valid"})

        def run(self, graph):
            return PassResult(graph, False, {})

    with pytest.raises(PassError, match="^pass 'lower-gblr': precondition 'gblr-nodes-valid'.*invalidated"):
        Pipeline([Scramble(), LowerGBLR()])(_model())


def test_configured_passes_get_their_cost_model_in_the_constructor():
    pipe = default_pipeline(CM)
    assert [p.model for p in pipe if hasattr(p, "model")] == [CM] * 5
    by_hand = Pipeline(
        [NarrowPairs(), MergeBlocks(CM), *passes_from_names(DEFAULT_PIPELINE[2:], PassConfig(cost_model=CM))]
    )
    a, _ = pipe(_model(1))
    b, _ = by_hand(_model(1))
    assert a.SerializeToString() == b.SerializeToString()
    timing = dataclasses.replace(DEFAULT_TIMING, tokens=64, repeats=3, margin=0.9, use_cache=False)
    timed = timed_pipeline(CM, timing)
    assert timed.names == TIMED_PIPELINE and list(TIMED_PIPELINE) == tuned_pipeline()
    (lt,) = [p for p in timed if isinstance(p, TimedLowering)]
    assert (lt.tokens, lt.repeats, lt.margin, lt.model, lt.cache) == (64, 3, 0.9, CM, None)
    assert "dense-fallback" not in timed.names and "lower-gblr" not in timed.names


# ----------------------------------------------------------------- one unknown-pass check
def test_one_unknown_pass_error_everywhere(tmp_path):
    with pytest.raises(UnknownPassError) as e:
        passes_from_names(["lower-gblr", "no-such-pass"])
    assert isinstance(e.value, PassError) and isinstance(e.value, ValueError) and e.value.pass_name == "no-such-pass"
    msg = str(e.value)
    assert msg.startswith("unknown pass 'no-such-pass'; choose from: ") and all(n in msg for n in PASSES)
    with pytest.raises(UnknownPassError, match="^unknown pass 'no-such-pass'"):
        run_pipeline(_model(), ["lower-gblr", "no-such-pass"])
    with pytest.raises(GblrcError) as g:
        check_pass_names([" lower-gblr ", "no-such-pass"])
    assert str(g.value) == msg
    assert check_pass_names([" lower-gblr ", "", "cleanup"]) == ["lower-gblr", "cleanup"]
    calls = []
    cfg = TuneConfig(
        tokens=8, threads=1, provider="cpu", cache=tmp_path, calibration_measure=lambda *a: calls.append(a)
    )
    with pytest.raises(UnknownPassError, match="^unknown pass 'no-such-pass'"):
        run_tuned_pipeline(_model(), cfg, ["lower-timed", "no-such-pass"])
    assert calls == []  # rejected before the calibration


# ----------------------------------------------------------------- one default timing config
def _timing_of(p: TimedLowering):
    return (p.tokens, p.repeats, p.threads, p.provider, p.margin, p.recheck_above)


def test_lower_timed_times_alike_by_name_and_through_tune(tmp_path):
    d = DEFAULT_TIMING
    expected = (d.tokens, d.repeats, d.threads, d.provider, d.margin, d.recheck_above)
    assert expected == (1024, 9, 0, "auto", 0.97, 0.6) and d.use_cache
    by_name = [PASSES["lower-timed"], passes_from_names(["lower-timed"])[0], TimedLowering.from_config(PassConfig())]
    (in_pipeline,) = [p for p in timed_pipeline() if isinstance(p, TimedLowering)]
    for p in by_name + [in_pipeline]:
        assert _timing_of(p) == expected and p.cache is not None
    assert _timing_of(TimedLowering()) == expected
    c = TuneConfig()
    assert (c.repeats, c.threads, c.provider, c.margin, c.recheck_above, c.use_cache, c.cache) == (
        d.repeats,
        d.threads,
        d.provider,
        d.margin,
        d.recheck_above,
        d.use_cache,
        d.cache,
    )
    setup = prepare_tuning(TuneConfig(provider="cpu", cache=tmp_path, cost_model=DEFAULT_COST_MODEL))
    assert setup.timing == dataclasses.replace(
        d, threads=setup.threads, provider=setup.provider, cache=setup.cache_folder
    )


def test_lower_timed_by_name_caches_its_times(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    rng = np.random.default_rng(2)
    m = chain_model([random_weights(rng, 48, 64, 4, 2, max_col_frac=0.3)], ["l0"])
    _, res = run_pipeline(m, list(TIMED_PIPELINE))
    timed = [r for r in res if r.name == "lower-timed"][0]
    assert len(list((tmp_path / "lowering").glob("*.json"))) == sum(bool(d["times"]) for d in timed.details) == 1
    _, res = run_pipeline(m, list(TIMED_PIPELINE))
    assert all(d["cached"] for r in res if r.name == "lower-timed" for d in r.details)


def test_the_tuned_pipeline_by_name_gets_the_calibrated_model_and_the_timing(tmp_path):
    seen = []

    def measure(w, st):
        seen.append(tuple(st))
        return {s: (0.5 if s == "stacked" else 1.0) for s in st}

    w = fixed_weights(96, 80, [Block((Span(0, 40),), (Span(10, 30),), 4), Block((Span(30, 80),), (Span(50, 96),), 3)])
    cfg = TuneConfig(tokens=16, threads=1, provider="cpu", use_cache=False, cost_model=CM, measure=measure)
    out, res, setup = run_tuned_pipeline(gblr_model(w), cfg, ["choose-products", "lower-timed", "cleanup"])
    assert setup.passes == ["choose-products", "lower-timed", "cleanup"] and [r.name for r in res] == setup.passes
    assert res[1].details[0]["choice"] == "stacked" and seen
    assert setup.pass_config() == PassConfig(cost_model=CM, timing=setup.timing, measure=measure)


# ----------------------------------------------------------------- one lowering decision
def test_the_lowering_decision():
    n = 64
    assert is_full_width(Block((Span(0, 8),), (Span(0, n),), 2), n)
    assert not is_full_width(Block((Span(0, 8),), (Span(0, 32), Span(32, n)), 2), n)
    assert not is_full_width(Block((Span(0, 8),), (Span(0, 32),), 2), n)
    costly = Structure(n, n, (Block((Span(0, n),), (Span(0, n),), 40),))  # 40 * 128 > 64 * 64
    assert dense_by_flops(costly) and dense_by_flops(Structure(n, n, ()))
    assert lowering_decision(costly, True) == ("dense", DEFAULT_COST_MODEL.dense(costly, True))
    assert lowering_decision(costly, True, measured={"dense": 1.0, "stacked": 0.1}) == ("dense", 1.0)
    # without the FLOP rule (choose-products' estimate) the model's margins alone decide
    loose = CostModel(stacked_margin=1e9)
    assert lowering_decision(costly, True, model=loose, flops=False)[0] == "stacked"
    wide = Structure(384, 1536, (Block((Span(0, 1536),), (Span(0, 384),), 32),))
    assert lowering_decision(wide, True) == DEFAULT_COST_MODEL.best(wide, True)
    assert lowering_decision(wide, True)[0] != "dense"
    # measured: the fastest below margin x dense, else dense; ties by name
    t = {"dense": 1.0, "stacked": 0.9, "sliced": 0.9, "segmented": 0.95}
    assert lowering_decision(wide, True, measured=t, margin=0.97) == ("sliced", 0.9)
    assert lowering_decision(wide, True, measured=t, margin=0.9)[0] == "dense"
    assert lowering_decision(wide, True, measured={"stacked": 2.0, "sliced": 3.0})[0] == "stacked"


@pytest.mark.parametrize("seed", range(40))
def test_every_decider_agrees_with_lowering_decision(seed):
    rng = np.random.default_rng(seed)
    w = random_weights(
        rng,
        int(rng.integers(8, 160)),
        int(rng.integers(8, 160)),
        int(rng.integers(1, 10)),
        int(rng.integers(1, 12)),
        max_col_frac=float(rng.choice([1.0, 0.3, 0.1])),
    )
    s, bias = w.structure, w.bias is not None
    decided = lowering_decision(s, bias, tile_indices(w))[0]
    res = DenseFallback()(import_graph(gblr_model(w)))
    assert (res.counts["dense_layers"] == 1) == (decided == "dense") == (not gblr_nodes(res.graph))
    lowered = LowerGBLR()(import_graph(gblr_model(w)))
    assert lowered.counts[f"lowered_{decided}"] == 1
    merged = merge_structure(s, lambda b: DEFAULT_COST_MODEL.block_codes(b, s.in_features))
    assert lowered_estimate(s, bias) == lowering_decision(merged, bias)
    if dense_by_flops(s):  # nothing to time (candidates also drops lowerings that multiply more than dense)
        assert TimedLowering().candidates(w) == ("dense",)
    assert Cleanup().name in PASSES
