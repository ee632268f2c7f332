"""The default pipeline: differential against a float64 reference, properties, errors naming the pass."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st

from _onnx_builders import chain_model, gblr_model, max_rel_err, op_counts, ort_run, random_weights
from gblrc.passes import DEFAULT_PIPELINE, PASSES, Pass, PassError, PassResult, run_pipeline
from gblrc.passes.base import run_passes


@settings(max_examples=500, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_in=st.integers(1, 160),
    n_out=st.integers(1, 160),
    K=st.integers(0, 10),
    r=st.integers(1, 12),
    bias=st.booleans(),
    lead=st.integers(1, 3),
    zero_frac=st.sampled_from([0.0, 0.2]),
    full_frac=st.sampled_from([0.0, 0.2]),
    max_col_frac=st.sampled_from([1.0, 0.1]),
)
def test_default_pipeline_matches_reference(seed, n_in, n_out, K, r, bias, lead, zero_frac, full_frac, max_col_frac):
    # random_weights: cyclic intervals (wrap-around), zero and full widths, overlapping blocks, rank r;
    # narrow column windows (max_col_frac 0.1) make the cost model pick the sliced lowering and tiles
    rng = np.random.default_rng(seed)
    w = random_weights(rng, n_in, n_out, K, r, bias, zero_frac, full_frac, max_col_frac)
    x = rng.standard_normal(tuple(int(d) for d in rng.integers(1, 4, lead)) + (n_in,)).astype(np.float32)
    out, results = run_pipeline(gblr_model(w, lead=lead))
    assert [r.name for r in results] == list(DEFAULT_PIPELINE)
    onnx.checker.check_model(out, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in out.graph.node)
    assert all(o.domain != "gblrc" for o in out.opset_import)
    assert "Pad" not in op_counts(out)
    for optimize in (False, True):
        assert max_rel_err(out, w, x, optimize) <= 1e-5


def test_default_pipeline_is_idempotent_on_its_output():
    w = random_weights(np.random.default_rng(8), 120, 90, 6, 2)
    once, _ = run_pipeline(gblr_model(w))
    twice, res = run_pipeline(once)
    assert op_counts(once) == op_counts(twice)
    assert not any(r.changed for r in res)


def test_malformed_node_is_a_precondition_error_naming_the_first_pass():
    m = gblr_model(random_weights(np.random.default_rng(9), 20, 30, 3, 1))
    for a in m.graph.node[0].attribute:
        if a.name == "ranks":
            a.ints[0] += 1  # the factors no longer fit the structure
    for names in (None, ["lower-gblr"], ["choose-products", "cleanup"]):
        first = (names or DEFAULT_PIPELINE)[0]
        with pytest.raises(PassError, match=f"^pass '{first}': precondition 'gblr-nodes-valid'.*values"):
            run_pipeline(m, names)


def test_factor_input_that_is_not_a_constant_is_a_precondition_error():
    m = gblr_model(random_weights(np.random.default_rng(10), 8, 8, 2, 1, bias=False))
    u = [i for i in m.graph.initializer if i.name == "U_flat"][0]
    m.graph.initializer.remove(u)
    m.graph.input.append(onnx.helper.make_tensor_value_info("U_flat", onnx.TensorProto.FLOAT, [None]))
    with pytest.raises(PassError, match="^pass 'narrow-pairs'.*gblr-nodes-valid.*not a constant"):
        run_pipeline(m)


def test_property_invalidated_by_an_earlier_pass_is_reported_for_the_later_pass():
    class Scramble(Pass):
        name, invalidates = "scramble", frozenset({"gblr-nodes-valid"})

        def run(self, graph):
            return PassResult(graph, False, {})

    m = gblr_model(random_weights(np.random.default_rng(12), 8, 8, 2, 1))
    with pytest.raises(PassError, match="^pass 'lower-gblr': precondition 'gblr-nodes-valid'.*invalidated"):
        run_passes(m, [Scramble(), PASSES["lower-gblr"]])


def test_unknown_pass_name_is_rejected_before_anything_runs():
    m = gblr_model(random_weights(np.random.default_rng(11), 8, 8, 2, 1))
    with pytest.raises(PassError, match="no-such-pass"):
        run_pipeline(m, ["lower-gblr", "no-such-pass"])


def test_registry_and_default_pipeline():
    assert DEFAULT_PIPELINE == (
        "narrow-pairs",
        "merge-blocks",
        "choose-products",
        "dense-fallback",
        "lower-gblr-conv",
        "lower-gblr",
        "cleanup",
    )
    for name, p in PASSES.items():
        assert p.name == name and p.description
        assert isinstance(p.requires, frozenset) and isinstance(p.ensures, frozenset)
        assert isinstance(p.invalidates, frozenset)
    assert "standard-ops-only" in PASSES["lower-gblr"].ensures


def test_chain_of_layers_with_clashing_names_lowers_correctly_and_deterministically():
    rng = np.random.default_rng(13)
    ws = [
        random_weights(rng, 40, 64, 5, 2),
        random_weights(rng, 64, 48, 5, 2, bias=False),
        random_weights(rng, 48, 30, 4, 1),
    ]
    m = chain_model(ws, ["", "", "a/b"])  # two unnamed nodes, one with a slash
    out, _ = run_pipeline(m)
    onnx.checker.check_model(out, full_check=True)
    assert op_counts(out)["Relu"] == 2 and not any(n.domain for n in out.graph.node)
    again, _ = run_pipeline(m)
    assert again.SerializeToString() == out.SerializeToString()
    x = rng.standard_normal((2, 3, 40))
    ref = x
    for i, w in enumerate(ws):
        ref = w.apply(ref)
        if i < len(ws) - 1:
            ref = np.maximum(ref, 0)
    for optimize in (False, True):
        y = ort_run(out, x, optimize)
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_registered_pass_is_idempotent(name):
    w = random_weights(np.random.default_rng(7), 200, 150, 10, 3)
    once, r1 = run_passes(gblr_model(w), [PASSES[name]])
    twice, r2 = run_passes(once, [PASSES[name]])
    assert not r2[0].changed, (name, r2[0].counts)
    assert op_counts(once) == op_counts(twice)
    assert once.SerializeToString() == twice.SerializeToString()


def test_unexpected_failure_inside_a_pass_is_reported_with_the_pass_name():
    class Broken(Pass):
        name = "broken"

        def run(self, graph):
            raise RuntimeError("boom")

    m = gblr_model(random_weights(np.random.default_rng(14), 8, 8, 2, 1))
    with pytest.raises(PassError, match="^pass 'broken': RuntimeError: boom"):
        run_passes(m, [Broken()])
