"""The stages of gblrc.compress, one by one, on a tiny MLP (issue 14)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gblrc.learn import compress as C
from gblrc.nn.layer import GBLRLinear


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 8)).eval()


NAMES = ["0", "2"]  # the output layer (4) is a head: kept dense
DENSE = {"0": 16 * 32, "2": 32 * 24}


MIX = torch.randn(6, 16, generator=torch.Generator().manual_seed(99))


def data(n=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g) @ MIX + 0.05 * torch.randn(n, 16, generator=g)  # correlated inputs


def run_for(model=None, budget=0.4, data=None, eval_data=None, **kw):
    kw.setdefault("progress", False)
    return C.start(model or mlp(), C.check_options(budget, **kw), data=data, eval_data=eval_data)


def test_check_options_rejects_bad_values_and_freezes_good_ones():
    o = C.check_options(0.5, steps=3, structure="lowrank")
    assert o.budget == 0.5 and o.steps == 3
    with pytest.raises(Exception):
        o.steps = 4  # frozen
    for bad in (dict(structure="dense"), dict(init="x"), dict(allocate="x"), dict(loss="x"), dict(steps=-1)):
        with pytest.raises(ValueError):
            C.check_options(0.5, **bad)
    with pytest.raises(ValueError, match="budget"):
        C.check_options(1.5)
    with pytest.raises(TypeError):
        C.check_options(0.5, no_such_option=1)


def test_start_finds_the_layers_and_refuses_bad_models():
    run = run_for(steps=5)
    assert run.names == NAMES and run.steps == 5 and run.warnings == []
    m = mlp()
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        run_for(m)
    with pytest.raises(ValueError, match="no compressible linear layer"):
        run_for(nn.Sequential(nn.GELU(), nn.Linear(4, 4)), exclude=r"^1$")


def test_read_data_without_data_warns_and_stops_training():
    run = run_for(steps=5)
    with pytest.warns(UserWarning, match="no data given"):
        C.read_data(run)
    assert run.steps == 0 and run.teacher is None and C.NO_DATA_WARNING in run.warnings


def test_read_data_checks_the_batch_and_keeps_a_frozen_teacher():
    run = run_for(data=data(), steps=2)
    C.read_data(run)
    assert run.x.shape == (32, 16) and run.teacher is not run.model
    assert not any(p.requires_grad for p in run.teacher.parameters())
    with pytest.raises(ValueError, match="does not fit"):
        C.read_data(run_for(data=torch.randn(64, 7)))
    post = run_for(data=data(), steps=0)
    C.read_data(post)
    assert post.teacher is None and post.steps == 0


def test_calibrate_measures_input_covariances_unless_init_is_svd():
    run = run_for(data=data(), steps=0, calib_batches=3)
    C.read_data(run)
    C.calibrate(run)
    assert set(run.covs) == {"0", "2"} and run.covs["0"].shape == (16, 16) and len(run.xs) == 3
    assert torch.equal(run.dense_w["0"], run.model[0].weight) and run.dense_ref is not None
    svd = run_for(data=data(), init="svd")
    C.read_data(svd)
    C.calibrate(svd)
    assert svd.covs is None and svd.dense_w is None


def test_allocate_uniform_and_by_sensitivity():
    uni = run_for(data=data(), allocate="uniform", steps=0)
    C.read_data(uni)
    C.calibrate(uni)
    C.allocate(uni)
    assert uni.budgets == {"0": 0.4, "2": 0.4} and uni.allocated == "uniform"
    sen = run_for(data=data(), allocate="sensitivity", steps=0, structure="lowrank")
    C.read_data(sen)
    C.calibrate(sen)
    C.allocate(sen)
    assert sen.allocated == "sensitivity" and set(sen.budgets) == set(NAMES) and sen.budgets != uni.budgets
    C.initialise(sen)  # the ratios are grid targets; the layers built from them stay within the budget
    assert sum(m.flops() for m in sen.layers.values()) <= 0.4 * sum(DENSE.values())


def _output_error(model, dense, x):
    with torch.no_grad():
        return float((model(x) - dense(x)).norm() / dense(x).norm())


def test_initialise_replaces_the_layers_and_data_aware_beats_plain_svd():
    x = data(seed=7)
    errs = {}
    for init in ("svd", "sequential"):
        run = run_for(data=data(), init=init, allocate="uniform", structure="lowrank", steps=0)
        for stage in (C.read_data, C.calibrate, C.allocate, C.initialise):
            stage(run)
        assert all(isinstance(run.model[i], GBLRLinear) for i in (0, 2)) and run.dense_ref is None
        assert all(m.flops() <= 0.4 * m.dense_flops() for m in run.layers.values())
        errs[init] = _output_error(run.model.eval(), mlp(), x)
    assert errs["sequential"] < 0.8 * errs["svd"]


def test_train_runs_the_steps_and_harden_lands_on_the_budget():
    run = run_for(data=data(), steps=3, allocate="uniform", init="svd", structure="gblr", batch_size=16)
    for stage in (C.read_data, C.calibrate, C.allocate, C.initialise):
        stage(run)
    assert sum(m.flops() for m in run.layers.values()) > 0.4 * sum(DENSE.values())  # a margin above
    C.train(run)
    assert [row[0] for row in run.curve] == [1, 2, 3] and run.train_seconds > 0
    C.harden(run)
    assert not run.model.training
    assert sum(m.flops() for m in run.layers.values()) <= 0.4 * sum(DENSE.values())
    rep = C.make_report(run)
    assert rep["steps"] == 3 and rep["achieved_ratio"] <= 0.4 and [r["name"] for r in rep["layers"]] == ["0", "2"]


def test_train_without_steps_does_nothing():
    run = run_for(data=data(), steps=0, init="svd", allocate="uniform")
    for stage in (C.read_data, C.calibrate, C.allocate, C.initialise, C.train):
        stage(run)
    assert run.curve == [] and run.train_seconds == 0.0


def test_compress_is_the_stages_in_order():
    assert C.STAGES == (C.read_data, C.calibrate, C.allocate, C.initialise, C.train, C.harden)
    m, rep = C.compress(mlp(), 0.4, data=data(), steps=2, progress=False, allocate="uniform", init="svd")
    assert rep["achieved_ratio"] <= 0.4 and rep["steps"] == 2


def test_the_report_says_how_far_the_structure_moved():
    from gblrc.ir.structure import Block, Span, Structure
    from gblrc.learn.report import structure_movement

    full = lambda r: Block((Span(0, 8),), (Span(0, 8),), r)
    a0 = Structure(8, 8, (full(1), Block((Span(0, 4),), (Span(0, 8),), 1)))
    a1 = Structure(8, 8, (full(1), Block((Span(0, 2),), (Span(0, 8),), 1)))  # one block resized
    b = Structure(8, 8, (full(2),))
    mv = structure_movement({"a": a0, "b": b}, {"a": a1, "b": b})
    assert mv["blocks_changed"] == round(1 / 4, 6) and mv["layers_changed"] == ["a"]  # 1 of 4 rank units
    assert 0 < mv["cost_moved"] < 0.05  # b's share grew a little as a shrank
    split = Structure(8, 8, (full(1), Block((Span(0, 8),), (Span(0, 6),), 1)))  # a rank-2 block: one unit moved
    assert structure_movement({"b": b}, {"b": split})["blocks_changed"] == 0.5
    same = structure_movement({"a": a0}, {"a": a0})
    assert same == {"blocks_changed": 0.0, "cost_moved": 0.0, "layers_changed": []}
    m, rep = C.compress(
        mlp(), 0.4, data=data(), steps=4, progress=False, allocate="uniform", init="svd", init_factor=1.5, batch_size=16
    )
    assert 0 <= rep["structure_moved"]["blocks_changed"] <= 1 and "cost_moved" in rep["structure_moved"]


def test_train_rest_trains_what_lies_outside_the_compressed_layers():
    """From scratch the head and norms start random too: train_rest trains them, the default leaves them."""
    import copy as _copy

    import gblrc as _gblrc

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))
    x, y = torch.randn(128, 16), torch.randint(0, 4, (128,))
    kept = {}
    for rest in (False, True):
        m = _copy.deepcopy(net)
        _gblrc.compress(
            m,
            0.5,
            data={"inputs": x, "targets": y},
            steps=8,
            include=r"^0$",
            init="svd",
            allocate="uniform",
            progress=False,
            train_rest=rest,
        )
        kept[rest] = (torch.equal(m[3].weight, net[3].weight), torch.equal(m[1].weight, net[1].weight))
    assert kept[False] == (True, True)  # the uncompressed head and the norm are not trained by default
    assert kept[True] == (False, False)  # train_rest trains both
    with pytest.warns(UserWarning, match="train_rest"):
        _gblrc.compress(
            _copy.deepcopy(net), 0.5, data={"inputs": x, "targets": y}, steps=0, progress=False, train_rest=True
        )


def test_gblr_init_margin_is_one_component_of_each_layer():
    # layers of very different sizes: one component is 12.5% of the small one, 1.6% of the big one; the
    # big one must not start at the budget plus the small one's component (it did: 0.4 -> 0.525)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 4)
    ).eval()
    run = run_for(
        model, data=torch.randn(128, 16), steps=3, allocate="uniform", init="svd", structure="gblr", batch_size=16
    )
    for stage in (C.read_data, C.calibrate, C.allocate, C.initialise):
        stage(run)
    assert set(run.layers) == {"0", "2", "4"}
    for m in run.layers.values():
        assert 0.4 * m.dense_flops() < m.flops() <= 0.4 * m.dense_flops() + m.in_features + m.out_features


def test_the_calibration_state_is_freed_when_the_initialisation_is_done():
    """Dense weight copies, covariances and cached batches live until initialise() has used them, no longer
    (issue 29: memory close to the model's)."""
    run = run_for(data=data(), steps=2, refine_steps=2, refine_batches=2)
    C.read_data(run)
    C.calibrate(run)
    assert run.dense_w and run.covs and run.xs and run.refine_xs
    C.allocate(run)
    C.initialise(run)
    assert run.dense_w is None and run.covs is None and run.xs is None and run.refine_xs is None
    assert run.dense_ref is None and run.refined is not None  # refinement ran on them, then let them go
    C.train(run)  # training needs none of them
    assert run.curve


def test_the_dense_copy_shares_the_embeddings_and_its_weights_are_the_dense_weights():
    """The dense copy refinement needs is the dense weights' only copy (no clone beside it), and it shares
    the model's embeddings (nothing trains them while it lives)."""
    from _samples import tiny_bert

    model = tiny_bert(num_hidden_layers=2)
    x = {"input_ids": torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(0))}
    run = C.start(model, C.check_options(0.5, steps=0, refine_batches=1, progress=False), data=x)
    C.read_data(run)
    C.calibrate(run)
    emb = model.embeddings.word_embeddings.weight
    assert run.dense_ref.embeddings.word_embeddings.weight is emb
    name = "encoder.layer.0.intermediate.dense"
    dense_lin = run.dense_ref.get_submodule(name)
    assert run.dense_w[name].data_ptr() == dense_lin.weight.data_ptr()  # a view of the copy, not a clone
    assert dense_lin.weight is not model.get_submodule(name).weight
