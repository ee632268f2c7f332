"""Data-aware initialisation: whitened truncated SVD and the sequential refit (gblrc.learn.calib)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gblrc
from gblrc.learn.calib import call_order, input_covariances, sequential_refit, whiten_layer
from gblrc.nn.layer import svd_layer
from gblrc.learn.config import CompressConfig
from gblrc.learn.train import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")


class Chain(nn.Module):
    """Two linear maps with a skip: the second layer's input carries the first one's error."""

    def __init__(self, n=24):
        super().__init__()
        self.b = nn.Linear(n, n)  # registered first, called second: call order matters
        self.a = nn.Linear(n, n)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(h)) + h


def correlated_inputs(n=24, rows=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * torch.logspace(0, -2, n)[None, :]
    return [torch.randn(rows, n, generator=g) @ mix.t() for _ in range(2)]


def init_error(init: str, budget=0.3):
    """(relative output error of the initialised model, its layers)."""
    torch.manual_seed(0)
    model = Chain().double()
    teacher = copy.deepcopy(model)
    xs = [x.double() for x in correlated_inputs()]
    names = ["a", "b"]
    covs = input_covariances(model, names, xs)
    dense_w = {n: getattr(model, n).weight.detach().clone() for n in names}
    layers = {}
    for n in names:
        layers[n] = svd_layer(getattr(model, n), budget).double().eval()
        whiten_layer(layers[n], dense_w[n], covs[n])
        setattr(model, n, layers[n])
    if init == "sequential":
        assert sequential_refit(model, teacher, layers, dense_w, xs) == []
    with torch.no_grad():
        err = sum(((model(x) - teacher(x)) ** 2).sum() / (teacher(x) ** 2).sum() for x in xs).item()
    return err, layers


def test_call_order_follows_the_forward_pass_not_registration():
    m = Chain()
    assert call_order(m, ["b", "a"], torch.randn(3, 24)) == ["a", "b"]


def test_sequential_refit_keeps_the_first_layer_and_corrects_the_next():
    (data, dl), (seq, sl) = init_error("data"), init_error("sequential")
    # the first layer called sees the teacher's own inputs: the refit is the whitened SVD again
    torch.testing.assert_close(sl["a"].dense_weight(), dl["a"].dense_weight(), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(sl["b"].dense_weight(), dl["b"].dense_weight())
    assert seq < data, (data, seq)  # the second layer is fitted to the first one's actual output


def test_sequential_init_through_compress_runs_and_keeps_the_budget():
    torch.manual_seed(0)
    x = torch.randn(256, 48)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 3))
    m, rep = gblrc.compress(model, 0.4, data=x, steps=4, init="sequential", progress=False)
    assert rep["achieved_ratio"] <= 0.4 and not rep["warnings"]
    with pytest.raises(ValueError, match="init"):
        gblrc.compress(copy.deepcopy(model), 0.4, data=x, steps=1, init="nope", progress=False)


def test_content_lr_decays_by_cosine_to_lr_min():
    cfg = Schedule.of(CompressConfig(budget=0.5, steps=101, lr=1e-3).replace(lr_min=0.1))
    assert cfg.content_lr(0) == pytest.approx(1e-3)
    assert cfg.content_lr(50) == pytest.approx(0.55e-3)
    assert cfg.content_lr(100) == pytest.approx(1e-4)
    assert Schedule.of(CompressConfig(budget=0.5, steps=10, lr=1e-3).replace(lr_min=1.0)).content_lr(
        7
    ) == pytest.approx(1e-3)


def test_layers_that_share_an_input_are_grouped():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.o = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.o(self.q(x) * self.k(x))

    from gblrc.learn.calib import call_groups

    assert call_groups(Attn(), ["o", "k", "q"], torch.randn(2, 8)) == [["q", "k"], ["o"]]


def test_layers_fed_one_input_share_one_covariance():
    """An attention layer's query, key and value see one tensor: one covariance (one object), equal to what
    each layer's own inputs give; the layers after it get their own."""
    from _samples import tiny_bert

    model = tiny_bert(num_hidden_layers=2)
    xs = [{"input_ids": torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]
    covs = input_covariances(model, names, xs)
    assert set(covs) == set(names)
    for i in range(2):
        q, k, v = (covs[f"encoder.layer.{i}.attention.self.{p}"] for p in ("query", "key", "value"))
        assert q is k is v
        own = input_covariances(model, [f"encoder.layer.{i}.attention.self.value"], xs)
        torch.testing.assert_close(v, own[f"encoder.layer.{i}.attention.self.value"], rtol=1e-12, atol=1e-12)
    assert covs["encoder.layer.0.attention.output.dense"] is not covs["encoder.layer.0.attention.self.query"]
    assert len({id(c) for c in covs.values()}) == len(names) - 2 * 2


def test_block_covariances_are_the_covariances_one_block_at_a_time():
    """Computed when a block's layer is first asked for, only that block's held; equal to the whole-model
    pass; the block-ordered stages compute each block's once per pass."""
    from _samples import tiny_bert

    from gblrc.learn.calib import BlockCovariances

    model = tiny_bert(num_hidden_layers=3)
    g = torch.Generator().manual_seed(0)
    xs = [{"input_ids": torch.randint(0, 50, (2, 6), generator=g), "attention_mask": torch.ones(2, 6)} for _ in "ab"]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    eager = input_covariances(model, names, xs)
    lazy = BlockCovariances(model, names, xs)
    assert set(lazy) == set(names) and "nope" not in lazy
    for _ in range(2):  # two passes in block order (the sensitivity, then the initialisation)
        for n in names:
            torch.testing.assert_close(lazy[n], eager[n], rtol=1e-10, atol=1e-12)
            assert len(lazy._held) <= 6  # one block's layers
    assert lazy.computed == [f"encoder.layer.{i}" for i in range(3)] * 2
