"""The paper's model families (samples/families.py): ViT, MLP-Mixer and GPT-2, compressed with
gblrc.compress at budget 0.5, lowered with gblrc.lower to standard ONNX ops, run in ONNX Runtime."""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import onnx
import pytest
import torch

from _samples import load_families
import gblrc
from gblrc import GBLRLinear
from gblrc.runtime import make_session

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

BUDGET = 0.5


def _load_families():
    return load_families()


F = _load_families()


def image_data(n=64, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.rand(n, 1, size, size, generator=g), "targets": torch.randint(0, 10, (n,), generator=g)}


def token_data(n=32, t=16, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 12:] = 0  # right padding on some rows
    return {"input_ids": ids, "attention_mask": mask}


def std_only(model: onnx.ModelProto) -> bool:
    return all(n.domain in ("", "ai.onnx") for n in model.graph.node)


def check_report(rep, budget=BUDGET):
    assert rep["achieved_ratio"] <= budget + 1e-12
    assert rep["achieved_ratio"] >= budget - 0.02, rep["achieved_ratio"]


def check_lowered(model, rep, path, feeds_list, reference):
    """Standard ops only, the lowering report's parity, and ORT vs PyTorch on fresh inputs."""
    assert rep.gblr_layers == sum(isinstance(m, GBLRLinear) for m in model.modules()) > 0
    assert not any(k.startswith("gblrc.") for k in rep.ops_after)
    assert rep.max_rel_err <= 1e-4
    m = onnx.load(str(path))
    assert std_only(m)
    sess = make_session(m, log=False)
    for feeds in feeds_list:
        y = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        ref = reference(feeds)
        assert y.shape == ref.shape
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("family,kw", [("vit", {}), ("vit", {"fused_qkv": False, "pool": "mean"}), ("mixer", {})])
def test_image_family_compress_and_lower(family, kw, tmp_path):
    model = F.build(family, "tiny", **kw)
    data = image_data()
    model, rep = gblrc.compress(model, BUDGET, data=data, steps=8, batch_size=16, lr=2e-3, progress=False)
    check_report(rep)
    names = {r["name"] for r in rep["layers"]}
    if family == "vit":
        qkv = {"blocks.0.attn.qkv"} if kw.get("fused_qkv", True) else {f"blocks.0.attn.{c}" for c in "qkv"}
        assert names == qkv | {"blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}
    else:
        assert names == {
            "blocks.0.token_mlp.fc1",
            "blocks.0.token_mlp.fc2",
            "blocks.0.channel_mlp.fc1",
            "blocks.0.channel_mlp.fc2",
        }
    assert type(model.head) is torch.nn.Linear  # the output layer stays dense
    path = tmp_path / f"{family}.onnx"
    lrep = gblrc.lower(model, data["inputs"][:4], path)

    def reference(feeds):
        with torch.no_grad():
            return model(feeds["input"]).numpy()

    check_lowered(model, lrep, path, [{"input": torch.rand(9, 1, 8, 8)}, {"input": torch.rand(1, 1, 8, 8)}], reference)


def test_vit_lowrank_structure(tmp_path):
    model = F.build("vit", "tiny")
    data = image_data(seed=1)
    model, rep = gblrc.compress(model, BUDGET, data=data, steps=6, batch_size=16, structure="lowrank", progress=False)
    check_report(rep)
    for r in rep["layers"]:
        layer = model.get_submodule(r["name"])
        wc, _, wr, _ = layer.hard_intervals()
        assert (wc == layer.in_features).all() and (wr == layer.out_features).all()  # full widths
        assert r["blocks"] == 1
    path = tmp_path / "vit_lowrank.onnx"
    lrep = gblrc.lower(model, data["inputs"][:4], path)

    def reference(feeds):
        with torch.no_grad():
            return model(feeds["input"]).numpy()

    check_lowered(model, lrep, path, [{"input": torch.rand(5, 1, 8, 8)}], reference)


@pytest.mark.parametrize("with_mask", [True, False])
def test_gpt2_compress_and_lower(with_mask, tmp_path):
    model = F.build("gpt2", "tiny")
    data = token_data()
    if not with_mask:
        data = {"input_ids": data["input_ids"]}
    model, rep = gblrc.compress(model, BUDGET, data=data, steps=8, batch_size=8, lr=2e-3, progress=False)
    check_report(rep)
    assert {r["name"] for r in rep["layers"]} == {
        f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert isinstance(model.transformer.h[0].mlp.c_fc, GBLRLinear)
    assert type(model.lm_head) is torch.nn.Linear
    ex = OrderedDict((k, v[:2]) for k, v in data.items())
    path = tmp_path / "gpt2.onnx"
    lrep = gblrc.lower(model, ex, path)
    assert [i.name for i in onnx.load(str(path)).graph.input] == list(ex)

    def reference(feeds):
        with torch.no_grad():
            return model(**feeds).logits.numpy()

    g = torch.Generator().manual_seed(5)
    fresh = []
    for n, t in ((3, 11), (1, 20)):  # other batch and sequence lengths than the export's
        ids = torch.randint(0, 64, (n, t), generator=g)
        feeds = {"input_ids": ids}
        if with_mask:
            mask = torch.ones_like(ids)
            mask[0, t - 3 :] = 0
            feeds["attention_mask"] = mask
        fresh.append(feeds)
    check_lowered(model, lrep, path, fresh, reference)


def test_onnx_compat_diff_and_bool_cumsum():
    """The symbolics gblrc.lower registers for HF decoders without an attention mask."""
    import io
    import warnings

    from gblrc.export.symbolic import register

    class M(torch.nn.Module):
        def forward(self, p, f):
            d = torch.diff(p, prepend=p[:, :1] - 1, dim=-1)
            return (d != 1).cumsum(-1), f.cumsum(1), torch.diff(f, n=2, dim=0, append=f[:1])

    register(17)
    p, f = torch.tensor([[0, 1, 2, 0, 1, 5], [3, 4, 5, 6, 7, 8]]), torch.randn(4, 3)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(M(), (p, f), buf, dynamo=False, opset_version=17, input_names=["p", "f"])
    outs = make_session(onnx.load_from_string(buf.getvalue()), log=False).run(None, {"p": p.numpy(), "f": f.numpy()})
    for a, r in zip(outs, M()(p, f)):
        assert a.dtype == r.numpy().dtype
        np.testing.assert_allclose(a, r.numpy(), rtol=1e-6, atol=1e-6)
