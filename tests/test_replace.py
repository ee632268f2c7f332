"""Layer selection (find_linears) and in-place replacement (replace_linears)."""

import os

import pytest
import torch
from torch import nn

import _samples

from gblrc.nn.layer import GBLRLinear
from gblrc.nn.layer import svd_layer
from gblrc.nn.replace import as_linear, find_linears, replace_linears

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8), nn.Linear(8, 8))


def tiny_bert():
    return _samples.tiny_bert("BertForSequenceClassification", num_labels=3)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16)).eval()


def test_default_rule_skips_small_layers_and_the_output_layer():
    names = [n for n, _ in find_linears(mlp())]
    assert names == ["0", "2"]  # "4" is 48 -> 8 (small), "6" is the last Linear (the output) and small


def test_last_linear_of_plain_model_is_the_head_even_when_large():
    m = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
    assert [n for n, _ in find_linears(m)] == ["0"]


def test_hf_heads_are_skipped_and_include_exclude_are_regexes():
    b = tiny_bert()
    names = [n for n, _ in find_linears(b)]
    assert len(names) == 6 and all(n.startswith("bert.encoder.layer.0.") for n in names)
    assert "classifier" not in names and not any("pooler" in n for n in names)
    inc = [n for n, _ in find_linears(b, include=r"classifier|pooler")]
    assert inc == ["bert.pooler.dense", "classifier"]  # include overrides the default rule (size, head)
    exc = [n for n, _ in find_linears(b, exclude=r"attention")]
    assert len(exc) == 2 and not any("attention" in n for n in exc)
    with pytest.raises(ValueError, match="regular expression"):
        find_linears(b, include="(")


def test_gpt2_conv1d_counts_as_linear_and_replacement_is_exact_at_full_budget():
    g = tiny_gpt2()
    names = [n for n, _ in find_linears(g)]
    assert names == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]  # lm_head skipped
    conv = g.get_submodule(names[0])
    lin = as_linear(conv)
    x = torch.randn(3, 32)
    torch.testing.assert_close(lin(x), conv(x))
    W = {n: g.get_submodule(n).weight.detach().t().clone() for n in names}  # Conv1D stores (in, out)
    new = replace_linears(g, find_linears(g), 1.0, fit=svd_layer)
    assert set(new) == set(names)
    assert all(isinstance(g.get_submodule(n), GBLRLinear) for n in names)
    for n, layer in new.items():  # the GBLR weight is the truncated SVD of the (transposed) Conv1D weight
        k = layer.num_components
        U, S, Vh = torch.linalg.svd(W[n].double())
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        with torch.no_grad():
            torch.testing.assert_close(layer.dense_weight().double(), best, atol=1e-5, rtol=1e-5)


def test_replace_at_budget_keeps_cost_under_budget():
    m = mlp()
    new = replace_linears(m, ["0", "2"], 0.3)
    for layer in new.values():
        assert layer.flops() <= 0.3 * layer.dense_flops()
    assert isinstance(m[0], GBLRLinear) and isinstance(m[2], GBLRLinear) and isinstance(m[4], nn.Linear)


def test_replace_errors():
    m = mlp()
    with pytest.raises(ValueError, match="budget"):
        replace_linears(m, ["0"], 1.5)
    with pytest.raises(ValueError, match="not a linear"):
        replace_linears(m, ["1"], 0.5)
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        replace_linears(m, ["0"], 0.5)
