"""Differential: random structures lowered by the passes, run in ONNX Runtime, vs a float64 reference."""
import numpy as np
import onnx
from hypothesis import given, settings, strategies as st

from gblrc.passes import PASSES, run_pipeline
from gblrc.passes.base import run_passes
from gblrc.passes.lower_gblr import LowerGBLR
from onnx_builders import gblr_model, op_counts, ort_run, random_weights

RTOL = 1e-5


def _check(model, w, x):
    onnx.checker.check_model(model, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert all(o.domain != "gblrc" for o in model.opset_import)
    ref = w.apply(x.astype(np.float64))
    scale = max(np.abs(ref).max(), 1e-30)
    for optimize in (False, True):
        y = ort_run(model, x.astype(np.float32), optimize)
        assert y.shape == ref.shape
        err = np.abs(y - ref).max() / scale
        assert err <= RTOL, (err, optimize, op_counts(model))


@settings(max_examples=500, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_in=st.integers(1, 96), n_out=st.integers(1, 96), K=st.integers(0, 10),
       r=st.integers(1, 4), bias=st.booleans(), lead=st.integers(1, 3), zero_frac=st.sampled_from([0.0, 0.2]),
       full_frac=st.sampled_from([0.0, 0.2]))
def test_default_pipeline_matches_reference(seed, n_in, n_out, K, r, bias, lead, zero_frac, full_frac):
    rng = np.random.default_rng(seed)
    w = random_weights(rng, n_in, n_out, K, r, bias, zero_frac, full_frac)
    x = rng.standard_normal(tuple(int(d) for d in rng.integers(1, 4, lead)) + (n_in,)).astype(np.float32)
    lowered, _ = run_pipeline(gblr_model(w, lead=lead))
    _check(lowered, w, x)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_in=st.integers(1, 200), n_out=st.integers(1, 200), K=st.integers(1, 12),
       r=st.integers(1, 4), bias=st.booleans(), strategy=st.sampled_from(["stacked", "sliced"]),
       decide=st.booleans())
def test_every_lowering_strategy_matches_reference(seed, n_in, n_out, K, r, bias, strategy, decide):
    """The cost model picks dense for small layers; force the other lowerings so they are tested too."""
    rng = np.random.default_rng(seed)
    w = random_weights(rng, n_in, n_out, K, r, bias)
    x = rng.standard_normal((2, 3, n_in)).astype(np.float32)
    pre = [PASSES["merge-blocks"], PASSES["choose-products"]] if decide else []
    lowered, _ = run_passes(gblr_model(w, lead=2), pre + [LowerGBLR(force=strategy), PASSES["cleanup"]])
    _check(lowered, w, x)
