"""`gblrc.LowerConfig` (issue 27): checked settings of `gblrc.lower`, the older keyword form mapped onto it, the CLI's
defaults taken from it, and the one ONNX metadata helper."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import gblrc
from gblrc import LowerConfig
from gblrc.errors import GblrcError, OptionError
from gblrc.export.metadata import get_json, get_metadata, set_metadata
from gblrc.export.options import SettingError, as_lower_config
from test_export import gblr_nodes, mlp


@pytest.mark.parametrize(
    "kw,field,match",
    [
        (dict(opset=99), "opset", "opset must be an integer from 14 to 20 (default 17), got 99"),
        (dict(opset="17"), "opset", "opset must be an integer"),
        (dict(opset=True), "opset", "opset must be an integer"),
        (dict(precision="fp64"), "precision", "unknown precision 'fp64'"),
        (dict(quantize="int4"), "quantize", "quantize 'int4' is unknown"),
        (dict(quantize="int8", quant_mode="static"), "quant_mode", "needs calibration batches"),
        (dict(quant_mode="sometimes"), "quant_mode", "unknown quant_mode"),
        (dict(quantize="int8", precision="fp16"), "quantize", "exclude each other"),
        (dict(precision="fp16", keep_gblr_ops=True), "precision", "exclude each other"),
        (dict(optimize=True, keep_gblr_ops=True), "optimize", "does not lower"),
        (dict(tune=True, keep_gblr_ops=True), "tune", "does not lower"),
        (dict(with_dense="d.onnx", keep_gblr_ops=True), "with_dense", "does not lower"),
        (dict(rtol=-1e-3), "rtol", "rtol must be a number >= 0"),
        (dict(atol=float("nan")), "atol", "atol must be a number >= 0"),
        (dict(passes="merge_blocks"), "passes", "must be a list of names"),
        (dict(per_channel="yes"), "per_channel", "True, False or 'auto'"),
        (dict(attention="flash"), "attention", "unknown attention form 'flash'"),
        (dict(attention_threads=-1), "attention_threads", "0 (one per core) or more"),
        (dict(optimize="yes"), "optimize", "must be True or False"),
        (dict(tune="fast"), "tune", "TuneConfig"),
        (dict(calib_feeds="data.pt"), "calib_feeds", "list of feeds"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_field(kw, field, match):
    with pytest.raises(SettingError) as e:
        LowerConfig(**kw)
    assert e.value.field == field and match in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, GblrcError) and isinstance(e.value, OptionError)  # as lower()'s errors were


def test_config_is_frozen_normalised_and_replace_checks_again():
    c = LowerConfig(passes=["merge_blocks"], quant_mode=None, output_names=["y"])
    assert c.passes == ("merge_blocks",) and c.quant_mode == "dynamic" and c.output_names == ("y",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.opset = 14
    assert c.replace(opset=14).opset == 14 and c.opset == 17
    with pytest.raises(SettingError, match="opset"):
        c.replace(opset=3)
    with pytest.raises(TypeError, match="unknown lower option 'opsett'; LowerConfig has passes, opset"):
        c.replace(opsett=14)


def test_keywords_map_onto_the_config():
    assert as_lower_config(None, {"precision": "fp16"}) == LowerConfig(precision="fp16")
    base = LowerConfig(opset=14)
    assert as_lower_config(base, {}) is base
    assert as_lower_config(base, {"optimize": True}) == LowerConfig(opset=14, optimize=True)
    with pytest.raises(TypeError, match="config must be a gblrc.LowerConfig"):
        as_lower_config({"opset": 14}, {})


def test_paths_are_checked_when_used(tmp_path):
    c = LowerConfig(with_dense=tmp_path / "m.onnx")  # made anywhere; the paths are the output's business
    with pytest.raises(SettingError, match="with_dense names the output file itself"):
        c.check_paths(tmp_path / "m.onnx")
    with pytest.raises(GblrcError, match="does not exist"):
        LowerConfig(with_dense=tmp_path / "no" / "d.onnx").check_paths(None)
    LowerConfig().check_paths(tmp_path / "m.onnx")


def test_lower_takes_a_config_or_the_old_keywords(tmp_path):
    x = OrderedDict(input=torch.randn(3, 12))
    a = gblrc.lower(mlp(), x, tmp_path / "a.onnx", LowerConfig(keep_gblr_ops=True, opset=14))
    b = gblrc.lower(mlp(), x, tmp_path / "b.onnx", config=LowerConfig(opset=14), keep_gblr_ops=True)
    c = gblrc.lower(mlp(), x, tmp_path / "c.onnx", keep_gblr_ops=True, opset=14)  # the older form
    for rep, name in ((a, "a"), (b, "b"), (c, "c")):
        m = onnx.load(tmp_path / f"{name}.onnx")
        assert len(gblr_nodes(m)) == 2 and rep.passes == []
        assert {o.domain: o.version for o in m.opset_import}[""] == 14
    with pytest.raises(TypeError, match="unknown lower option 'keep_gblr'; LowerConfig has"):
        gblrc.lower(mlp(), x, tmp_path / "d.onnx", keep_gblr=True)
    with pytest.raises(GblrcError, match="exclude each other"):
        gblrc.lower(mlp(), x, tmp_path / "d.onnx", LowerConfig(keep_gblr_ops=True), precision="fp16")
    assert not (tmp_path / "d.onnx").exists()


def test_the_cli_takes_its_defaults_from_the_dataclass():
    from gblrc.cli.lower import lower as cmd

    defaults = {f.name: f.default for f in dataclasses.fields(LowerConfig)}
    params = {p.name: p for p in cmd.params}
    assert str(params["opset"].default) == str(defaults["opset"])
    for name in ("precision", "attention", "keep_gblr_ops", "optimize"):
        assert params[name].default == defaults[name], name
    assert f"[default: {defaults['quant_mode']}]" in params["quant_mode"].help
    assert f"[default: {defaults['per_channel']}]" in params["per_channel"].help


def _model():
    return helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        )
    )


def test_metadata_helper_merges_encodes_and_removes():
    m = _model()
    assert get_metadata(m) == {} and get_json(m, "gblrc.x") is None
    set_metadata(m, {"gblrc.x": {"a": [1, 2]}}, note="hi")
    set_metadata(m, {"gblrc.x": {"a": [3]}})  # one entry per key, replaced
    assert [p.key for p in m.metadata_props] == ["gblrc.x", "note"]
    assert get_metadata(m) == {"gblrc.x": '{"a":[3]}', "note": "hi"} and get_json(m, "gblrc.x") == {"a": [3]}
    set_metadata(m, note=None)
    assert get_metadata(m) == {"gblrc.x": json.dumps({"a": [3]}, separators=(",", ":"))}
