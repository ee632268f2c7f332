"""cleanup: dead nodes removed, toposorted, shapes inferred, gblrc opset dropped once no GBLR node is left."""

import numpy as np
import onnx

from _onnx_builders import assert_matches, fixed_weights, gblr_model, op_counts, random_weights
from gblrc.passes import PASSES
from gblrc.passes.base import run_passes
from gblrc.passes.lower_gblr import LowerGBLR
from gblrc.ir.structure import Block, Span


def _lowered_sliced():
    w = fixed_weights(
        50, 40, [Block((Span(30, 40),), (Span(45, 50), Span(0, 7)), 3), Block((Span(0, 20),), (Span(10, 30),), 2)]
    )
    return w, run_passes(gblr_model(w, lead=2), [LowerGBLR(force="sliced")])[0]


def test_cleanup_infers_shapes_and_drops_the_custom_opset():
    w, lowered = _lowered_sliced()
    assert not any(o.domain == "gblrc" for o in lowered.opset_import)  # export drops it once nothing uses it
    out, res = run_passes(lowered, [PASSES["cleanup"]])
    onnx.checker.check_model(out, full_check=True)
    inferred = {vi.name: vi for vi in out.graph.value_info}
    inner = [t for n in out.graph.node for t in n.output if t != "Y"]
    assert inner and all(t in inferred for t in inner)
    for t in inner:  # the code tensors keep the dynamic leading dims and a static last dim
        dims = inferred[t].type.tensor_type.shape.dim
        assert len(dims) == 3 and dims[-1].HasField("dim_value")
    assert op_counts(out) == op_counts(lowered)
    assert_matches(out, w, lead=(2, 3))


def test_cleanup_removes_dead_nodes_and_folds_constants():
    w, lowered = _lowered_sliced()
    g = onnx.helper
    # a dead branch and a constant-only chain feeding nothing useful
    lowered.graph.node.append(g.make_node("Relu", ["X"], ["dead"]))
    lowered.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(40, np.float32), "c1"))
    lowered.graph.node.append(g.make_node("Neg", ["c1"], ["negc"]))
    y = [n for n in lowered.graph.node if "Y" in n.output][0]
    y.output[0] = "Y0"
    lowered.graph.node.append(g.make_node("Add", ["Y0", "negc"], ["Y"]))
    w2_bias = w.bias - 1.0
    before = op_counts(lowered)
    out, res = run_passes(lowered, [PASSES["cleanup"]])
    after = op_counts(out)
    assert res[0].changed and res[0].counts["nodes_removed"] == 2
    assert "Relu" not in after and "Neg" not in after and after["Add"] == before["Add"]
    from gblrc.ir.structure import GBLRWeights

    assert_matches(out, GBLRWeights(w.structure, w.U, w.V, w2_bias), lead=(2, 3))


def test_cleanup_keeps_gblr_nodes_and_their_opset_when_run_before_lowering():
    w = random_weights(np.random.default_rng(3), 30, 20, 4, 2)
    out, res = run_passes(gblr_model(w), [PASSES["cleanup"]])
    assert op_counts(out) == {"GBLRLinear": 1}
    assert any(o.domain == "gblrc" for o in out.opset_import)


def test_cleanup_is_idempotent():
    _, lowered = _lowered_sliced()
    once, _ = run_passes(lowered, [PASSES["cleanup"]])
    twice, res = run_passes(once, [PASSES["cleanup"]])
    assert not res[0].changed and op_counts(once) == op_counts(twice)
    assert len(once.graph.value_info) == len(twice.graph.value_info)
