"""`--target-fidelity` also reports the speed of its result: the lowered fp32 and + int8 time ratios to the
dense reference (gblrc.export.speed), in the report and on the console; --no-speed skips it; a model that
cannot be lowered is said in one warning and still written.  Structure only: timings are noisy."""

from __future__ import annotations

import json
import math
import re
import tempfile

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gblrc
from gblrc.cli import main
from gblrc.errors import OptionError
from gblrc.export.speed import LABELS, lowered_speed, measure_speed, speed_line
from gblrc.learn.target import compress_to_fidelity
from gblrc.nn.layer import GBLRLinear

pytestmark = pytest.mark.usefixtures("one_thread")

FEW = dict(repeats=2, sessions=1, warmup=1, threads=1)  # timing that is fast, not meaningful
QUANTISED = {"MatMulInteger", "DynamicQuantizeLinear", "ConvInteger", "DynamicQuantizeMatMul"}
LINE = re.compile(
    r"chosen budget [\d.]+: fidelity [\d.]+; lowered fp32 [\d.]+x dense time, \+ int8 [\d.]+x "
    r"\(ONNX Runtime CPU, \d+ threads?, inputs 2x64\)"
)


def data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    a = torch.randn(12, 64, generator=g)
    s = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=s) @ a + 0.05 * torch.randn(n, 64, generator=s)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 32)).eval()


def refused() -> nn.Module:
    """Compressible, but the ONNX exporter refuses it (adaptive max pooling to a size that does not divide)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.AdaptiveMaxPool1d(30)).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("speed")
    torch.save(mlp(), d / "mlp.pt")
    torch.save(refused(), d / "refused.pt")
    torch.save(data(256, 1), d / "train.pt")
    torch.save(data(128, 2), d / "eval.pt")
    return d


def check_speed(s: dict, n_gblr: int) -> None:
    for k in ("time_ratio_fp32", "time_ratio_int8"):
        assert isinstance(s[k], float) and math.isfinite(s[k]) and s[k] > 0, (k, s[k])
    sec = s["seconds_per_run"]
    assert set(sec) == set(LABELS)
    assert s["time_ratio_fp32"] == pytest.approx(sec["lowered_fp32"] / sec["dense_fp32"])
    assert s["time_ratio_int8"] == pytest.approx(sec["lowered_int8"] / sec["dense_fp32"])
    assert s["provider"] == "CPUExecutionProvider" and s["threads"] >= 1
    ops = s["ops"]  # the right models were timed: lowered (no GBLR node left), dense reference, int8 copy
    assert not any(k.startswith("gblrc.") for m in LABELS for k in ops[m])
    assert QUANTISED & set(ops["lowered_int8"]) and not QUANTISED & (set(ops["lowered_fp32"]) | set(ops["dense_fp32"]))
    assert s["gblr_layers"] == n_gblr and s["int8"]["mode"] == "dynamic"
    assert s["int8"]["fidelity"]["cosine_mean"] > 0.99  # int8 of the lowered model, not of another
    assert s["parity"]["lowered_max_rel_err"] < 1e-4 and s["parity"]["dense_max_rel_err"] < 1e-4


def test_search_reports_the_speed_of_its_result_and_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    x, ev = data(256, 1), data(128, 2)
    kw = dict(steps=0, allocate="uniform", max_evals=2, progress=False)
    m, rep = compress_to_fidelity(mlp(), 0.95, data=x, eval_data=ev, **kw)
    s = measure_speed(m, rep, x[:8], **FEW)
    assert rep["fidelity_search"]["lowered"] is s and "chosen_budget" in rep["fidelity_search"]
    check_speed(s, sum(isinstance(t, GBLRLinear) for t in m.modules()))
    assert s["inputs"] == {"input": [8, 64]} and (s["repeats"], s["sessions"], s["threads"]) == (2, 1, 1)
    assert len(s["session_medians_s"]["dense_fp32"]) == 1
    json.dumps(rep["fidelity_search"])  # recorded as is in the report file
    lowered = gblrc.lower(m, x[:8], tmp_path / "ref.onnx")  # the fp32 model timed is what `gblrc lower` writes
    assert s["ops"]["lowered_fp32"] == lowered.ops_after
    (tmp_path / "ref.onnx").unlink()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gblrc-")]  # its temporary folders are gone
    line = speed_line(s)
    assert line.startswith("lowered fp32 ") and "+ int8" in line and "1 thread, inputs 8x64)" in line


def test_refused_model_is_skipped_with_one_warning_and_bad_settings_raise():
    x = data(64, 1)
    c, _ = gblrc.compress(refused(), 0.5, data=x, steps=0, progress=False)
    rep: dict = {}
    got = measure_speed(c, rep, x[:2], **FEW)
    assert set(got) == {"skipped"} and "ONNX export failed" in got["skipped"]
    assert rep["fidelity_search"]["lowered"] is got
    (w,) = rep["warnings"]
    assert "\n" not in w and "not measured" in w and "result stands" in w
    m, _ = gblrc.compress(mlp(), 0.5, data=x, steps=0, progress=False)
    with pytest.raises(OptionError, match="repeats"):
        measure_speed(m, {}, x[:2], repeats=0)
    with pytest.raises(gblrc.errors.GblrcError, match="ONNX export failed"):
        lowered_speed(c, x[:2], **FEW)


def invoke(*args):
    return CliRunner().invoke(main, ["compress", *map(str, args)], catch_exceptions=True)


def search(files, model, out, *extra):
    return invoke(
        files / model, "--target-fidelity", "0.9", "--budget", "0.6", "--data", files / "train.pt",
        "--eval-data", files / "eval.pt", "--steps", "0", "--allocate", "uniform", "-o", out, *extra,
    )  # fmt: skip


def test_cli_prints_the_speed_beside_the_chosen_budget(files, tmp_path):
    out = tmp_path / "t.gblr.pt"
    r = search(files, "mlp.pt", out)
    assert r.exit_code == 0, r.output
    assert LINE.search(r.output), r.output
    rep = json.loads((tmp_path / "t.gblr.pt.report.json").read_text())
    check_speed(rep["fidelity_search"]["lowered"], sum(isinstance(t, GBLRLinear) for t in gblrc.load(out).modules()))
    assert rep["fidelity_search"]["lowered"]["inputs"] == {"input": [2, 64]}  # the example inputs lower records


def test_cli_no_speed_skips_it(files, tmp_path):
    out = tmp_path / "n.gblr.pt"
    r = search(files, "mlp.pt", out, "--no-speed")
    assert r.exit_code == 0, r.output
    assert re.search(r"chosen budget [\d.]+: fidelity [\d.]+\n", r.output) and "lowered fp32" not in r.output
    assert "timing the result" not in r.output
    assert "lowered" not in json.loads((tmp_path / "n.gblr.pt.report.json").read_text())["fidelity_search"]
    r = invoke(files / "mlp.pt", "--budget", "0.5", "--no-speed", "-o", tmp_path / "x.gblr.pt")
    assert r.exit_code != 0 and r.output.strip().splitlines()[-1].startswith("Error: --no-speed only applies")


def test_cli_model_that_cannot_be_lowered_warns_and_is_still_written(files, tmp_path):
    out = tmp_path / "r.gblr.pt"
    r = search(files, "refused.pt", out)
    assert r.exit_code == 0, r.output
    warned = [ln for ln in r.output.splitlines() if ln.startswith("warning: speed of the lowered model not measured")]
    assert len(warned) == 1 and "ONNX export failed" in warned[0], r.output
    assert "speed of the lowered model not measured (see the warning)" in r.output
    assert out.exists() and (tmp_path / "r.gblr.pt.report.json").exists()
    rep = json.loads((tmp_path / "r.gblr.pt.report.json").read_text())
    assert "ONNX export failed" in rep["fidelity_search"]["lowered"]["skipped"]
