"""Sensitivity-based budget allocation across layers (gblrc.learn.allocate, compress(allocate="sensitivity"))."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gblrc
from gblrc.learn.allocate import _interpolate, allocate_budgets, sensitivity_curves, solve_allocation
from gblrc.learn.calib import input_covariances

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoPaths(nn.Module):
    """y = loud(x) + quiet(x): errors in ``loud`` reach the output 30x amplified."""

    def __init__(self, n=32):
        super().__init__()
        self.quiet = nn.Linear(n, n)
        self.loud = nn.Linear(n, n)
        with torch.no_grad():
            self.loud.weight.mul_(30.0)

    def forward(self, x):
        return self.loud(x) + self.quiet(x)


def _data(n=32, rows=256, batches=4):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(n, n, generator=g) * torch.logspace(0, -1, n)[None, :]
    return [torch.randn(rows, n, generator=g) @ mix.t() for _ in range(batches)]


def test_interpolate_passes_through_the_measured_points_and_is_monotone():
    measured = [(10.0, 1.0), (1.0, 0.05), (0.1, 0.001)]
    got = _interpolate([10.0, 1.0, 0.1], measured)
    assert got == pytest.approx([1.0, 0.05, 0.001], rel=1e-9)
    tails = [20.0, 10.0, 5.0, 1.0, 0.5, 0.1, 0.01, 0.0]
    vals = _interpolate(tails, measured)
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert vals[-1] == 0.0


def test_the_layer_that_matters_more_gets_more_of_the_budget():
    torch.manual_seed(0)
    model = TwoPaths().eval()
    xs = _data()
    covs = input_covariances(model, ["quiet", "loud"], xs)
    alloc = allocate_budgets(model, ["quiet", "loud"], covs, xs[:1], 0.4)
    assert alloc["loud"] > alloc["quiet"] + 0.1
    dense = 32 * 32
    assert alloc["loud"] * dense + alloc["quiet"] * dense <= 0.4 * 2 * dense + 1
    assert model.loud.weight.abs().max() > 1.0  # the model itself is untouched (no hook left behind)
    assert not model.loud._forward_hooks and not model.quiet._forward_hooks


def test_sensitivity_curves_measure_the_output_error():
    model = TwoPaths().eval()
    xs = _data()
    covs = input_covariances(model, ["quiet", "loud"], xs)
    curves = sensitivity_curves(model, ["quiet", "loud"], covs, xs[:1], measure=(0.25,), grid=(0.25, 1.0))
    for name in ("quiet", "loud"):
        (c1, l1), (c2, l2) = curves[name]
        assert c1 < c2 and l1 > l2 >= 0.0
    assert curves["loud"][0][1] > 10 * curves["quiet"][0][1]


@given(st.lists(st.lists(st.floats(1e-6, 1.0), min_size=3, max_size=6), min_size=1, max_size=5), st.floats(0.3, 0.9))
def test_solve_allocation_never_exceeds_the_budget(losses, budget):
    curves, dense = {}, {}
    for i, ls in enumerate(losses):
        n = f"l{i}"
        dense[n] = 1000
        curves[n] = [(int(1000 * (j + 1) / (len(ls) + 1)), l) for j, l in enumerate(sorted(ls, reverse=True))]
    if sum(c[0][0] for c in curves.values()) > budget * sum(dense.values()):
        with pytest.raises(ValueError):
            solve_allocation(curves, dense, budget)
        return
    alloc = solve_allocation(curves, dense, budget)
    assert sum(math.floor(alloc[n] * dense[n]) for n in alloc) <= budget * sum(dense.values())
    assert all(0.0 < a <= 1.0 for a in alloc.values())


def test_identical_layers_share_the_budget_evenly():
    curve = [(100 * k, 1.0 / k) for k in range(1, 10)]
    alloc = solve_allocation({"a": curve, "b": list(curve)}, {"a": 1000, "b": 1000}, 0.4)
    assert alloc["a"] == pytest.approx(alloc["b"], abs=1e-3)


@pytest.mark.parametrize("structure", ["lowrank", "gblr"])
def test_compress_with_sensitivity_allocation_hits_the_budget(structure):
    torch.manual_seed(0)
    model = TwoPaths().eval()
    teacher = copy.deepcopy(model)
    xs = _data(batches=4)
    out, rep = gblrc.compress(
        model,
        0.4,
        data=torch.cat(xs),
        steps=20,
        batch_size=256,
        include="quiet|loud",
        structure=structure,
        allocate="sensitivity",
        progress=False,
    )
    assert rep["achieved_ratio"] <= 0.4
    if structure == "gblr":  # low rank moves in whole components of 64 multiply-adds (0.03 here)
        assert rep["achieved_ratio"] >= 0.38
    ratios = {r["name"]: r["ratio"] for r in rep["layers"]}
    assert ratios["loud"] > ratios["quiet"]
    with torch.no_grad():
        err = ((out(xs[0]) - teacher(xs[0])) ** 2).sum() / (teacher(xs[0]) ** 2).sum()
    torch.manual_seed(0)
    uni, rep_u = gblrc.compress(
        copy.deepcopy(teacher),
        0.4,
        data=torch.cat(xs),
        steps=20,
        batch_size=256,
        include="quiet|loud",
        structure=structure,
        allocate="uniform",
        progress=False,
    )
    with torch.no_grad():
        err_u = ((uni(xs[0]) - teacher(xs[0])) ** 2).sum() / (teacher(xs[0]) ** 2).sum()
    assert err < err_u


def test_sensitivity_without_a_data_aware_init_warns_and_stays_uniform():
    xs = torch.cat(_data(batches=2))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, rep = gblrc.compress(
            TwoPaths(),
            0.4,
            data=xs,
            steps=2,
            batch_size=256,
            include="quiet|loud",
            init="svd",
            allocate="sensitivity",
            structure="lowrank",
            progress=False,
        )
    assert any("kept uniform" in str(x.message) for x in w)
    assert any("kept uniform" in m for m in rep["warnings"])
    assert len({r["ratio"] for r in rep["layers"]}) == 1


def test_auto_allocation_is_silent_where_it_does_not_apply():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, rep = gblrc.compress(TwoPaths(), 0.4, include="quiet|loud", progress=False)  # no data
    assert not any("kept uniform" in str(x.message) for x in w)


def test_bad_allocate_value_is_refused():
    with pytest.raises(ValueError, match="allocate must be"):
        gblrc.compress(TwoPaths(), 0.4, allocate="fisher", progress=False)


def test_allocate_cap_bounds_every_layer():
    torch.manual_seed(0)
    xs = torch.cat(_data(batches=2))
    _, rep = gblrc.compress(
        TwoPaths(),
        0.4,
        data=xs,
        steps=2,
        batch_size=256,
        include="quiet|loud",
        structure="lowrank",
        allocate="sensitivity",
        allocate_cap=1.25,
        progress=False,
    )
    assert rep["allocate"] == "sensitivity"
    assert max(rep["allocated_ratios"].values()) <= 0.5 + 1e-3
    _, free = gblrc.compress(
        TwoPaths(),
        0.4,
        data=xs,
        steps=2,
        batch_size=256,
        include="quiet|loud",
        structure="lowrank",
        allocate="sensitivity",
        allocate_cap=None,
        progress=False,
    )
    assert max(free["allocated_ratios"].values()) > 0.5


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.tuples(st.integers(0, 50), st.floats(0, 10)), min_size=1, max_size=5), min_size=1, max_size=3)
)
def test_combined_low_rank_option_is_the_pareto_front_of_every_choice(curves):
    """A unit's low-rank option (one point per layer, costs and losses added): no choice left out is both
    cheaper-or-equal and lower in loss than the front, and the front's choices add up."""
    import itertools

    from gblrc.learn.allocate import _combined

    front = _combined(curves)
    for cost, loss, idx in front:
        assert cost == sum(c[i][0] for c, i in zip(curves, idx))
        assert loss == pytest.approx(sum(c[i][1] for c, i in zip(curves, idx)))
    for idx in itertools.product(*(range(len(c)) for c in curves)):
        cost = sum(c[i][0] for c, i in zip(curves, idx))
        loss = sum(c[i][1] for c, i in zip(curves, idx))
        assert any(fc <= cost and fl <= loss + 1e-9 for fc, fl, _ in front)
