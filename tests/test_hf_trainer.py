"""The method inside transformers.Trainer with gblrc.GBLRCallback: budget met, stop-and-resume identical."""

from __future__ import annotations

import os

import pytest
import torch

import gblrc

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

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
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
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
    return BertForSequenceClassification(cfg)


def args(out, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        save_steps=SAVE_AT,
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


def train(out, *, resume=False, crash=False):
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
        args=args(out),
        train_dataset=Ids(),
        optimizers=(opt, None),
        callbacks=[cb] + ([Crash()] if crash else []),
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    return model, cb, ctrl


def snapshot(model):
    from gblrc.nn.layer import GBLRLinear

    return {
        n: ([t.tolist() for t in m.hard_intervals()], m.dense_weight().detach().clone())
        for n, m in model.named_modules()
        if isinstance(m, GBLRLinear)
    }


def test_trainer_callback_meets_budget_and_resume_matches_uninterrupted(tmp_path):
    torch.set_num_threads(1)
    full, cb, ctrl = train(tmp_path / "full")
    rep = cb.report
    assert rep is not None and 0.38 <= rep["achieved_ratio"] <= 0.4  # finalized at the end of training
    assert ctrl.step_count == STEPS and any(r["lambda"] > 0 for r in ctrl.history)
    assert rep["structure_moved"]["blocks_changed"] > 0
    assert (tmp_path / "full" / f"checkpoint-{SAVE_AT}" / "gblrc_controller.pt").exists()

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", crash=True)
    resumed, cb2, ctrl2 = train(tmp_path / "cut", resume=True)
    assert ctrl2.step_count == STEPS and cb2.report["achieved_ratio"] == rep["achieved_ratio"]
    a, b = snapshot(full), snapshot(resumed)
    assert a.keys() == b.keys() and len(a) == 12
    for name in a:
        assert a[name][0] == b[name][0], name  # identical structure
        # same weights: float32 round-off of a resumed AdamW (restored moments), nothing more
        torch.testing.assert_close(a[name][1], b[name][1], rtol=1e-4, atol=1e-5)

    # the finalized model saves, loads and gives the same outputs
    x = {"input_ids": Ids(4, seed=9).ids, "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    gblrc.save(full, tmp_path / "m.gblr.pt", example_inputs=x)
    back = gblrc.load(tmp_path / "m.gblr.pt")
    with torch.no_grad():
        torch.testing.assert_close(back(**x).logits, full.eval()(**x).logits)


def test_resume_without_gblrc_state_is_an_error(tmp_path):
    torch.set_num_threads(1)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, crash=True)
    os.remove(tmp_path / f"checkpoint-{SAVE_AT}" / "gblrc_controller.pt")
    with pytest.raises(ValueError, match="gblrc_controller.pt is missing"):
        train(tmp_path, resume=True)


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
