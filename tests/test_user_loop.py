"""The method in the user's own loop: gblrc.prepare -> optimizer steps with the controller -> gblrc.finalize."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import gblrc
from gblrc.learn.data import batch_stream
from gblrc.learn.objective import task_loss
from gblrc.nn.layer import GBLRLinear
from test_compress_api import mlp, mlp_data  # the same tiny MLP and learnable labelling


def own_loop(model, ctrl, data, steps, batch_size=32, seed=0, content_schedule=True):
    """A plain PyTorch loop: AdamW on the controller's groups, one ctrl.step(opt) after each step."""
    opt = torch.optim.AdamW(ctrl.param_groups())
    stream = batch_stream(data, batch_size, seed)
    for step in range(steps):
        model.eval()  # (as gblrc's own loop: no dropout; the GBLR layers learn in train mode)
        for m in ctrl.mods:
            m.train()
        x, y = next(stream)
        loss = task_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if content_schedule:
            opt.param_groups[0]["lr"] = ctrl.schedule.content_lr(step)
        opt.step()
        ctrl.step(opt, loss=loss.detach())
    return opt


def test_plain_loop_lands_in_budget_sigma_at_max_and_structure_moves():
    x, y = mlp_data()
    cfg = gblrc.CompressConfig(budget=0.3, steps=40, lr=3e-3, training=gblrc.TrainingConfig(init_factor=1.6))
    model, ctrl = gblrc.prepare(mlp(), cfg, data={"inputs": x, "targets": y})
    assert isinstance(model[0], GBLRLinear) and model.training
    start = ctrl.state_dict()["history"]
    assert start == [] and float(model[0].sigma) == 1.0
    own_loop(model, ctrl, {"inputs": x, "targets": y}, 40)
    assert ctrl.done and ctrl.cooled
    assert any(r["lambda"] > 0 for r in ctrl.history)  # lambda was active (started 1.6x above the budget)
    assert ctrl.history[0]["sigma"] == 1.0 and ctrl.history[-1]["sigma"] == 100.0
    assert all(float(m.sigma) == 100.0 for m in ctrl.mods)  # sigma ends at its maximum
    rep = gblrc.finalize(model)
    assert 0.28 <= rep["achieved_ratio"] <= 0.3
    assert rep["structure_moved"]["blocks_changed"] > 0
    assert len(rep["loss_curve"]) == 40 and rep["loss_curve"][-1][1] < rep["loss_curve"][0][1]
    assert not model.training and all(isinstance(model[i], GBLRLinear) for i in (0, 2))
    with torch.no_grad():
        assert sum(model[i].flops() for i in (0, 2)) == rep["gblr_cost"]
    with pytest.raises(ValueError, match="prepare"):
        gblrc.finalize(model)  # once only


def test_compress_is_the_same_method_as_prepare_plus_a_loop():
    """gblrc.compress's loop and a user's loop over the same controller give the same model (one
    implementation): same batches, same content schedule, same structure, factors to float tolerance."""
    x, y = mlp_data()
    data = {"inputs": x, "targets": y}
    cfg = gblrc.CompressConfig(
        budget=0.35, steps=20, lr=3e-3, progress=False, training=gblrc.TrainingConfig(init_factor=1.4)
    )
    ours, rep = gblrc.compress(mlp(), cfg, data=data)
    theirs, ctrl = gblrc.prepare(mlp(), cfg, data=data)
    own_loop(theirs, ctrl, data, 20)
    rep2 = gblrc.finalize(theirs)
    assert rep2["achieved_ratio"] == rep["achieved_ratio"]
    for i in (0, 2):
        assert [t.tolist() for t in ours[i].hard_intervals()] == [t.tolist() for t in theirs[i].hard_intervals()]
        torch.testing.assert_close(ours[i].dense_weight(), theirs[i].dense_weight(), rtol=1e-5, atol=1e-6)
    assert [r[2:] for r in rep["loss_curve"]] == [r[2:] for r in rep2["loss_curve"]]  # cost, sigma, lambda


def test_controller_state_dict_resumes_the_schedule():
    x, y = mlp_data()
    data = {"inputs": x, "targets": y}
    cfg = gblrc.CompressConfig(budget=0.3, steps=16, lr=3e-3, training=gblrc.TrainingConfig(init_factor=1.5))
    model, ctrl = gblrc.prepare(mlp(), cfg, data=data)
    own_loop(model, ctrl, data, 13, content_schedule=False)
    saved = copy.deepcopy((model.state_dict(), ctrl.state_dict()))
    other, ctrl2 = gblrc.prepare(mlp(), cfg, data=data)
    other.load_state_dict(saved[0])
    ctrl2.load_state_dict(saved[1])
    assert ctrl2.step_count == 13 and ctrl2.cooled == ctrl.cooled and ctrl2.sigma == ctrl.sigma
    assert ctrl2.lam.state_dict() == ctrl.lam.state_dict()
    assert all(not p.requires_grad for p in ctrl2.struct) == ctrl.cooled
    with pytest.raises(ValueError, match="same number of steps"):
        gblrc.prepare(mlp(), cfg.replace(steps=17), data=data)[1].load_state_dict(saved[1])


def test_param_groups_give_the_structure_its_own_lr_and_beta1_zero():
    cfg = gblrc.CompressConfig(budget=0.4, steps=10, lr=1e-3, training=gblrc.TrainingConfig(lr_struct=2e-2))
    model, ctrl = gblrc.prepare(mlp(), cfg)
    content, struct = ctrl.param_groups(weight_decay=0.01)
    assert content["lr"] == 1e-3 and content["weight_decay"] == 0.01
    assert struct["lr"] == 2e-2 and struct["betas"][0] == 0.0 and struct["weight_decay"] == 0.0
    assert {id(p) for p in struct["params"]} == {id(p) for m in ctrl.mods for p in (m.widths, m.locations)}
    assert not ({id(p) for p in struct["params"]} & {id(p) for p in content["params"]})
    # the proximal step reads the structure group's current lr (a user's scheduler may change it)
    opt = torch.optim.SGD(ctrl.param_groups(), lr=0.1)
    opt.param_groups[1]["lr"] = 0.5
    assert ctrl._struct_lr(opt) == 0.5 and ctrl._struct_lr(None) == 2e-2
    low, lctrl = gblrc.prepare(mlp(), cfg.replace(structure="lowrank"))
    assert len(lctrl.param_groups()) == 1 and lctrl.cooled  # low rank: content only, structure fixed
    assert all(m.frozen_structure for m in lctrl.mods)


def test_frozen_structure_uses_boxcar_masks_in_train_mode():
    model, ctrl = gblrc.prepare(mlp(), gblrc.CompressConfig(budget=0.4, steps=4))
    for _ in range(4):
        ctrl.step()
    assert ctrl.cooled
    m = model[0].train()
    x = torch.randn(3, 48)
    with torch.no_grad():
        a = m(x)
        b = m.eval()(x)
    torch.testing.assert_close(a, b)


def test_keyword_form_and_config_errors_are_one_line():
    with pytest.raises(TypeError, match="unknown compress option 'warmpu'.*training"):
        gblrc.compress(mlp(), 0.4, warmpu=0.2)
    with pytest.raises(TypeError, match="budget is needed"):
        gblrc.prepare(mlp(), None)
    for bad, word in (
        (dict(structure="dense"), "structure"),
        (dict(device="tpu"), "device"),
        (dict(mixed_precision="fp8"), "mixed_precision"),
        (dict(budget=0), "budget"),
        (dict(warmup=0.7, cooldown=0.5), "warmup"),
        (dict(lr=-1), "lr"),
    ):
        kw = dict(budget=0.4, **{k: v for k, v in bad.items() if k in ("structure", "device", "mixed_precision", "lr")})
        kw.update({k: v for k, v in bad.items() if k == "budget"})
        with pytest.raises(ValueError, match=word) as e:
            nested = {k: v for k, v in bad.items() if k in ("warmup", "cooldown")}
            gblrc.CompressConfig(**kw, training=gblrc.TrainingConfig(**nested))
        assert "\n" not in str(e.value)
    cfg = gblrc.CompressConfig(budget=0.4).replace(warmup=0.3, steps=7)
    assert cfg.training.warmup == 0.3 and cfg.steps == 7 and cfg.budget == 0.4
    with pytest.raises(ValueError, match="prepare"):
        gblrc.finalize(mlp())


def test_device_cpu_and_auto_on_a_cpu_machine_and_cuda_is_an_error():
    x, y = mlp_data(64)
    for dev in ("cpu", "auto") if not torch.cuda.is_available() else ("cpu",):
        m, rep = gblrc.compress(mlp(), 0.4, data={"inputs": x, "targets": y}, steps=3, progress=False, device=dev)
        assert next(m.parameters()).device.type == "cpu" and rep["achieved_ratio"] <= 0.4
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            gblrc.compress(mlp(), 0.4, data={"inputs": x, "targets": y}, steps=3, progress=False, device="cuda")


def test_bf16_mixed_precision_trains_within_budget():
    x, y = mlp_data()
    m, rep = gblrc.compress(
        mlp(), 0.3, data={"inputs": x, "targets": y}, steps=12, lr=3e-3, progress=False, mixed_precision="bf16"
    )
    assert 0.28 <= rep["achieved_ratio"] <= 0.3
    assert m[0].U.dtype == torch.float32  # parameters stay fp32; only the products ran in bfloat16
    curve = rep["loss_curve"]
    assert all(torch.isfinite(torch.tensor(r[1])) for r in curve)


def test_cli_device_cpu_auto_and_cuda_without_one(tmp_path):
    from click.testing import CliRunner

    from gblrc.cli import main

    torch.save(mlp(), tmp_path / "m.pt")
    x, y = mlp_data(64)
    torch.save({"inputs": x, "targets": y}, tmp_path / "d.pt")
    base = [
        "compress",
        str(tmp_path / "m.pt"),
        "--budget",
        "0.4",
        "--data",
        str(tmp_path / "d.pt"),
        "--steps",
        "3",
        "-q",
    ]
    for dev in ("cpu", "auto"):
        r = CliRunner().invoke(main, base + ["--device", dev, "-o", str(tmp_path / f"{dev}.gblr.pt")])
        assert r.exit_code == 0, r.output
        rep = json.loads((tmp_path / f"{dev}.gblr.pt.report.json").read_text())
        assert rep["settings"]["device"] == dev and rep["device"] == (
            "cpu" if not torch.cuda.is_available() else rep["device"]
        )
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, base + ["--device", "cuda", "-o", str(tmp_path / "cuda.gblr.pt")])
        assert r.exit_code != 0 and "no CUDA device" in r.output and r.output.strip().count("\n") == 0, r.output
        assert not list(tmp_path.glob("cuda.gblr.pt*"))  # no partial files


def test_budget_as_a_keyword_still_works():
    x, y = mlp_data(64)
    m, rep = gblrc.compress(mlp(), budget=0.4, data={"inputs": x, "targets": y}, steps=2, progress=False)
    assert rep["achieved_ratio"] <= 0.4
    _, ctrl = gblrc.prepare(mlp(), budget=0.4, steps=5)
    assert ctrl.schedule.steps == 5
