"""Autotuning (`lower(tune=...)`, `gblrc lower --tune`): measured choices, cache, never slower than dense."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gblrc
from _onnx_builders import assert_matches, chain_model, fixed_weights, gblr_model, random_weights
from gblrc import GBLRLinear
from gblrc.cli import main
from gblrc.errors import GblrcError
from gblrc.export.lowering import lower, tokens_from_inputs
from gblrc.passes import DEFAULT_PIPELINE, TuneConfig, run_tuned_pipeline, tuned_pipeline
from gblrc.passes.base import run_passes
from gblrc.passes.cost_model import DEFAULT_COST_MODEL
from gblrc.passes.lower_timed import TimedLowering, TuneCache, candidate_strategies
from gblrc.passes.timing import CACHE_ENV
from gblrc.runtime import make_session
from gblrc.ir.structure import Block, Span


class FakeTimer:
    """Times by layer input width: {n_in: fastest strategy} (``default`` for other widths); records every timed
    layer."""

    def __init__(self, fastest: dict[int, str], default: str | None = None):
        self.fastest, self.default, self.calls = fastest, default, []

    def best(self, n_in: int) -> str:
        return self.fastest[n_in] if self.default is None else self.fastest.get(n_in, self.default)

    def __call__(self, w, strategies):
        self.calls.append((w.structure.in_features, tuple(strategies)))
        best = self.best(w.structure.in_features)
        return {s: (0.5 if s == best else 1.0 + 0.1 * i) for i, s in enumerate(strategies)}


def narrow_layer(n_in, n_out, K, r, seed, col_w, row_w):
    rng = np.random.default_rng(seed)
    layer = GBLRLinear(n_in, n_out, num_components=K, rank_per_component=r)
    layer.set_intervals([col_w] * K, rng.integers(0, n_in, K), [row_w] * K, rng.integers(0, n_out, K))
    with torch.no_grad():
        torch.manual_seed(seed)
        layer.U.normal_()
        layer.V.normal_()
        layer.bias.normal_()
    return layer.eval()


def small_model():
    # two layers whose structures cost a fraction of dense, so they are timed; a LayerNorm in between (not
    # elementwise: narrow-pairs leaves the pair at its widths, which the fake timers key on)
    return nn.Sequential(
        narrow_layer(64, 96, 3, 4, 0, 16, 24), nn.LayerNorm(96), narrow_layer(96, 48, 2, 3, 1, 24, 12)
    ).eval()


def config(tmp_path, timer, **kw):
    return TuneConfig(
        tokens=32,
        threads=1,
        provider="cpu",
        cache=tmp_path / "cache",
        cost_model=DEFAULT_COST_MODEL,
        measure=timer,
        **kw,
    )


def check_runs(path, m, shape=(3, 5, 64)):
    x = torch.randn(*shape)
    (y,) = make_session(path, log=False).run(None, {"input": x.numpy()})
    with torch.no_grad():
        ref = m.double()(x.double()).numpy()
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_lower_with_tune_follows_the_fake_timer_and_matches_pytorch(tmp_path):
    m = small_model()
    timer = FakeTimer({64: "sliced", 96: "stacked"})
    inputs = OrderedDict(input=torch.randn(2, 8, 64))
    rep = lower(m, inputs, tmp_path / "t.onnx", tune=config(tmp_path, timer))
    assert [d["choice"] for d in rep.tuning] == ["sliced", "stacked"]
    assert [n for n, _ in timer.calls] == [64, 96]
    assert all("dense" in st for _, st in timer.calls)  # dense is always a candidate
    assert all(d["ratio"] == pytest.approx(0.5) and not d["cached"] for d in rep.tuning)
    assert rep.max_rel_err <= 1e-4  # ORT parity against PyTorch (lower raises otherwise)
    names = [p["name"] for p in rep.passes]
    assert names == tuned_pipeline() and "lower-timed" in names and "dense-fallback" not in names
    lines = rep.tune_lines()
    assert lines[0] == "cost model given (no calibration)"
    assert sum(line.startswith("tune ") for line in lines) == 2 and lines[-1].startswith(
        "tuned 2 layers (0 from cache)"
    )
    check_runs(tmp_path / "t.onnx", m)


def test_second_run_reads_the_cache_and_times_nothing(tmp_path):
    m = small_model()
    timer = FakeTimer({64: "segmented", 96: "dense"})
    inputs = OrderedDict(input=torch.randn(2, 8, 64))
    first = lower(m, inputs, tmp_path / "a.onnx", tune=config(tmp_path, timer))
    n = len(timer.calls)
    assert n == 2 and len(list((tmp_path / "cache" / "lowering").glob("*.json"))) == 2
    second = lower(m, inputs, tmp_path / "b.onnx", tune=config(tmp_path, timer))
    assert len(timer.calls) == n
    assert all(d["cached"] for d in second.tuning)
    assert [d["choice"] for d in second.tuning] == [d["choice"] for d in first.tuning]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    # another token count is another key: timed again
    lower(m, inputs, tmp_path / "c.onnx", tune=dataclasses.replace(config(tmp_path, timer), tokens=64))
    assert len(timer.calls) == n + 2


def test_tokens_default_from_example_inputs(tmp_path):
    assert tokens_from_inputs(OrderedDict(input=torch.randn(4, 16, 64))) == 64
    assert tokens_from_inputs(OrderedDict(input_ids=torch.ones(8, 128, dtype=torch.long))) == 1024
    m = small_model()
    timer = FakeTimer({64: "dense", 96: "dense"})
    cfg = config(tmp_path, timer)
    cfg.tokens = None
    rep = lower(m, OrderedDict(input=torch.randn(3, 7, 64)), tmp_path / "d.onnx", tune=cfg)
    key_tokens = {json.loads(p.read_text())["key"]["tokens"] for p in (tmp_path / "cache" / "lowering").glob("*.json")}
    assert key_tokens == {21} and [d["choice"] for d in rep.tuning] == ["dense", "dense"]


def _w():
    return fixed_weights(
        96, 80, [Block((Span(0, 40),), (Span(10, 30),), 4), Block((Span(30, 80),), (Span(50, 96),), 3)]
    )


@pytest.mark.parametrize(
    "times,expected",
    [
        ({"dense": 1.0, "stacked": 2.0, "sliced": 1.5}, "dense"),  # every structured lowering slower
        ({"dense": 1.0, "stacked": 0.99, "sliced": 1.5}, "dense"),  # faster, but within the margin (timing noise)
        ({"dense": 1.0, "stacked": 0.9, "sliced": 0.95}, "stacked"),
    ],
)
def test_never_slower_than_dense(times, expected):
    p = TimedLowering(measure=lambda w, st: times, margin=0.97)
    out, res = run_passes(gblr_model(_w(), lead=2), [p])
    assert res[0].counts[f"lowered_{expected}"] == 1
    assert res[0].details[0]["choice"] == expected and res[0].details[0]["ratio"] <= 1.0
    assert_matches(out, _w(), lead=(2, 3))


def test_timed_pass_always_offers_dense_and_skips_layers_costlier_than_dense():
    p = TimedLowering(strategies=("sliced",), measure=lambda w, st: {s: 1.0 for s in st})
    assert p.candidates(_w()) == ("dense", "sliced")
    big = fixed_weights(16, 16, [Block((Span(0, 16),), (Span(0, 16),), 12)])  # 12 * 32 > 16 * 16
    calls = []
    out, res = run_passes(gblr_model(big), [TimedLowering(measure=lambda w, st: calls.append(st) or {})])
    assert not calls and res[0].counts["lowered_dense"] == 1 and res[0].details[0]["times"] == {}
    w = fixed_weights(
        384, 1536, [Block((Span(0, 768),), (Span(0, 192),), 32), Block((Span(768, 1536),), (Span(192, 384),), 32)]
    )
    assert candidate_strategies(w) == ("dense", "stacked", "sliced", "segmented")


def test_run_tuned_pipeline_on_a_chain_with_calibration_and_timing_faked(tmp_path):
    from gblrc.passes.calibrate import synthetic_samples

    rng = np.random.default_rng(3)
    ws = [random_weights(rng, 48, 64, 4, 2, max_col_frac=0.3), random_weights(rng, 64, 32, 3, 1, max_col_frac=0.3)]
    calib_calls = []

    def calib(provider, threads, tokens):
        calib_calls.append(tokens)
        return synthetic_samples(DEFAULT_COST_MODEL, tokens)

    # (l1 reads a part of l0's output: narrow-pairs gives it that interval alone, a width of its own)
    timer = FakeTimer({48: "sliced", 64: "stacked"}, default="stacked")
    cfg = TuneConfig(tokens=16, threads=1, provider="cpu", cache=tmp_path, measure=timer, calibration_measure=calib)
    out, res, setup = run_tuned_pipeline(chain_model(ws, ["l0", "l1"]), cfg)
    assert calib_calls == [16] and setup.calibration is not None and not setup.calibration.from_cache
    assert setup.cost_model.peak_macs == pytest.approx(DEFAULT_COST_MODEL.peak_macs, rel=1e-3)
    timed = [r for r in res if r.name == "lower-timed"][0]
    assert [d["choice"] for d in timed.details] == [timer.best(n) for n, _ in timer.calls]
    assert len(timer.calls) == sum(w.structure.cost() < w.structure.dense_cost for w in ws)
    assert not any(n.domain for n in out.graph.node)
    onnx.checker.check_model(out, full_check=True)
    _, _, again = run_tuned_pipeline(chain_model(ws, ["l0", "l1"]), cfg)
    assert calib_calls == [16] and again.calibration.from_cache


def test_tuned_pipeline_follows_the_default_one():
    names = tuned_pipeline()
    assert "lower-timed" in names and "lower-gblr" not in names and "dense-fallback" not in names
    assert [n for n in DEFAULT_PIPELINE if n not in ("lower-gblr", "dense-fallback")] == [
        n for n in names if n != "lower-timed"
    ]


@pytest.mark.parametrize("again,expected", [(1.05, "dense"), (0.85, "stacked")])
def test_close_call_is_timed_again_against_dense_and_the_verdict_cached(tmp_path, again, expected):
    calls = []

    def timer(w, st):
        calls.append(tuple(st))
        if len(st) == 2:  # the recheck: dense against the winner only
            return {"dense": 1.0, "stacked": again}
        return {"dense": 1.0, "stacked": 0.9, "sliced": 1.2}

    def lowered():
        p = TimedLowering(
            measure=timer, strategies=("stacked", "sliced"), margin=0.97, recheck_above=0.8, cache=TuneCache(tmp_path)
        )
        return run_passes(gblr_model(_w(), lead=2), [p])

    out, res = lowered()
    assert calls == [("dense", "stacked", "sliced"), ("dense", "stacked")]
    d = res[0].details[0]
    assert d["choice"] == expected and d["recheck"] == {"dense": 1.0, "stacked": again}
    assert d["ratio"] == (1.0 if expected == "dense" else again)
    assert_matches(out, _w(), lead=(2, 3))
    _, res2 = lowered()
    assert len(calls) == 2 and res2[0].details[0]["cached"] and res2[0].details[0]["choice"] == expected
    from gblrc.passes.tune import format_tuning

    assert "rechecked: stacked" in format_tuning(res2[0].details)[0]


def test_tune_cache_ignores_corrupt_entries(tmp_path):
    cache = TuneCache(tmp_path)
    key = {"kind": "lowering", "strategies": ["dense", "sliced"], "x": 1}
    assert cache.get(key) is None
    cache.put(key, {"dense": 2.0, "sliced": 1.0}, "sliced")
    assert cache.get(key) == {"times": {"dense": 2.0, "sliced": 1.0}, "recheck": None, "choice": "sliced"}
    good = cache.path(key).read_text()
    for bad in (
        b"garbage\xff",
        b'{"key": 1}',
        b'{"times": {"dense": -1}}',
        good.replace('"choice": "sliced"', '"choice": "naive"').encode(),
        good.replace('"recheck": null', '"recheck": {"dense": "x"}').encode(),
        good.replace('"sliced": 1.0', '"sliced": -1.0').encode(),
    ):
        cache.path(key).write_bytes(bad)
        assert cache.get(key) is None, bad
    cache.put(key, {"dense": 2.0}, "dense")  # does not cover the candidates
    assert cache.get(key) is None


# ----------------------------------------------------------------- CLI (real timing, tiny model)
def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def compressed(tmp_path):
    m = small_model()
    p = tmp_path / "small.gblr.pt"
    gblrc.save(m, p, example_inputs=OrderedDict(input=torch.randn(2, 4, 64)))
    return p, m


def test_cli_lower_tune(compressed, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cli-cache"))
    src, m = compressed
    out = tmp_path / "t.onnx"
    r = run("lower", src, "-o", out, "--tune", "--tokens", "8", "--threads", "1", "--provider", "cpu")
    assert r.exit_code == 0, r.output
    assert "cost model calibrated on CPUExecutionProvider, 1 threads, 8 tokens (measured" in r.output
    assert r.output.count("\ntune ") == 2 and "tuned 2 layers (0 from cache)" in r.output
    assert "pass lower-timed: changed" in r.output and "wrote" in r.output
    assert not [n for n in onnx.load(out).graph.node if n.domain]
    check_runs(out, m)
    r = run("lower", src, "-o", tmp_path / "u.onnx", "--tune", "--tokens", "8", "--threads", "1", "--provider", "cpu")
    assert r.exit_code == 0, r.output
    assert "(from cache)" in r.output and "tuned 2 layers (2 from cache)" in r.output

    kept, opt = tmp_path / "k.onnx", tmp_path / "o.onnx"
    assert run("lower", src, "-o", kept, "--keep-gblr-ops").exit_code == 0
    r = run("opt", kept, "-o", opt, "--tune", "--tokens", "8", "--threads", "1", "--provider", "cpu")
    assert r.exit_code == 0, r.output
    assert "tuned 2 layers (2 from cache)" in r.output and "parity vs input model" in r.output


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--tokens", "8"], "--tokens only applies with --tune"),
        (["--threads", "2"], "--threads only applies with --tune"),
        (["--tune", "--tokens", "0"], "--tokens must be at least 1"),
        (["--tune", "--keep-gblr-ops"], "exclude each other"),
    ],
)
def test_cli_tune_option_errors(compressed, tmp_path, extra, match):
    out = tmp_path / "x.onnx"
    r = run("lower", compressed[0], "-o", out, *extra)
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit)
    assert r.output.strip().startswith("Error: ") and match in r.output and not out.exists()


def test_lower_api_reports_a_bad_provider_cleanly(tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(GblrcError, match="tuning failed: the CUDA provider is not available"):
        lower(
            small_model(),
            OrderedDict(input=torch.randn(2, 64)),
            tmp_path / "e.onnx",
            tune=TuneConfig(provider="cuda", cache=tmp_path),
        )
    assert not (tmp_path / "e.onnx").exists()


def test_lowerings_that_multiply_more_than_dense_are_not_candidates():
    from gblrc.passes.lower_timed import TimedLowering, realised_macs
    from gblrc.ir.structure import Block, GBLRWeights, Span, Structure
    import numpy as np

    # 6 narrow blocks of rank 48 on a 96 x 96 layer: stacked would multiply 288 x 192 > 96 x 96
    blocks = tuple(Block((Span(16 * i, 16 * i + 16),), (Span(16 * i, 16 * i + 16),), 8) for i in range(6))
    s = Structure(96, 96, blocks)
    rng = np.random.default_rng(0)
    w = GBLRWeights(
        s,
        tuple(rng.standard_normal((16, 8)) for _ in blocks),
        tuple(rng.standard_normal((8, 16)) for _ in blocks),
        None,
    )
    assert realised_macs(w, "stacked") == 48 * 192 and realised_macs(w, "segmented") == s.cost()
    cands = TimedLowering(strategies=("stacked", "sliced", "segmented")).candidates(w)
    assert cands == ("dense", "sliced", "segmented")
