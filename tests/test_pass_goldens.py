"""Op-count goldens for fixed structures, idempotency of every pass, and errors that name the pass."""
import numpy as np
import onnx
import pytest

from gblrc.passes import DEFAULT_PIPELINE, PASSES, PassError, run_pipeline
from gblrc.passes.base import run_passes
from gblrc.structure import Block, GBLRWeights, Span, Structure
from onnx_builders import gblr_model, op_counts, ort_run, random_weights


def _weights(n_in, n_out, blocks, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    s = Structure(n_in, n_out, tuple(blocks)).validate()
    U = tuple(rng.standard_normal((b.n_rows, b.rank)) for b in s.blocks)
    V = tuple(rng.standard_normal((b.rank, b.n_cols)) for b in s.blocks)
    return GBLRWeights(s, U, V, rng.standard_normal(n_out) if bias else None).validate()


def _check_numerics(model, w):
    x = np.random.default_rng(1).standard_normal((4, w.structure.in_features)).astype(np.float32)
    ref = w.apply(x.astype(np.float64))
    np.testing.assert_allclose(ort_run(model, x), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_full_width_structure_lowers_to_rank_R_pair_of_products():
    # 384 -> 1536, three full-width components of rank 32: R = 96, cost 0.31 of dense
    full = Block((Span(0, 1536),), (Span(0, 384),), 96)
    w = _weights(384, 1536, [full])
    out, _ = run_pipeline(gblr_model(w))
    assert op_counts(out) == {"MatMul": 2, "Add": 1}
    shapes = sorted(tuple(i.dims) for i in out.graph.initializer if len(i.dims) == 2)
    assert shapes == [(96, 1536), (384, 96)]
    _check_numerics(out, w)


def test_structure_costlier_than_dense_lowers_to_one_matmul():
    # rank 40 on a 64 x 64 layer: 40 * 128 multiply-adds > 64 * 64
    w = _weights(64, 64, [Block((Span(0, 64),), (Span(0, 64),), 40)], bias=False)
    out, _ = run_pipeline(gblr_model(w))
    assert op_counts(out) == {"MatMul": 1}
    _check_numerics(out, w)


def test_narrow_blocks_on_a_large_layer_are_not_lowered_densely_or_naively():
    # 16 rank-4 blocks of 96 x 24 on a 384 -> 1536 layer: the naive lowering would need 16 Pads + Sum
    blocks = [Block((Span(96 * i, 96 * i + 96),), (Span(24 * i, 24 * i + 24),), 4) for i in range(16)]
    w = _weights(384, 1536, blocks)
    out, _ = run_pipeline(gblr_model(w))
    ops = op_counts(out)
    assert "Pad" not in ops and "Sum" not in ops
    assert ops.get("MatMul", 0) <= 17
    _check_numerics(out, w)


def test_empty_structure_lowers_to_bias_only_output():
    w = _weights(10, 7, [], bias=True)
    out, _ = run_pipeline(gblr_model(w))
    _check_numerics(out, w)


@pytest.mark.parametrize("name", list(PASSES))
def test_every_pass_is_idempotent(name):
    w = random_weights(np.random.default_rng(7), 200, 150, 10, 3)
    once, _ = run_passes(gblr_model(w), [PASSES[name]])
    twice, res = run_passes(once, [PASSES[name]])
    assert not res[0].changed, res[0].counts
    assert op_counts(once) == op_counts(twice)


def test_default_pipeline_is_idempotent_and_changes_nothing_on_a_lowered_graph():
    w = random_weights(np.random.default_rng(8), 120, 90, 6, 2)
    once, _ = run_pipeline(gblr_model(w))
    twice, res = run_pipeline(once)
    assert op_counts(once) == op_counts(twice)
    assert not any(r.changed for r in res[:-1])


def test_violated_precondition_names_the_pass():
    w = random_weights(np.random.default_rng(9), 20, 30, 3, 1)
    m = gblr_model(w)
    for a in m.graph.node[0].attribute:
        if a.name == "ranks":
            a.ints[0] += 1  # factors no longer fit the structure
    for name in ("merge-blocks", "lower-gblr"):
        with pytest.raises(PassError, match=f"pass '{name}'"):
            run_pipeline(m, [name])


def test_factor_input_that_is_not_a_constant_is_a_precondition_error():
    w = random_weights(np.random.default_rng(10), 8, 8, 2, 1, bias=False)
    m = gblr_model(w)
    u = [i for i in m.graph.initializer if i.name == "U_flat"][0]
    m.graph.initializer.remove(u)
    m.graph.input.append(onnx.helper.make_tensor_value_info("U_flat", onnx.TensorProto.FLOAT, [None]))
    with pytest.raises(PassError, match="pass 'merge-blocks'.*gblr-nodes-valid"):
        run_pipeline(m)


def test_unknown_pass_name_is_rejected():
    w = random_weights(np.random.default_rng(11), 8, 8, 2, 1)
    with pytest.raises(PassError, match="no-such-pass"):
        run_pipeline(gblr_model(w), ["lower-gblr", "no-such-pass"])


def test_default_pipeline_lists_known_passes_and_ends_with_standard_ops():
    assert set(DEFAULT_PIPELINE) <= set(PASSES)
    assert all("standard-ops-only" not in PASSES[n].requires for n in DEFAULT_PIPELINE[:1])
