"""Model family: a tiny ResNet-style CNN, compressed (Conv2d -> GBLRConv2d) and lowered to standard ONNX ops."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gblrc
from gblrc import GBLRConv2d, GBLRLinear
from gblrc.learn.budget import cost_ratio
from gblrc.cli import main
from gblrc.runtime import make_session

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyResNet(nn.Module):
    """8x8 grey images (digits-like): stem conv, one residual block, a strided conv, global pool, two Linears."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)  # 1*3*3 = 9 inputs: stays dense
        self.bn = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)  # the output layer: stays dense

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(h + self.conv2(torch.relu(self.conv1(h))))
        h = torch.relu(self.down(h)).mean((2, 3))
        return self.head(torch.relu(self.fc(h)))


def make_data(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.rand(n, 1, 8, 8, generator=g), "targets": torch.randint(0, 10, (n,), generator=g)}


def dense_model(seed=0):
    torch.manual_seed(seed)
    m = TinyResNet()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.1, 0.1)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def std_only(model: onnx.ModelProto) -> bool:
    return all(n.domain in ("", "ai.onnx") for n in model.graph.node)


def test_compress_and_lower_a_resnet_style_cnn(tmp_path):
    model, data = dense_model(), make_data()
    model, rep = gblrc.compress(model, 0.5, data=data, steps=10, batch_size=32, progress=False)
    assert {r["name"] for r in rep["layers"]} == {"conv1", "conv2", "down", "fc"}
    for name in ("conv1", "conv2", "down"):
        assert isinstance(getattr(model, name), GBLRConv2d)
    assert type(model.fc) is GBLRLinear and type(model.stem) is nn.Conv2d and type(model.head) is nn.Linear
    assert [int(getattr(model, n).positions) for n in ("conv1", "conv2", "down")] == [64, 64, 16]
    layers = [model.conv1, model.conv2, model.down, model.fc]
    # the ratio counts real multiply-adds (positions x per-vector cost) across convs and the Linear
    assert rep["achieved_ratio"] == pytest.approx(cost_ratio(layers))
    assert rep["dense_cost"] == 64 * 144 * 16 * 2 + 16 * 144 * 32 + 32 * 32
    assert 0.5 - 0.02 <= rep["achieved_ratio"] <= 0.5
    assert rep["steps"] == 10 and len(rep["loss_curve"]) == 10

    x = data["inputs"][:4]
    out = tmp_path / "cnn.onnx"
    lrep = gblrc.lower(model, x, out)
    m = onnx.load(str(out))
    assert std_only(m) and lrep.ops_after.get("Conv", 0) >= 4 and lrep.gblr_layers == 4
    assert "gblrc.GBLRConv" in lrep.ops_before and "gblrc.GBLRConv" not in lrep.ops_after
    conv = next(p for p in lrep.passes if p["name"] == "lower-gblr-conv")
    assert conv["counts"]["lowered_conv_dense"] + conv["counts"]["lowered_conv_stacked"] == 3
    assert lrep.max_rel_err <= 1e-4
    y = make_session(m, log=False).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-4, atol=1e-5)
    # kept GBLR ops: checked through the dense stand-in (GBLRConv as Conv)
    kept = gblrc.lower(model, x, tmp_path / "kept.onnx", keep_gblr_ops=True)
    assert kept.ops_after.get("gblrc.GBLRConv") == 3 and kept.max_rel_err <= 1e-4


def test_saved_cnn_round_trips(tmp_path):
    model, _ = gblrc.compress(dense_model(1), 0.6, data=make_data(64, 1), steps=0, progress=False, init="svd")
    p = tmp_path / "cnn.gblr.pt"
    gblrc.save(model, p, example_inputs=torch.rand(2, 1, 8, 8))
    back = gblrc.load(p, trust_pickle=True)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
    assert isinstance(back.conv1, GBLRConv2d) and back.conv1.padding == (1, 1, 1, 1)


def test_cli_compress_then_lower_a_cnn(tmp_path):
    torch.save(dense_model(2), tmp_path / "cnn.pt")
    torch.save(make_data(96, 2), tmp_path / "data.pt")
    out = tmp_path / "cnn.gblr.pt"
    r = CliRunner().invoke(
        main,
        [
            "compress",
            str(tmp_path / "cnn.pt"),
            "--budget",
            "0.5",
            "--data",
            str(tmp_path / "data.pt"),
            "--steps",
            "6",
            "-o",
            str(out),
            "-q",
            "--trust-pickle",
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    assert 0.48 <= report["achieved_ratio"] <= 0.5
    assert {L["name"] for L in report["layers"]} == {"conv1", "conv2", "down", "fc"}
    onnx_path = tmp_path / "cnn.onnx"
    r = CliRunner().invoke(main, ["lower", str(out), "-o", str(onnx_path), "--trust-pickle"])
    assert r.exit_code == 0, r.output
    assert "lower-gblr-conv" in r.output and "parity vs PyTorch" in r.output
    assert std_only(onnx.load(str(onnx_path)))
    r = CliRunner().invoke(main, ["inspect", str(onnx_path)])
    assert r.exit_code == 0 and "4 GBLR layers" in r.output, r.output
