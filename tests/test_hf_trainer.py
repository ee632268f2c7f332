"""The method inside transformers.Trainer with gblrc.GBLRCallback: budget met, stop-and-resume identical
(from the checkpoint the Trainer resumes from, wherever it lies), the step right after optimizer.step()."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers

import gblrc

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEPS, SAVE_AT = 12, 6


class Ids(torch.utils.data.Dataset):
    """Token sequences whose label is whether token 7 occurs more often than token 9 (learnable)."""

    def __init__(self, n=96, t=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 40, (n, t), generator=g)
        self.y = ((self.ids == 7).sum(1) + (self.ids < 20).sum(1) > t // 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.y[i]}


def tiny_classifier():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg)


def args(out, **kw):
    kw = {"max_steps": STEPS, "save_steps": SAVE_AT, **kw}
    return transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        logging_steps=1000,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **kw,
    )


class Crash(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == SAVE_AT + 1:
            raise KeyboardInterrupt


def train(out, *, resume=None, crash=False, **targs):
    model = tiny_classifier()
    calib = Ids(32, seed=5)
    cfg = gblrc.CompressConfig(
        budget=0.4, steps=STEPS, lr=2e-3, progress=False, training=gblrc.TrainingConfig(init_factor=1.5)
    )
    model, ctrl = gblrc.prepare(
        model, cfg, data={"inputs": {"input_ids": calib.ids, "attention_mask": torch.ones_like(calib.ids)}}
    )
    opt = torch.optim.AdamW(ctrl.param_groups(lr=2e-3))
    cb = gblrc.GBLRCallback(ctrl)
    trainer = transformers.Trainer(
        model=model,
        args=args(out, **targs),
        train_dataset=Ids(),
        optimizers=(opt, None),
        callbacks=[cb] + ([Crash()] if crash else []),
    )
    trainer.train(resume_from_checkpoint=str(resume) if isinstance(resume, os.PathLike) else resume)
    return model, cb, ctrl


def snapshot(model):
    from gblrc.nn.layer import GBLRLinear

    return {
        n: (
            [t.tolist() for t in m.hard_intervals()],
            m.widths.detach().clone(),
            m.locations.detach().clone(),
            m.dense_weight().detach().clone(),
        )
        for n, m in model.named_modules()
        if isinstance(m, GBLRLinear)
    }


def saved_gblrc_state(checkpoint):
    """The controller's state in a checkpoint: trainer_state.json's stateful_callbacks (plain JSON)."""
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        entry = json.load(f)["stateful_callbacks"]["GBLRCallback"]
    return entry["attributes"]["gblrc_controller"]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run (it writes checkpoints too; saving changes nothing in the training)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("full")
    model, cb, ctrl = train(out)
    return out, model, cb, ctrl


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A run stopped after SAVE_AT + 1 steps: its output_dir holds checkpoint-SAVE_AT."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("crashed")
    with pytest.raises(KeyboardInterrupt):
        train(out, crash=True)
    assert (out / f"checkpoint-{SAVE_AT}").is_dir() and not (out / f"checkpoint-{STEPS}").exists()
    return out


def moved_checkpoint(crashed, tmp_path):
    """checkpoint-SAVE_AT of the stopped run, copied to a folder of another name outside any output_dir."""
    dst = tmp_path / "elsewhere" / "snapshot-mid-run"
    shutil.copytree(crashed / f"checkpoint-{SAVE_AT}", dst)
    return dst


def test_trainer_callback_meets_budget_and_keeps_its_state_in_the_checkpoints(full, tmp_path):
    out, model, cb, ctrl = full
    rep = cb.report
    assert rep is not None and 0.38 <= rep["achieved_ratio"] <= 0.4  # finalized at the end of training
    assert ctrl.step_count == STEPS and any(r["lambda"] > 0 for r in ctrl.history)
    assert rep["structure_moved"]["blocks_changed"] > 0
    # the controller's state is in each checkpoint's trainer_state.json, as plain JSON, floats exact
    mid = saved_gblrc_state(out / f"checkpoint-{SAVE_AT}")
    assert mid["step"] == SAVE_AT and mid["steps"] == STEPS and not mid["cooled"]
    assert mid["history"] == ctrl.history[:SAVE_AT]
    end = saved_gblrc_state(out / f"checkpoint-{STEPS}")
    assert end["step"] == STEPS and end["cooled"] and end["history"] == ctrl.history
    assert not list(out.glob("checkpoint-*/gblrc_controller.pt"))  # no side file any more

    # the finalized model saves, loads and gives the same outputs
    x = {"input_ids": Ids(4, seed=9).ids, "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    gblrc.save(model, tmp_path / "m.gblr.pt", example_inputs=x)
    back = gblrc.load(tmp_path / "m.gblr.pt")
    with torch.no_grad():
        torch.testing.assert_close(back(**x).logits, model.eval()(**x).logits)


@pytest.mark.parametrize("where", ["moved", "latest"])
def test_resumed_run_matches_the_uninterrupted_one(full, crashed, tmp_path, where):
    """``moved``: the checkpoint copied to another folder, resumed with a fresh output_dir (the Trainer's
    state comes from that folder only); ``latest``: resume_from_checkpoint=True in the stopped run's folder."""
    torch.set_num_threads(1)
    if where == "moved":
        ckpt, out = moved_checkpoint(crashed, tmp_path), tmp_path / "fresh"
        resumed, cb2, ctrl2 = train(out, resume=ckpt)
        assert not (out / f"checkpoint-{SAVE_AT}").exists() and (out / f"checkpoint-{STEPS}").is_dir()
    else:
        out = tmp_path / "stopped"
        shutil.copytree(crashed, out)
        resumed, cb2, ctrl2 = train(out, resume=True)
    _, model, cb, ctrl = full
    assert ctrl2.step_count == STEPS and ctrl2.cooled
    assert cb2.report["achieved_ratio"] == cb.report["achieved_ratio"]
    assert len(ctrl2.history) == STEPS
    for r1, r2 in zip(ctrl.history, ctrl2.history):  # same lambda / cost / sigma trajectory
        assert r1.keys() == r2.keys() and r1["step"] == r2["step"] and r1["sigma"] == r2["sigma"]
        assert r2["lambda"] == pytest.approx(r1["lambda"], rel=1e-4, abs=1e-12)
        assert r2["cost"] == pytest.approx(r1["cost"], rel=1e-4)
    a, b = snapshot(model), snapshot(resumed)
    assert a.keys() == b.keys() and len(a) == 12
    for name in a:
        assert a[name][0] == b[name][0], name  # identical hardened structure
        for x, y in zip(a[name][1:], b[name][1:]):  # widths, locations, weights
            # float32 round-off of a resumed AdamW (restored moments), nothing more
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_resume_without_gblrc_state_is_an_error(crashed, tmp_path):
    torch.set_num_threads(1)
    ckpt = moved_checkpoint(crashed, tmp_path)
    path = ckpt / "trainer_state.json"
    st = json.loads(path.read_text())
    del st["stateful_callbacks"]["GBLRCallback"]  # a checkpoint written without GBLRCallback
    path.write_text(json.dumps(st))
    with pytest.raises(ValueError, match="without gblrc's schedule state"):
        train(tmp_path / "fresh", resume=ckpt)


def test_restoring_callbacks_by_rebuilding_them_is_refused(crashed, tmp_path):
    """restore_callback_states_from_checkpoint=True would replace the callback by one built from JSON,
    without its controller: a clear error, not a run whose controller never steps."""
    torch.set_num_threads(1)
    ckpt = moved_checkpoint(crashed, tmp_path)
    with pytest.raises(TypeError, match="restore_callback_states_from_checkpoint=False"):
        train(tmp_path / "fresh", resume=ckpt, restore_callback_states_from_checkpoint=True)


def test_controller_steps_before_the_scheduler_and_zero_grad(tmp_path):
    """on_optimizer_step: the proximal step reads the structure lr the optimizer step just used (a scheduler
    that changes the lr every step), while the gradients of that step are still there."""
    torch.set_num_threads(1)
    steps = 5
    model, ctrl = gblrc.prepare(tiny_classifier(), gblrc.CompressConfig(budget=0.5, steps=steps, progress=False))
    opt = torch.optim.AdamW(ctrl.param_groups(lr=1e-3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    used, seen = [], []  # structure lr of each optimizer.step(); what the controller saw

    def struct_lr(o):
        return next(g["lr"] for g in o.param_groups if g.get("gblrc_structure"))

    class Spy(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            used.append(struct_lr(optimizer))

    step, read = ctrl.step, ctrl._struct_lr

    def spy_step(optimizer=None, loss=None):
        seen.append(
            {
                "grads": all(p.grad is not None for p in ctrl.struct) if not ctrl.cooled else None,
                "sched": sched.last_epoch,
                "lr": None,
            }
        )
        return step(optimizer, loss)

    def spy_read(optimizer):
        seen[-1]["lr"] = lr = read(optimizer)
        return lr

    ctrl.step, ctrl._struct_lr = spy_step, spy_read
    trainer = transformers.Trainer(
        model=model,
        args=args(tmp_path, max_steps=steps, save_strategy="no", max_grad_norm=0.0),
        train_dataset=Ids(16 * steps),
        optimizers=(opt, sched),
        callbacks=[gblrc.GBLRCallback(ctrl, finalize=False), Spy()],
    )
    trainer.train()
    assert ctrl.step_count == steps and len(seen) == len(used) == steps
    assert len(set(used)) == steps  # the lr changes every step
    learned = [r for r in seen if r["lr"] is not None]  # the steps before the cool-down
    assert len(learned) == ctrl.schedule.cool_start >= 3
    assert [r["lr"] for r in learned] == used[: len(learned)]  # the lr of the step taken, not the next one
    assert [r["sched"] for r in seen] == list(range(steps))  # the scheduler has not stepped yet
    assert all(r["grads"] for r in learned)  # nor zero_grad


def test_callback_warns_when_the_optimizer_misses_the_structure(tmp_path):
    torch.set_num_threads(1)
    model, ctrl = gblrc.prepare(tiny_classifier(), gblrc.CompressConfig(budget=0.5, steps=2))
    cb = gblrc.GBLRCallback(ctrl)
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=Ids(16), callbacks=[cb])  # its own optimizer
    with pytest.warns(UserWarning, match="as content"):
        trainer.train()
    assert cb.report is not None and cb.report["achieved_ratio"] <= 0.5
