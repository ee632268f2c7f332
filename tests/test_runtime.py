"""gblrc.runtime: sessions (provider choice, one log line) and the parity harness."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gblrc.runtime import ParityReport, check_parity, compare_outputs, default_providers, make_session

RUNTIME_DIR = Path(__file__).resolve().parents[1] / "runtime"


def matmul_model(w: np.ndarray) -> onnx.ModelProto:
    """y = x @ w with a dynamic batch axis."""
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", w.shape[1]])],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def model_and_data():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    return matmul_model(w), x, x.astype(np.float64) @ w.astype(np.float64)


def test_session_from_proto_bytes_and_path(tmp_path, model_and_data, capsys):
    model, x, ref = model_and_data
    p = tmp_path / "m.onnx"
    onnx.save(model, p)
    for src in (model, model.SerializeToString(), p, str(p)):
        sess = make_session(src, log=False, threads=1)
        (y,) = sess.run(None, {"x": x})
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert capsys.readouterr().err == ""


def test_provider_choice_and_log_line(model_and_data, capsys):
    model, _, _ = model_and_data
    sess = make_session(model, optimize=False)
    expected = (
        "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPUExecutionProvider"
    )
    assert sess.get_providers()[0] == expected
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and sess.get_providers()[0] in err[0]
    names = [p[0] if isinstance(p, tuple) else p for p in default_providers()]
    assert names[-1] == "CPUExecutionProvider"


def test_make_session_rejects_non_models():
    with pytest.raises(TypeError):
        make_session(12345, log=False)


def test_compare_outputs_definitions():
    b = np.array([[1.0, -4.0], [2.0, 0.5]])
    a = b + np.array([[0.0, 0.02], [0.0, -0.01]])
    r = compare_outputs([a], [b], rtol=1e-2, atol=0.0)
    assert r.max_abs == pytest.approx(0.02)
    assert r.max_rel == pytest.approx(0.02 / 4.0)  # max|a-b| / max|b|
    assert r.ok  # 0.02 <= 0 + 0.01 * 4
    assert not compare_outputs([a], [b], rtol=1e-3, atol=0.0).ok
    assert compare_outputs([a], [b], rtol=0.0, atol=0.021).ok
    # errors across several outputs: the worst of them
    r2 = compare_outputs([a, np.ones(3)], [b, np.ones(3) * 1.5], rtol=1.0, atol=0.0)
    assert r2.max_abs == pytest.approx(0.5) and r2.max_rel == pytest.approx(0.5 / 1.5)


@pytest.mark.parametrize("bad", ["shape", "nan", "count"])
def test_compare_outputs_failures(bad):
    b = np.ones((2, 3))
    a = {"shape": [np.ones((3, 2))], "nan": [np.where(np.eye(2, 3) > 0, np.nan, 1.0)], "count": [b, b]}[bad]
    r = compare_outputs(a, [b], rtol=1.0, atol=1.0)
    assert not r.ok and r.max_abs == float("inf")


def test_check_parity(model_and_data):
    model, x, ref = model_and_data
    r = check_parity(model, {"x": x}, [ref], rtol=1e-5, atol=1e-6)
    assert isinstance(r, ParityReport) and r.ok
    assert r.max_rel < 1e-5 and r.provider.endswith("ExecutionProvider")
    assert r.outputs[0].shape == ref.shape
    wrong = ref.copy()
    wrong[0, 0] += 1e-2 * np.abs(ref).max()
    bad = check_parity(model, {"x": x}, [wrong], rtol=1e-3, atol=0.0, optimize=False)
    assert not bad.ok and bad.max_rel == pytest.approx(1e-2, rel=1e-2)
    assert "FAILED" in bad.line() and "max rel error" in bad.line()


def test_runtime_imports_only_onnxruntime_numpy_and_stdlib():
    allowed = {"onnxruntime", "numpy", "__future__"} | set(sys.stdlib_module_names)
    for f in RUNTIME_DIR.glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module]
            else:
                continue
            for m in mods:
                assert m.split(".")[0] in allowed, f"{f.name} imports {m}"
