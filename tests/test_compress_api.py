"""gblrc.compress end to end on tiny models: budget bar, errors, warnings, seeds, checkpoints."""

import copy
import dataclasses
import os

import pytest
import torch
from torch import nn

import _samples

import gblrc
from gblrc.nn.layer import GBLRLinear

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 5))


def mlp_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 48, generator=g)
    y = (x[:, :5] + 0.3 * x[:, 5:10]).argmax(1)  # a learnable labelling
    return x, y


def tiny_bert():
    return _samples.tiny_bert(vocab_size=60)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=60, n_embd=32, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def ids(n=32, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 60, (n, t), generator=g)
    mask = torch.ones_like(x)
    mask[::3, 7:] = 0
    return {"input_ids": x, "attention_mask": mask}


def check_report(rep, budget, steps):
    assert rep["achieved_ratio"] <= budget + 1e-12
    assert rep["achieved_ratio"] >= budget - 0.02, rep["achieved_ratio"]
    assert rep["gblr_cost"] == sum(l["gblr_cost"] for l in rep["layers"])
    assert rep["dense_cost"] == sum(l["dense_cost"] for l in rep["layers"])
    assert abs(rep["achieved_ratio"] - rep["gblr_cost"] / rep["dense_cost"]) < 1e-12
    assert len(rep["loss_curve"]) == steps and all(len(r) == 5 for r in rep["loss_curve"])
    for l in rep["layers"]:
        keys = {"name", "shape", "dense_cost", "gblr_cost", "blocks", "ratio", "family", "time_ratio", "lowering"}
        assert set(l) == keys and l["family"] in ("gblr", "neurons", "heads")
        assert 0 < l["time_ratio"] <= 1.0 + 1e-9 and l["lowering"] in ("dense", "stacked", "sliced", "segmented")
        assert l["dense_cost"] == l["shape"][0] * l["shape"][1]
    assert rep["budget_unit"] == "flops" and rep["flop_ratio"] == rep["achieved_ratio"] and 0 < rep["time_ratio"] <= 1


@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_mlp_task_loss_budget_and_learning(budget):
    x, y = mlp_data()
    m, rep = gblrc.compress(
        mlp(), budget, data={"inputs": x, "targets": y}, steps=25, batch_size=32, lr=3e-3, progress=False
    )
    check_report(rep, budget, 25)
    assert not m.training and isinstance(m[0], GBLRLinear) and isinstance(m[2], GBLRLinear)
    assert isinstance(m[4], nn.Linear)  # the output layer is not compressed by default
    curve = rep["loss_curve"]
    assert sum(r[1] for r in curve[-5:]) < sum(r[1] for r in curve[:5])  # the task loss went down
    assert curve[0][3] == 1.0 and curve[-1][3] == 100.0  # sigma homotopy from 1 to 100
    with torch.no_grad():  # the report describes the returned module
        assert sum(m[i].flops() for i in (0, 2)) == rep["gblr_cost"]


def test_bert_distillation_budget_and_agreement():
    b = tiny_bert()
    ref = copy.deepcopy(b)
    data = ids(48)
    m, rep = gblrc.compress(b, 0.4, data=data, steps=12, batch_size=16, lr=2e-3, progress=False)
    check_report(rep, 0.4, 12)
    assert len(rep["layers"]) == 6
    with torch.no_grad():
        a = ref(**data).last_hidden_state.flatten(1)
        c = m(**data).last_hidden_state.flatten(1)
    assert torch.nn.functional.cosine_similarity(a, c).mean() > 0.9


def test_gpt2_batches_iterable_budget():
    g = tiny_gpt2()
    data = ids(32)
    batches = [{"input_ids": data["input_ids"][i : i + 8]} for i in range(0, 32, 8)]
    m, rep = gblrc.compress(g, 0.5, data=batches, steps=8, progress=False)
    check_report(rep, 0.5, 8)
    assert isinstance(m.transformer.h[0].attn.c_attn, GBLRLinear)
    assert m.transformer.h[0].attn.c_attn.in_features == 32 and m.transformer.h[0].attn.c_attn.out_features == 96


def test_no_data_warns_and_keeps_the_budget():
    with pytest.warns(UserWarning, match="no data"):
        m, rep = gblrc.compress(mlp(), 0.4, progress=False)
    check_report(rep, 0.4, 0)
    assert rep["warnings"] and "no data" in rep["warnings"][0]


def test_lowrank_structure_has_full_widths():
    x, y = mlp_data()
    m, rep = gblrc.compress(mlp(), 0.4, data={"inputs": x, "targets": y}, steps=6, structure="lowrank", progress=False)
    assert rep["achieved_ratio"] <= 0.4
    for i in (0, 2):
        wc, _, wr, _ = m[i].hard_intervals()
        assert (wc == m[i].in_features).all() and (wr == m[i].out_features).all()


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_budget(bad):
    with pytest.raises(ValueError, match="budget"):
        gblrc.compress(mlp(), bad, progress=False)


def test_bad_models_and_data():
    m = mlp()
    with torch.no_grad():
        m[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gblrc.compress(m, 0.5, progress=False)
    with pytest.raises(ValueError, match="no compressible"):
        gblrc.compress(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), 0.5, progress=False)
    with pytest.raises(ValueError, match="no compressible"):
        gblrc.compress(mlp(), 0.5, include="nothing_matches", progress=False)
    with pytest.raises(ValueError, match="does not fit the model"):
        gblrc.compress(mlp(), 0.5, data=torch.randn(16, 47), steps=2, progress=False)
    with pytest.raises(ValueError, match="targets"):
        gblrc.compress(
            mlp(),
            0.5,
            data={"inputs": torch.randn(16, 48), "targets": torch.zeros(16, 3).long()},
            steps=2,
            progress=False,
        )


def test_seed_reproducible_and_seed_matters():
    x, y = mlp_data()
    runs = [
        gblrc.compress(mlp(), 0.3, data={"inputs": x, "targets": y}, steps=6, seed=s, progress=False)[0]
        for s in (1, 1, 2)
    ]
    sd = [r.state_dict() for r in runs]
    assert all(torch.equal(sd[0][k], sd[1][k]) for k in sd[0])
    assert not all(sd[0][k].shape == sd[2][k].shape and torch.equal(sd[0][k], sd[2][k]) for k in sd[0])


def test_checkpoint_resume_matches_uninterrupted(tmp_path, monkeypatch):
    from gblrc.learn import train

    x, y = mlp_data()
    data = {"inputs": x, "targets": y}
    kw = dict(data=data, steps=12, batch_size=32, checkpoint_every=4, progress=False, seed=3)
    full, rep_full = gblrc.compress(mlp(), 0.35, **kw)
    orig = train.Trainer._one_step

    def crash(self, *a):
        if self.step == 10:
            raise KeyboardInterrupt
        return orig(self, *a)

    monkeypatch.setattr(train.Trainer, "_one_step", crash)
    with pytest.raises(KeyboardInterrupt):
        gblrc.compress(mlp(), 0.35, checkpoint_dir=tmp_path, **kw)
    assert (tmp_path / "checkpoint.pt").exists()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 8
    monkeypatch.setattr(train.Trainer, "_one_step", orig)
    resumed, rep = gblrc.compress(mlp(), 0.35, checkpoint_dir=tmp_path, resume=True, **kw)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rep["loss_curve"] == rep_full["loss_curve"]
    with pytest.raises(ValueError, match="other settings"):
        gblrc.compress(mlp(), 0.3, checkpoint_dir=tmp_path, resume=True, **kw)


def test_compress_stays_a_function_after_the_implementation_module_is_imported():
    import gblrc.learn.compress as mod

    assert gblrc.compress is not mod and callable(gblrc.compress)
    with pytest.raises(ValueError, match="budget"):
        gblrc.compress(mlp(), 2.0)


def interrupted(tmp_path, monkeypatch, data, at_step=5, **kw):
    """A compress run of mlp() at budget 0.35 stopped at step ``at_step`` (checkpoints in tmp_path); the Trainer
    restored after."""
    from gblrc.learn import train

    orig = train.Trainer._one_step

    def crash(self, *a):
        if self.step == at_step:
            raise KeyboardInterrupt
        return orig(self, *a)

    monkeypatch.setattr(train.Trainer, "_one_step", crash)
    with pytest.raises(KeyboardInterrupt):
        gblrc.compress(mlp(), 0.35, data=data, checkpoint_dir=tmp_path, **kw)
    monkeypatch.setattr(train.Trainer, "_one_step", orig)


@pytest.mark.parametrize(
    "change",
    [{"data": "other"}, {"warmup": 0.3}, {"refine_lr": 3e-4}, {"refine_batches": 3}, {"calib_batches": 2}],
    ids=lambda c: next(iter(c)),
)
def test_resume_with_changed_data_or_setting_is_refused(tmp_path, monkeypatch, change):
    x, y = mlp_data()
    kw = dict(steps=8, checkpoint_every=2, progress=False, init="data")
    interrupted(tmp_path, monkeypatch, {"inputs": x, "targets": y}, **kw)
    data = {"inputs": x, "targets": y}
    if change.get("data") == "other":  # the same shapes, one value changed: only the fingerprint tells
        x2 = x.clone()
        x2[0, 0] += 1.0
        data = {"inputs": x2, "targets": y}
    opts = {**kw, **{k: v for k, v in change.items() if k != "data"}}
    with pytest.raises(ValueError, match="other settings"):
        gblrc.compress(mlp(), 0.35, data=data, checkpoint_dir=tmp_path, resume=True, **opts)
    # the same data and settings resume (progress is not a result-affecting setting)
    gblrc.compress(mlp(), 0.35, data={"inputs": x, "targets": y}, checkpoint_dir=tmp_path, resume=True, **kw)


def test_report_settings_are_the_configs_result_fields():
    from gblrc.learn.config import RESULT_NEUTRAL, CompressConfig, result_settings

    s = result_settings(CompressConfig(budget=0.4, progress=False))
    fields = {f.name for f in dataclasses.fields(CompressConfig)} | {
        f.name for f in dataclasses.fields(gblrc.TrainingConfig)
    }
    assert set(s) == fields - {"training"} - set(RESULT_NEUTRAL)
    assert {"refine_batches", "refine_norms", "refine_target", "refine_structure", "calib_batches", "warmup"} <= set(s)
