"""The time budget (issue 12, item 3): ``compress(budget_unit="time")`` charges each layer what the
compiler's cost model estimates for it as the default ``gblrc lower`` lowers it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from _onnx_builders import gblr_model, random_weights
from gblrc.cli import main as cli
from gblrc.ir.cost import DEFAULT_COST_MODEL as M, lowered_estimate
from gblrc.ir.merge import merge_blocks, merge_structure
from gblrc.learn import compress as C
from gblrc.learn.allocate import choose_points, uniform_time_ratios
from gblrc.learn.budget import TimeCost, cost_ratio, cost_unit, fit_to_budget
from gblrc.nn.layer import GBLRLinear
from gblrc.passes import run_pipeline


@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**31 - 1),
    K=st.integers(1, 12),
    n_in=st.sampled_from([24, 64, 96]),
    n_out=st.sampled_from([32, 64, 128]),
)
def test_merge_structure_is_the_structure_merge_blocks_gives(seed, K, n_in, n_out):
    w = random_weights(np.random.default_rng(seed), n_in, n_out, K, r=int(seed % 3) + 1)
    cost = lambda b: M.block_codes(b, n_in)  # noqa: E731 (the merge-blocks pass's block cost)
    assert merge_structure(w.structure, cost) == merge_blocks(w, cost).structure


@settings(max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), K=st.integers(1, 10), bias=st.booleans())
def test_estimate_names_the_lowering_the_default_pipeline_chooses(seed, K, bias):
    rng = np.random.default_rng(seed)
    w = random_weights(rng, 96, 128, K, r=int(rng.integers(1, 24)), bias=bias)
    strategy, seconds = lowered_estimate(w.structure, bias)
    assert seconds > 0
    # the pipeline without choose-products (its per-block tiles are not modelled by the estimate)
    _, results = run_pipeline(gblr_model(w), ["merge-blocks", "dense-fallback", "lower-gblr", "cleanup"])
    counts = {k: v for r in results for k, v in r.counts.items()}
    chosen = (
        "dense"
        if counts.get("dense_layers")
        else next(k[len("lowered_") :] for k, v in counts.items() if k.startswith("lowered_") and v)
    )
    assert chosen == strategy


def layer(n_in=64, n_out=96, K=8, seed=0, bias=True):
    torch.manual_seed(seed)
    m = GBLRLinear(n_in, n_out, num_components=K, rank_per_component=2, bias=bias)
    g = torch.Generator().manual_seed(seed)
    wc = torch.randint(1, n_in + 1, (K,), generator=g).tolist()
    wr = torch.randint(1, n_out + 1, (K,), generator=g).tolist()
    lc = torch.randint(0, n_in, (K,), generator=g).tolist()
    lr = torch.randint(0, n_out, (K,), generator=g).tolist()
    m.set_intervals(wc, lc, wr, lr)
    return m.eval()


@pytest.mark.parametrize("seed", range(5))
def test_hard_structure_is_the_structure_without_factors(seed):
    m = layer(seed=seed)
    with torch.no_grad():  # two components on the same intervals become one block of their summed rank
        m.widths[:, 1], m.locations[:, 1] = m.widths[:, 0], m.locations[:, 0]
    assert m.hard_structure() == m.structure().structure


def test_time_cost_of_a_layer_is_the_estimate_of_its_lowering():
    m = layer()
    unit = TimeCost()
    s = m.structure().structure
    assert unit.layer(m) == pytest.approx(lowered_estimate(s, True)[1])
    assert unit.dense(m) == pytest.approx(M.dense(s, True))
    assert unit.strategy(m) == lowered_estimate(s, True)[0]
    assert cost_ratio([m], "time") == pytest.approx(unit.layer(m) / unit.dense(m))
    with pytest.raises(ValueError, match="budget_unit"):
        cost_unit("seconds")


def big_layers():
    """Two layers large enough for the stacked lowering to pay (MiniLM-like shapes, scaled down)."""
    out = []
    for i, (n_in, n_out) in enumerate(((192, 768), (768, 192))):
        torch.manual_seed(i)
        m = GBLRLinear(n_in, n_out, num_components=40, rank_per_component=4, bias=True)
        with torch.no_grad():
            m.U.normal_()
            m.V.normal_()
            m.U[:, :, :] *= torch.linspace(2.0, 0.1, 40)[:, None, None]  # components of falling energy
        wr = torch.full((40,), n_out).tolist()
        m.set_intervals([n_in - 16 * (k % 3) for k in range(40)], [0] * 40, wr, [0] * 40)
        out.append(m.eval())
    return out


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_fit_to_a_time_budget_removes_whole_components_and_lands_within_it(budget):
    layers = big_layers()
    before = [m.widths.clone() for m in layers]
    assert cost_ratio(layers, "time") > budget
    ratio = fit_to_budget(layers, budget, "time")
    assert ratio == pytest.approx(cost_ratio(layers, "time")) and ratio <= budget
    unit = TimeCost()
    for m, w0 in zip(layers, before):
        live = (m.widths > 0).all(0)
        assert torch.equal(m.widths[:, live], w0[:, live])  # kept components keep their widths
        assert (m.widths[:, ~live] == 0).all()  # the others are gone whole
        assert unit.strategy(m) in ("stacked", "sliced", "segmented")
    # the strongest components are kept: removal goes by energy, weakest first
    assert all((m.widths[:, :5] > 0).all() for m in layers)
    # close to the budget: one more of the removed components would not fit
    assert ratio > budget - 0.1


def test_choose_points_takes_the_best_of_points_of_equal_cost():
    # a layer whose last three ratios all cost its dense time: the lowest loss among them is chosen
    curves = {"a": [(1.0, 5.0), (2.0, 3.0), (4.0, 2.0), (4.0, 1.0), (4.0, 0.5)], "b": [(1.0, 1.0), (2.0, 0.5)]}
    pick = choose_points(curves, {"a": 4.0, "b": 2.0}, 1.0)
    assert pick == {"a": 4, "b": 1}
    pick = choose_points(curves, {"a": 4.0, "b": 2.0}, 0.5)
    assert sum(curves[n][i][0] for n, i in pick.items()) <= 3.0


def test_uniform_time_ratios_give_the_largest_low_rank_within_the_budget():
    unit = TimeCost()
    shapes = {"up": (384, 1536, True), "sq": (384, 384, False)}
    ratios = uniform_time_ratios(shapes, 0.4, unit, rank_per_component=2)
    for n, (n_in, n_out, bias) in shapes.items():
        k = int(ratios[n] * n_in * n_out) // (n_in + n_out)
        assert k % 2 == 0
        cap = 0.4 * unit.dense_shape(n_in, n_out, bias)
        assert unit.lowrank(n_in, n_out, k, bias) <= cap < unit.lowrank(n_in, n_out, k + 2, bias)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(96, 256), nn.GELU(), nn.Linear(256, 96), nn.GELU(), nn.Linear(96, 8)).eval()


def data(n=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g) @ torch.randn(12, 96, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("structure", ["gblr", "lowrank"])
def test_compress_to_a_time_budget(structure, one_thread):
    model, rep = C.compress(
        mlp(), 0.5, data=data(), steps=12, batch_size=32, structure=structure, budget_unit="time", progress=False
    )
    assert rep["budget_unit"] == "time"
    assert rep["achieved_ratio"] == rep["time_ratio"] <= 0.5
    assert rep["flop_ratio"] == pytest.approx(sum(l["gblr_cost"] for l in rep["layers"]) / rep["dense_cost"])
    for row in rep["layers"]:
        m = dict(model.named_modules())[row["name"]]
        assert row["time_ratio"] == pytest.approx(TimeCost().layer(m) / TimeCost().dense(m), abs=1e-6)
    # the FLOP report keeps its meaning, and names the time ratio too
    _, rep2 = C.compress(mlp(), 0.5, data=data(), steps=0, structure=structure, progress=False)
    assert rep2["budget_unit"] == "flops" and rep2["achieved_ratio"] == rep2["flop_ratio"] <= 0.5
    assert "time_ratio" in rep2


def test_time_budget_refuses_convolutions_and_unknown_units():
    conv = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3))
    with pytest.raises(ValueError, match="linear layers"):
        C.compress(conv, 0.5, budget_unit="time", progress=False)
    with pytest.raises(ValueError, match="budget_unit"):
        C.check_options(0.5, budget_unit="ms")


def test_cli_budget_unit_time(tmp_path, one_thread):
    torch.save(mlp(), tmp_path / "m.pt")
    torch.save(data(), tmp_path / "d.pt")
    out = tmp_path / "m.gblr.pt"
    r = CliRunner().invoke(
        cli,
        [
            "compress",
            str(tmp_path / "m.pt"),
            "--budget",
            "0.5",
            "--budget-unit",
            "time",
            "--data",
            str(tmp_path / "d.pt"),
            "--steps",
            "6",
            "-q",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "m.gblr.pt.report.json").read_text())
    assert rep["budget_unit"] == "time" and rep["achieved_ratio"] <= 0.5
    assert "achieved time ratio" in r.output
    r = CliRunner().invoke(
        cli,
        [
            "compress",
            str(tmp_path / "m.pt"),
            "--budget",
            "0.5",
            "--budget-unit",
            "ms",
            "-o",
            str(tmp_path / "x.gblr.pt"),
        ],
    )
    assert r.exit_code == 2 and "budget-unit" in r.output and not (tmp_path / "x.gblr.pt").exists()
