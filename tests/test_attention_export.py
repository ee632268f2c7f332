"""The export form of attention (eager / SDPA: chosen, recorded, overridable), `lower --optimize` (ONNX Runtime's
transformer optimizer on the lowered graph) and `gblrc bench` with the example shapes `lower` recorded (issue 22)."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import gblrc
from gblrc.cli import main
from gblrc.errors import GblrcError
from gblrc.export.attention import read_choice
from gblrc.export.lowering import op_counts
from gblrc.runtime import make_session


def _props(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def tiny_bert():
    """A random tiny BERT (hidden 64: its layers lower as real products, not the dense fallback), every encoder
    Linear as low rank at budget 0.4, and example inputs with padding."""
    from transformers import BertConfig, BertModel

    torch.set_num_threads(1)
    cfg = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm, _ = gblrc.compress(model, 0.4, steps=0, structure="lowrank", include=r"^encoder\.", progress=False)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    assert cm.config._attn_implementation == "sdpa"  # what transformers 5 loads
    return cm, OrderedDict(input_ids=ids, attention_mask=mask)


def _fake_timing(monkeypatch, seconds: dict, default: float):
    """gblrc.runtime.timing.best_of_sessions measuring ``seconds`` (model name -> seconds, ``default`` for the
    others) without running anything: the fusion's choices made on times the test sets."""
    import gblrc.runtime.timing as timing

    def fake(models, feeds, **kw):
        best = {k: seconds.get(k, default) for k in models}
        return timing.Timing(best=best, medians={k: [v] for k, v in best.items()})

    monkeypatch.setattr(timing, "best_of_sessions", fake)


@pytest.fixture
def fused_faster(monkeypatch):
    """The optimized graph times faster than the unfused one; dense Q/K/V help no block."""
    _fake_timing(monkeypatch, {"unfused": 1.0}, 0.5)


def _run(path, ex):
    (y,) = make_session(path, log=False).run(None, {k: v.numpy() for k, v in ex.items()})
    return y


def _torch(model, ex):
    with torch.no_grad():
        return model(**ex).last_hidden_state.numpy()


@pytest.mark.parametrize("form", ["eager", "sdpa"])
def test_each_attention_form_exports_checks_and_is_recorded(tiny_bert, tmp_path, form):
    model, ex = tiny_bert
    rep = gblrc.lower(model, ex, tmp_path / "m.onnx", attention=form, with_dense=tmp_path / "d.onnx")
    assert rep.max_rel_err <= 1e-4
    assert model.config._attn_implementation == "sdpa"  # the model is left as it was
    for p in ("m.onnx", "d.onnx"):  # the dense reference is exported in the same form
        rec = read_choice(onnx.load(str(tmp_path / p)))
        assert rec["form"] == form and rec["chosen_by"] == "option" and rec["forms"] == ["eager", "sdpa"]
    y, ref = _run(tmp_path / "m.onnx", ex), _torch(model, ex)
    keep = ex["attention_mask"].numpy().astype(bool)
    assert np.abs(y - ref)[keep].max() <= 1e-4 * np.abs(ref[keep]).max()


def test_the_two_forms_are_different_graphs_of_the_same_function(tiny_bert, tmp_path):
    model, ex = tiny_bert
    for form in ("eager", "sdpa"):
        gblrc.lower(model, ex, tmp_path / f"{form}.onnx", attention=form)
    e, s = (op_counts(onnx.load(str(tmp_path / f"{f}.onnx"))) for f in ("eager", "sdpa"))
    assert e != s and sum(e.values()) < sum(s.values())  # the eager graph is the leaner one
    keep = ex["attention_mask"].numpy().astype(bool)
    a, b = _run(tmp_path / "eager.onnx", ex), _run(tmp_path / "sdpa.onnx", ex)
    assert np.abs(a - b)[keep].max() <= 1e-5 * np.abs(b[keep]).max()


def test_auto_times_both_forms_and_records_the_measurement(tiny_bert, tmp_path):
    model, ex = tiny_bert
    rep = gblrc.lower(model, ex, tmp_path / "m.onnx", with_dense=tmp_path / "d.onnx")  # attention="auto"
    a = rep.attention
    assert (
        a.form in ("eager", "sdpa") and set(a.seconds) == {"eager", "sdpa"} and all(v > 0 for v in a.seconds.values())
    )
    assert a.provider == "CPUExecutionProvider" and a.shapes == {"input_ids": [2, 16], "attention_mask": [2, 16]}
    fast = min(a.seconds, key=a.seconds.get)
    if a.chosen_by == "measured":
        assert a.form == fast and a.seconds[a.form] < 0.98 * max(a.seconds.values())
    else:  # within 2%: the form with fewer nodes
        assert a.chosen_by.startswith("rule") and a.form == min(a.nodes, key=a.nodes.get)
    for p in ("m.onnx", "d.onnx"):
        assert read_choice(onnx.load(str(tmp_path / p))) == a.as_dict()
    assert "attention: exported" in a.line() and "dense eager / dense sdpa" in a.line()


def test_attention_option_on_a_model_with_one_form(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(4, 16)
    with pytest.raises(GblrcError, match="one attention export form"):
        gblrc.lower(net, x, tmp_path / "m.onnx", attention="eager")
    assert not (tmp_path / "m.onnx").exists()
    rep = gblrc.lower(net, x, tmp_path / "m.onnx")
    assert rep.attention.form is None and read_choice(onnx.load(str(tmp_path / "m.onnx")))["chosen_by"] == "single form"
    with pytest.raises(GblrcError, match="unknown attention form"):
        gblrc.lower(net, x, tmp_path / "n.onnx", attention="flash")


def test_optimize_keeps_the_fusions_and_the_parity(tiny_bert, tmp_path, monkeypatch):
    model, ex = tiny_bert
    # block 0's dense Q/K/V (fused Attention) time faster, block 1's do not; the mix beats the unfused graph
    _fake_timing(
        monkeypatch,
        {"unfused": 1.0, "lowered": 0.8, "all dense": 0.7, "encoder.layer.0.attention": 0.7, "final": 0.75},
        0.8,
    )
    rep = gblrc.lower(model, ex, tmp_path / "m.onnx", optimize=True, with_dense=tmp_path / "d.onnx")
    assert rep.max_rel_err <= 1e-4
    assert rep.attention.form == "eager" and rep.attention.chosen_by.startswith("rule: optimize")
    ops = op_counts(onnx.load(str(tmp_path / "m.onnx")))
    assert ops["com.microsoft.SkipLayerNormalization"] == 4 and ops["com.microsoft.BiasGelu"] == 2
    f = rep.fusion
    assert f.fused["SkipLayerNormalization"] == 4 and f.fused["BiasGelu"] == 2
    # every attention block was timed both ways and its choice follows its measured ratio
    assert [b["block"] for b in f.blocks] == ["encoder.layer.0.attention", "encoder.layer.1.attention"]
    assert set(f.seconds) == {"unfused", "lowered", "all dense", "final", *[b["block"] for b in f.blocks]}
    assert f.seconds["final"] / f.seconds["unfused"] == pytest.approx(0.75)  # measured against the unfused graph
    assert f.kept == "fused" and "optimize: kept the optimized (fused) graph" in f.lines()
    assert any("the optimized graph runs 0.750x" in x for x in f.lines())
    for b in f.blocks:
        assert b["qkv"] == ("dense (Attention fused)" if b["time_ratio"] < 0.98 else "lowered")
    n_dense = sum(b["qkv"].startswith("dense") for b in f.blocks)
    assert n_dense == 1
    assert ops.get("com.microsoft.Attention", 0) == n_dense == f.fused.get("Attention", 0)
    recorded = json.loads(_props(tmp_path / "m.onnx")["gblrc.fusion"])
    assert recorded["blocks"] == f.blocks and recorded["kept"] == "fused"
    # the dense reference went through the same optimizer (and its attention fuses)
    assert op_counts(onnx.load(str(tmp_path / "d.onnx")))["com.microsoft.Attention"] == 2
    y, ref = _run(tmp_path / "m.onnx", ex), _torch(model, ex)
    keep = ex["attention_mask"].numpy().astype(bool)
    assert np.abs(y - ref)[keep].max() <= 1e-4 * np.abs(ref[keep]).max()


def test_optimize_keeps_the_unfused_graph_when_the_fused_one_is_slower(tiny_bert, tmp_path, monkeypatch):
    """Issue 27: a fused graph measured slower than the unfused one is not written; the report says so."""
    model, ex = tiny_bert
    _fake_timing(monkeypatch, {"unfused": 1.0}, 1.25)  # every optimized variant 1.25x the unfused graph
    rep = gblrc.lower(model, ex, tmp_path / "m.onnx", optimize=True, with_dense=tmp_path / "d.onnx")
    f = rep.fusion
    assert f.kept == "unfused" and f.seconds["final"] / f.seconds["unfused"] == pytest.approx(1.25)
    assert f.fused["SkipLayerNormalization"] == 4  # what the optimizer fused, in the graph not kept
    assert any(x.startswith("optimize: kept the unfused lowered graph: the optimized one is slower") for x in f.lines())
    m = onnx.load(str(tmp_path / "m.onnx"))
    assert not any(n.domain == "com.microsoft" for n in m.graph.node)  # the unfused lowered graph
    assert op_counts(m) == rep.ops_after and "MatMul" in rep.ops_after
    assert json.loads(_props(tmp_path / "m.onnx")["gblrc.fusion"])["kept"] == "unfused"
    # like for like: the dense reference is not optimized either
    assert not any(n.domain == "com.microsoft" for n in onnx.load(str(tmp_path / "d.onnx")).graph.node)
    y, ref = _run(tmp_path / "m.onnx", ex), _torch(model, ex)
    keep = ex["attention_mask"].numpy().astype(bool)
    assert np.abs(y - ref)[keep].max() <= 1e-4 * np.abs(ref[keep]).max()


def test_cli_lower_optimize_says_which_graph_it_kept(tiny_bert, tmp_path, monkeypatch):
    model, ex = tiny_bert
    gblrc.save(model, tmp_path / "m.gblr.pt", example_inputs=ex)
    _fake_timing(monkeypatch, {"unfused": 1.0}, 1.3)
    r = CliRunner().invoke(main, ["lower", str(tmp_path / "m.gblr.pt"), "-o", str(tmp_path / "o.onnx"), "--optimize"])
    assert r.exit_code == 0, r.output
    assert "optimize: the optimized graph runs 1.300x the unfused lowered graph" in r.output
    assert "optimize: kept the unfused lowered graph" in r.output
    assert not any(n.domain == "com.microsoft" for n in onnx.load(str(tmp_path / "o.onnx")).graph.node)


def test_optimize_then_int8(tiny_bert, tmp_path, fused_faster):
    model, ex = tiny_bert
    rep = gblrc.lower(model, ex, tmp_path / "m8.onnx", optimize=True, quantize="int8")
    ops = op_counts(onnx.load(str(tmp_path / "m8.onnx")))
    assert rep.precision == "int8-dynamic" and ops["MatMulInteger"] > 0 and ops["com.microsoft.BiasGelu"] == 2
    assert rep.quantization["fidelity"]["cosine_mean"] > 0.9


def test_optimize_refuses_what_it_cannot_optimise(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with pytest.raises(GblrcError, match="BERT-like Hugging Face encoders"):
        gblrc.lower(net, torch.randn(4, 16), tmp_path / "m.onnx", optimize=True)
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(GblrcError, match="does not lower"):
        gblrc.lower(net, torch.randn(4, 16), tmp_path / "m.onnx", optimize=True, keep_gblr_ops=True)


def test_bench_without_shapes_uses_the_recorded_example_shapes(tiny_bert, tmp_path):
    model, ex = tiny_bert
    gblrc.lower(model, ex, tmp_path / "m.onnx", attention="eager", with_dense=tmp_path / "d.onnx")
    assert json.loads(_props(tmp_path / "m.onnx")["gblrc.example_shapes"]) == {
        "input_ids": [2, 16],
        "attention_mask": [2, 16],
    }
    r = CliRunner().invoke(
        main,
        [
            "bench",
            str(tmp_path / "m.onnx"),
            "--against",
            str(tmp_path / "d.onnx"),
            "--repeats",
            "2",
            "--sessions",
            "1",
            "--threads",
            "1",
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "no --shape given: inputs shaped as the example shapes `gblrc lower` recorded" in r.output
    assert "input_ids=2x16, attention_mask=2x16" in r.output and "time ratio" in r.output
    assert json.loads((tmp_path / "b.json").read_text())["shapes_from"].startswith("the example shapes")
    # given shapes still win
    r = CliRunner().invoke(
        main,
        [
            "bench",
            str(tmp_path / "m.onnx"),
            "--shape",
            "input_ids=1x8",
            "--shape",
            "attention_mask=1x8",
            "--repeats",
            "2",
            "--sessions",
            "1",
            "--threads",
            "1",
        ],
    )
    assert r.exit_code == 0 and "no --shape given" not in r.output and "input_ids=1x8" in r.output


def test_bench_without_shapes_on_a_dynamic_model_lower_did_not_write(tiny_bert, tmp_path):
    from gblrc.export.graph import export_onnx

    model, ex = tiny_bert
    export_onnx(model, ex, tmp_path / "plain.onnx")  # dynamic axes, no gblrc.example_shapes
    r = CliRunner().invoke(main, ["bench", str(tmp_path / "plain.onnx")])
    assert r.exit_code != 0
    assert r.output.strip().splitlines()[-1].startswith("Error: input 'input_ids' has dynamic dimensions")


def test_cli_lower_attention_and_optimize(tiny_bert, tmp_path):
    model, ex = tiny_bert
    gblrc.save(model, tmp_path / "m.gblr.pt", example_inputs=ex)
    r = CliRunner().invoke(
        main, ["lower", str(tmp_path / "m.gblr.pt"), "-o", str(tmp_path / "m.onnx"), "--attention", "sdpa"]
    )
    assert r.exit_code == 0, r.output
    assert "attention: exported sdpa (option)" in r.output
    assert read_choice(onnx.load(str(tmp_path / "m.onnx")))["form"] == "sdpa"
    r = CliRunner().invoke(main, ["lower", str(tmp_path / "m.gblr.pt"), "-o", str(tmp_path / "o.onnx"), "--optimize"])
    assert r.exit_code == 0, r.output
    assert "optimize: ONNX Runtime transformer optimizer (model type bert, 4 heads, hidden 64): fused" in r.output
    assert "encoder.layer.1.attention: Q/K/V" in r.output
    assert "optimize: kept the " in r.output  # real timings: whichever graph was faster, named
    r = CliRunner().invoke(
        main, ["lower", str(tmp_path / "m.gblr.pt"), "-o", str(tmp_path / "x.onnx"), "--attention", "flash"]
    )
    assert r.exit_code != 0 and not (tmp_path / "x.onnx").exists()
    r = CliRunner().invoke(
        main, ["lower", str(tmp_path / "m.gblr.pt"), "-o", str(tmp_path / "x.onnx"), "--optimize", "--keep-gblr-ops"]
    )
    assert r.exit_code != 0 and "exclude each other" in r.output and not (tmp_path / "x.onnx").exists()


def test_optimize_then_fp16_with_fused_attention(tiny_bert, tmp_path, fused_faster):
    """fp16 of an optimized graph whose attention is fused (the dense reference: every block fuses)."""
    model, ex = tiny_bert
    rep = gblrc.lower(
        model, ex, tmp_path / "m16.onnx", optimize=True, precision="fp16", with_dense=tmp_path / "d16.onnx"
    )
    assert rep.precision == "fp16" and rep.fp16["max_rel"] <= rep.rtol
    assert "SkipLayerNormalization" not in rep.fp16["fp32_ops"]
    d = op_counts(onnx.load(str(tmp_path / "d16.onnx")))
    assert d["com.microsoft.Attention"] == 2 and d["com.microsoft.SkipLayerNormalization"] == 4
    keep = ex["attention_mask"].numpy().astype(bool)
    y, ref = _run(tmp_path / "d16.onnx", ex), _torch(model, ex)
    assert np.abs(y.astype(np.float64) - ref)[keep].max() <= 1e-3 + 1e-2 * np.abs(ref[keep]).max()
