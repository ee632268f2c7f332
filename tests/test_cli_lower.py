"""`gblrc lower / opt / passes / inspect`: working runs and clean failures on bad input."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

import gblrc
from gblrc.cli import main
from gblrc.runtime import make_session
from test_export import gblr_nodes, mlp


@pytest.fixture
def compressed(tmp_path):
    m = mlp(seed=3)
    p = tmp_path / "mlp.gblr.pt"
    gblrc.save(m, p, example_inputs=OrderedDict(input=torch.randn(2, 5, 12)))
    return p, m


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output
    return result.output


def clean_failure(result, *absent, match=None):
    """Non-zero exit, one line 'Error: ...', no traceback, no output file."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    if match:
        assert match in lines[0], lines[0]
    for p in absent:
        assert not p.exists(), p
    return lines[0]


def test_lower_writes_a_standard_onnx_model(compressed, tmp_path):
    src, m = compressed
    out = tmp_path / "m.onnx"
    text = ok(run("lower", src, "-o", out))
    assert "max abs error" in text and "max rel error" in text and "wrote" in text
    assert "gblrc.GBLRLinear" in text  # the op table (2 before, 0 after)
    model = onnx.load(out)
    assert not gblr_nodes(model)
    x = torch.randn(3, 7, 12)
    (y,) = make_session(out, log=False).run(None, {"input": x.numpy()})
    with torch.no_grad():
        ref = m.double()(x.double()).numpy()
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_lower_keep_gblr_ops_and_opt(compressed, tmp_path):
    src, _ = compressed
    kept, opt = tmp_path / "kept.onnx", tmp_path / "opt.onnx"
    ok(run("lower", src, "-o", kept, "--keep-gblr-ops"))
    assert len(gblr_nodes(onnx.load(kept))) == 2
    text = ok(run("opt", kept, "-o", opt))
    assert "parity vs input model" in text
    assert not gblr_nodes(onnx.load(opt))


def test_lower_with_input_shape(compressed, tmp_path):
    src, _ = compressed
    out = tmp_path / "s.onnx"
    ok(run("lower", src, "-o", out, "--input-shape", "input=4x9x12", "--opset", "14"))
    model = onnx.load(out)
    assert {o.domain: o.version for o in model.opset_import}[""] == 14


def test_passes_lists_every_pass():
    from gblrc.passes import DEFAULT_PIPELINE, PASSES

    text = ok(run("passes"))
    for name in PASSES:
        assert f"{name}:" in text
    assert f"default pipeline: {','.join(DEFAULT_PIPELINE)}" in text
    assert text.count("requires:") == len(PASSES)


def test_inspect_onnx_pt_and_lowered(compressed, tmp_path):
    src, m = compressed
    kept, low = tmp_path / "kept.onnx", tmp_path / "low.onnx"
    ok(run("lower", src, "-o", kept, "--keep-gblr-ops"))
    ok(run("lower", src, "-o", low))
    structs = [m[0].structure().structure, m[2].structure().structure]
    total = sum(s.cost() for s in structs)
    for f in (kept, src, low):
        text = ok(run("inspect", f))
        assert text.count("    block ") == sum(len(s.blocks) for s in structs)
        assert f"cost {total} of dense {sum(s.dense_cost for s in structs)}" in text
        for s in structs:
            assert f"{s.out_features}x{s.in_features}" in text and f"{s.cost_ratio():.4f}" in text


@pytest.fixture
def bad_files(tmp_path):
    plain_pt = tmp_path / "plain.pt"
    torch.save(torch.nn.Linear(3, 2), plain_pt)
    junk = tmp_path / "junk.gblr.pt"
    junk.write_bytes(b"this is not a model")
    good = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        )
    )
    plain_onnx = tmp_path / "plain.onnx"
    onnx.save(good, plain_onnx)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07\x12\xff\xff\xff\xff\x0f garbage")
    return {
        "plain_pt": plain_pt,
        "junk": junk,
        "plain_onnx": plain_onnx,
        "corrupt": corrupt,
        "missing": tmp_path / "missing.gblr.pt",
    }


BAD_LOWER = [
    ([], "missing", "does not exist"),
    ([], "plain_pt", "not a gblrc compressed model"),
    ([], "junk", "cannot read"),
    (["--passes", "no-such-pass"], None, "unknown pass 'no-such-pass'"),
    (["--input-shape", "input=4x12"], None, "the input has 3"),
    (["--input-shape", "input=2x5x13"], None, "do not fit"),
    (["--input-shape", "tokens=2x5"], None, "unknown input 'tokens'"),
    (["--input-shape", "input=2xx"], None, "NAME=D0xD1"),
    (["--input-shape", "input=2x0x12"], None, "at least 1"),
    (["--opset", "99"], None, "--opset must be"),
    (["--opset", "abc"], None, "--opset must be an integer from 14 to 20 (default 17), got 'abc'"),
    (["--rtol", "-1"], None, "--rtol must be a number >= 0"),
]


@pytest.mark.parametrize("extra,which,match", BAD_LOWER)
def test_lower_bad_input(compressed, bad_files, tmp_path, extra, which, match):
    src = bad_files[which] if which else compressed[0]
    out = tmp_path / "out.onnx"
    clean_failure(run("lower", src, "-o", out, *extra), out, match=match)


def test_lower_output_folder_missing(compressed, tmp_path):
    out = tmp_path / "nope" / "m.onnx"
    clean_failure(run("lower", compressed[0], "-o", out), out, match="does not exist")


@pytest.mark.parametrize(
    "which,extra,match",
    [
        ("missing", [], "does not exist"),
        ("corrupt", [], "not a valid ONNX file"),
        ("plain_onnx", ["--passes", "nope"], "unknown pass 'nope'"),
    ],
)
def test_opt_bad_input(bad_files, tmp_path, which, extra, match):
    out = tmp_path / "o.onnx"
    clean_failure(run("opt", bad_files[which], "-o", out, *extra), out, match=match)


@pytest.mark.parametrize(
    "which,match",
    [
        ("missing", "does not exist"),
        ("corrupt", "not a valid ONNX file"),
        ("plain_onnx", "not a gblrc output"),
        ("plain_pt", "not a gblrc compressed model"),
        ("junk", "cannot read"),
    ],
)
def test_inspect_bad_input(bad_files, which, match):
    clean_failure(run("inspect", bad_files[which]), match=match)


def test_lower_without_example_inputs(tmp_path):
    src, out = tmp_path / "noex.gblr.pt", tmp_path / "noex.onnx"
    gblrc.save(mlp(), src)
    clean_failure(run("lower", src, "-o", out, "--keep-gblr-ops"), out, match="--input-shape")
    ok(run("lower", src, "-o", out, "--keep-gblr-ops", "--input-shape", "input=3x12"))
    assert len(gblr_nodes(onnx.load(out))) == 2
