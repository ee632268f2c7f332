"""Saving and loading compressed models (gblrc.save / gblrc.load, gblrc.io.modelio)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import gblrc
from gblrc.errors import GblrcError
from gblrc.nn.layer import svd_layer
from gblrc.nn.layer import GBLRLinear


pytestmark = pytest.mark.usefixtures("one_thread")


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = GBLRLinear(6, 5, num_components=3)

    def forward(self, x):
        return self.fc(x).tanh()


def unsafe_globals(p):
    return torch.serialization.get_unsafe_globals_in_checkpoint(str(p))


def test_module_roundtrip_is_exact_and_weights_only(tmp_path):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    model = nn.Sequential(svd_layer(dense[0], 0.5), nn.ReLU(), svd_layer(dense[2], 0.5)).eval()
    ex = OrderedDict(input=torch.randn(2, 12))
    p = gblrc.save(model, tmp_path / "m.gblr.pt", example_inputs=ex, meta={"budget": 0.5})
    # only torch.nn classes and GBLRLinear are needed: plain torch.load(weights_only=True) + that allow-list
    assert set(unsafe_globals(p)) <= {
        "gblrc.nn.layer.GBLRLinear",
        "torch.nn.modules.container.Sequential",
        "torch.nn.modules.activation.ReLU",
    }
    with torch.serialization.safe_globals([GBLRLinear, nn.Sequential, nn.ReLU]):
        raw = torch.load(p, weights_only=True)
    assert raw["format"] == "gblrc.compressed"
    back = gblrc.load(p)
    assert not back.training and isinstance(back[0], GBLRLinear)
    assert list(back.gblrc_example_inputs) == ["input"] and back.gblrc_meta == {"budget": 0.5}
    x = torch.randn(7, 12)
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    assert back[2].structure().structure == model[2].structure().structure


def test_custom_class_needs_trust(tmp_path):
    m = Custom().eval()
    p = gblrc.save(m, tmp_path / "c.gblr.pt", example_inputs=OrderedDict(x=torch.randn(1, 6)))
    with pytest.raises(GblrcError, match="trust"):
        gblrc.load(p)
    back = gblrc.load(p, trust_pickle=True)
    x = torch.randn(3, 6)
    torch.testing.assert_close(back(x), m(x))


def _hf_roundtrip(tmp_path, model, names, make_inputs):
    for n in names:  # put GBLR layers in, as compress does
        parent, _, leaf = n.rpartition(".")
        old = model.get_submodule(n)
        n_in, n_out = (old.in_features, old.out_features) if isinstance(old, nn.Linear) else old.weight.shape
        setattr(model.get_submodule(parent), leaf, GBLRLinear(n_in, n_out, num_components=4, rank_per_component=2))
    model.eval()
    ex = make_inputs()
    p = gblrc.save(model, tmp_path / "hf.gblr.pt", example_inputs=ex)
    assert unsafe_globals(p) == []  # config dict + tensors only
    back = gblrc.load(p)
    assert type(back) is type(model) and not back.training
    for n in names:
        assert isinstance(back.get_submodule(n), GBLRLinear)
    assert list(back.gblrc_example_inputs) == list(ex)
    with torch.no_grad():
        a, b = model(*ex.values())[0], back(*back.gblrc_example_inputs.values())[0]
    torch.testing.assert_close(a, b)


def test_hf_bert_roundtrip(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        architectures=["BertModel"],
    )
    ids = torch.randint(0, 100, (2, 9))
    _hf_roundtrip(
        tmp_path,
        BertModel(cfg),
        ["encoder.layer.0.intermediate.dense", "encoder.layer.0.attention.self.query"],
        lambda: OrderedDict(input_ids=ids, attention_mask=torch.ones_like(ids)),
    )


def test_hf_gpt2_roundtrip(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32, architectures=["GPT2LMHeadModel"])
    _hf_roundtrip(
        tmp_path,
        GPT2LMHeadModel(cfg),
        ["transformer.h.0.mlp.c_fc"],
        lambda: OrderedDict(input_ids=torch.randint(0, 50, (2, 7))),
    )


def test_load_refuses_other_files(tmp_path):
    p = tmp_path / "plain.pt"
    torch.save({"a": torch.ones(2)}, p)
    with pytest.raises(GblrcError, match="not a gblrc compressed model"):
        gblrc.load(p)
    with pytest.raises(GblrcError, match="does not exist"):
        gblrc.load(tmp_path / "missing.gblr.pt")
