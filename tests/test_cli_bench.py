"""`gblrc bench`: times, throughput and the ratio printed, JSON written, clean one-line errors."""

from __future__ import annotations

import json
import re
from collections import OrderedDict

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import gblrc
from gblrc.export.bench import make_feeds
from gblrc.errors import GblrcError
from test_cli_lower import clean_failure, ok, run
from test_export import mlp

FAST = ["--threads", "1", "--repeats", "3", "--sessions", "1", "--warmup", "1"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A lowered model and its dense reference (gblrc lower --with-dense)."""
    d = tmp_path_factory.mktemp("bench")
    src = d / "mlp.gblr.pt"
    gblrc.save(mlp(seed=3), src, example_inputs=OrderedDict(input=torch.randn(2, 5, 12)))
    low, dense = d / "low.onnx", d / "dense.onnx"
    ok(run("lower", src, "-o", low, "--with-dense", dense))
    return low, dense


def test_bench_against_prints_times_throughput_ratio_and_writes_json(pair, tmp_path):
    low, dense = pair
    out = tmp_path / "b.json"
    text = ok(run("bench", low, "--against", dense, "--shape", "input=4x16x12", "--json", out, *FAST))
    assert "CPUExecutionProvider, 1 thread;" in text and "inputs input=4x16x12" in text
    rows = {l.split()[0]: l for l in text.splitlines() if l.startswith(("low.onnx", "dense.onnx"))}
    assert set(rows) == {"low.onnx", "dense.onnx"} and all(" ms " in r for r in rows.values())
    m = re.search(r"time ratio low\.onnx / dense\.onnx: ([0-9.]+) \(([0-9.]+)x the throughput\)", text)
    assert m and float(m.group(1)) > 0
    assert "outputs of low.onnx vs dense.onnx: max rel difference" in text  # the same function: ~1e-7
    data = json.loads(out.read_text())
    assert (
        data["provider"] == "CPUExecutionProvider" and data["threads"] == 1 and data["inputs"] == {"input": [4, 16, 12]}
    )
    t = {d["label"]: d["seconds_per_run"] for d in data["models"]}
    assert data["time_ratio"] == pytest.approx(t["low.onnx"] / t["dense.onnx"])
    assert float(m.group(1)) == pytest.approx(data["time_ratio"], abs=6e-4)
    assert data["batch"] == 4 and data["models"][0]["samples_per_s"] == pytest.approx(4 / t["low.onnx"])
    assert data["outputs"]["compared"] and data["outputs"]["max_rel"] < 1e-4 and data["outputs"]["cosine_min"] > 0.9999
    assert len(data["models"][0]["session_medians_s"]) == 1


def test_bench_one_model_static_shapes(tmp_path):
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(w, "w")],
    )
    p = tmp_path / "static.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), p)
    text = ok(run("bench", p, *FAST))
    assert "inputs x=3x8" in text and "static.onnx" in text and "time ratio" not in text


def test_feeds_for_token_models_stay_in_the_vocabulary():
    emb = numpy_helper.from_array(np.zeros((50, 4), np.float32), "emb")
    g = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        ],
        "g",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
        ],
        [
            helper.make_tensor_value_info("h", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("m", TensorProto.FLOAT, None),
        ],
        [emb],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    f = make_feeds(model, {"input_ids": (2, 64), "attention_mask": (2, 64)})
    assert f["input_ids"].dtype == np.int64 and f["input_ids"].max() < 50 and f["input_ids"].max() > 10
    assert (f["attention_mask"] == 1).all()
    with pytest.raises(GblrcError, match="give them with --shape input_ids=8x128"):
        make_feeds(model, {"attention_mask": (2, 3)})


@pytest.mark.parametrize(
    "args,match",
    [
        (["{missing}"], "does not exist"),
        (["{corrupt}"], "not a valid ONNX file"),
        (["{low}", "--against", "{missing}"], "does not exist"),
        (["{plain}"], "has dynamic dimensions"),  # dynamic, and no example shapes recorded by gblrc lower
        (["{low}", "--shape", "input=4x16"], "2 dimensions given, the input has 3"),
        (["{low}", "--shape", "input=4x16x13"], "dimension 2 is fixed at 12"),
        (["{low}", "--shape", "input=4xx"], "--shape 'input=4xx' is not NAME=D0xD1"),
        (["{low}", "--shape", "input=0x1x12"], "at least 1"),
        (["{low}", "--shape", "tokens=4x16"], "unknown input 'tokens'"),
        (["{low}", "--shape", "input=2x3x12", "--against", "{other}"], "bench compares models with the same inputs"),
        (["{low}", "--shape", "input=2x3x12", "--json", "{nofolder}"], "does not exist"),
        (["{low}", "--shape", "input=2x3x12", "--repeats", "0"], "--repeats must be at least 1"),
        (
            ["{low}", "--shape", "input=2x3x12", "--cuda-graph", "--provider", "cpu"],
            "--cuda-graph needs the CUDA provider",
        ),
        (["{custom}", "--shape", "input=2x12"], "cannot run"),
    ],
)
def test_bench_bad_input_is_one_line(pair, tmp_path, args, match):
    low, _ = pair
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07\x12\xff\xff garbage")
    other = tmp_path / "other.onnx"
    g = helper.make_graph(
        [helper.make_node("Relu", ["z"], ["y"])],
        "g",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), other)
    custom = tmp_path / "custom.onnx"  # an un-lowered graph: ONNX Runtime has no GBLRLinear kernel
    src = tmp_path / "m.gblr.pt"
    gblrc.save(mlp(), src, example_inputs=OrderedDict(input=torch.randn(2, 12)))
    ok(run("lower", src, "-o", custom, "--keep-gblr-ops", "--input-shape", "input=2x12"))
    plain = tmp_path / "plain.onnx"  # the lowered model without the shapes `gblrc lower` records
    m = onnx.load(str(low))
    keep = [p for p in m.metadata_props if p.key != "gblrc.example_shapes"]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    onnx.save(m, plain)
    paths = {
        "missing": tmp_path / "missing.onnx",
        "corrupt": corrupt,
        "low": low,
        "other": other,
        "custom": custom,
        "nofolder": tmp_path / "no" / "b.json",
        "plain": plain,
    }
    result = run("bench", *FAST, *[a.format(**paths) for a in args])
    clean_failure(result, paths["nofolder"], match=match)


def test_cuda_provider_missing_is_a_clear_error(pair):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    clean_failure(
        run("bench", pair[0], "--provider", "cuda", "--shape", "input=2x3x12", *FAST),
        match="the CUDA provider is not available",
    )


def _renamed_inputs(src, dst, names):
    """``src`` with its graph inputs renamed (position by position) to ``names``."""
    m = onnx.load(str(src))
    inits = {t.name for t in m.graph.initializer}
    real = [i for i in m.graph.input if i.name not in inits]
    rename = {i.name: n for i, n in zip(real, names)}
    for i in real:
        i.name = rename[i.name]
    for node in m.graph.node:
        for k, n in enumerate(node.input):
            if n in rename:
                node.input[k] = rename[n]
    onnx.save(m, str(dst))
    return dst


def test_bench_pairs_differently_named_inputs_by_position(pair, tmp_path):
    """`--against my_dense.onnx` whose single input is `x` (the lowered model's is `input`): the same shapes,
    so bench pairs them by position and says so (it refused: 'bench compares models with the same inputs')."""
    low, dense = pair
    mine = _renamed_inputs(dense, tmp_path / "my_dense.onnx", ["x"])
    out = tmp_path / "b.json"
    text = ok(run("bench", low, "--against", mine, "--shape", "input=4x16x12", "--json", out, *FAST))
    assert text.count("inputs paired by position: input -> x") == 1, text
    assert "time ratio low.onnx / my_dense.onnx" in text
    assert "outputs of low.onnx vs my_dense.onnx: max rel difference" in text
    data = json.loads(out.read_text())
    assert data["input_pairing"] == {"input": "x"} and data["outputs"]["max_rel"] < 1e-4
    # the other way round: --shape names the first model's inputs
    text = ok(run("bench", mine, "--against", low, "--shape", "x=2x3x12", *FAST))
    assert "inputs paired by position: x -> input" in text
    same = ok(run("bench", low, "--against", dense, "--shape", "input=2x3x12", *FAST))
    assert "paired by position" not in same  # same names: paired by name, nothing said


def _two_input_model(path, names, shapes, dtype=TensorProto.FLOAT):
    g = helper.make_graph(
        [helper.make_node("Add", list(names), ["y"])],
        "g",
        [helper.make_tensor_value_info(n, dtype, s) for n, s in zip(names, shapes)],
        [helper.make_tensor_value_info("y", dtype, None)],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_bench_positional_pairing_of_several_inputs_and_its_refusals(tmp_path):
    a = _two_input_model(tmp_path / "a.onnx", ["p", "q"], [[2, 3], [2, 3]])
    b = _two_input_model(tmp_path / "b.onnx", ["u", "v"], [[2, 3], [2, 3]])
    text = ok(run("bench", a, "--against", b, *FAST))
    assert "inputs paired by position: p -> u, q -> v" in text and "max rel difference 0" in text
    cases = {
        "count": _two_input_model(tmp_path / "one.onnx", ["u", "u"], [[2, 3], [2, 3]]),  # one graph input
        "shape": _two_input_model(tmp_path / "shape.onnx", ["u", "v"], [[2, 3], [2, 4]]),
        "dtype": _two_input_model(tmp_path / "int.onnx", ["u", "v"], [[2, 3], [2, 3]], TensorProto.INT64),
        "crossed": _two_input_model(tmp_path / "crossed.onnx", ["q", "w"], [[2, 3], [2, 3]]),  # q moved
    }
    m = onnx.load(str(cases["count"]))
    del m.graph.input[1]
    onnx.save(m, str(cases["count"]))
    for why, other in cases.items():
        line = clean_failure(run("bench", a, "--against", other, *FAST), match="bench compares models")
        assert str(other.name) in line, (why, line)
