"""GBLR inside Hugging Face ``transformers.Trainer``: gblrc.prepare -> Trainer + gblrc.GBLRCallback -> save.

A small BERT-style classifier (random init, 2 layers, hidden 128) learns to tell CPython's documentation
prose (``pydoc_data``) from stdlib docstrings -- text that ships with Python, so it runs offline -- with
its encoder's linear layers as GBLR layers at 40% of their multiply-adds, trained with the task loss by
the Trainer's own loop.  The callback runs the method after every optimizer step, saves its state in the
Trainer's checkpoints (``resume_from_checkpoint`` works) and finalizes the structure at the end::

    model, ctrl = gblrc.prepare(model, gblrc.CompressConfig(budget=0.4, steps=max_steps))
    opt = torch.optim.AdamW(ctrl.param_groups(lr=lr))            # structure: own lr, beta1 = 0
    cb = gblrc.GBLRCallback(ctrl)
    Trainer(model, args, train_dataset=..., optimizers=(opt, None), callbacks=[cb]).train()
    cb.report                                                     # achieved cost ratio, per layer, ...

    python samples/hf_trainer.py --steps 300 --out out/hf_trainer      # ~2 min on 2 cores

For distillation from a pretrained model instead of a task loss, override ``compute_loss`` with
``gblrc.DistillationLoss(teacher, model)`` (see gblrc/learn/distill.py).  Multi-process: launch this
script with ``torchrun --nproc-per-node N`` or ``accelerate launch``; the Trainer wraps the model in
DistributedDataParallel (its default ``ddp_find_unused_parameters`` lets the cool-down freeze the structure).
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

import gblrc  # noqa: E402
from gblrc.io.zoo import docstring_sentences, english_sentences, minilm_path  # noqa: E402


def genre_data(tok, n: int, seed: int = 0, max_len: int = 48):
    """Sentences labelled 0 (documentation prose) / 1 (docstrings), balanced, shuffled, tokenised."""
    rng = random.Random(seed)
    prose, docs = english_sentences(), docstring_sentences()
    rng.shuffle(prose)
    rng.shuffle(docs)
    rows = [(s, 0) for s in prose[: n // 2]] + [(s, 1) for s in docs[: n // 2]]
    rng.shuffle(rows)
    enc = tok([s for s, _ in rows], padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return [
        {
            "input_ids": enc["input_ids"][i],
            "attention_mask": enc["attention_mask"][i],
            "token_type_ids": enc["token_type_ids"][i],
            "labels": torch.tensor(y),
        }
        for i, (_, y) in enumerate(rows)
    ]


@torch.no_grad()
def accuracy(model, rows, bs: int = 64) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(rows), bs):
        b = {k: torch.stack([r[k] for r in rows[i : i + bs]]) for k in rows[0]}
        y = b.pop("labels")
        hits += int((model(**b).logits.argmax(-1) == y).sum())
    return hits / len(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--examples", type=int, default=4000, help="training sentences (half of each genre)")
    ap.add_argument("--out", default="out/hf_trainer", help="folder for the Trainer's checkpoints and the model")
    ap.add_argument("--resume", action="store_true", help="continue from the last Trainer checkpoint in --out")
    a = ap.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    data = genre_data(tok, a.examples + 600)
    train, test = data[:-600], data[-600:]
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=512,
            max_position_embeddings=64,
            num_labels=2,
        )
    )
    cfg = gblrc.CompressConfig(budget=a.budget, steps=a.steps, lr=a.lr, include=r"^bert\.encoder\.", progress=False)
    model, ctrl = gblrc.prepare(model, cfg)  # no calibration data: plain SVD init of the random weights
    opt = torch.optim.AdamW(
        ctrl.param_groups(lr=a.lr)
        + [{"params": [p for n, p in model.named_parameters() if "encoder" not in n], "lr": a.lr}]
    )
    cb = gblrc.GBLRCallback(ctrl)
    args = TrainingArguments(
        output_dir=a.out,
        max_steps=a.steps,
        per_device_train_batch_size=32,
        learning_rate=a.lr,
        warmup_steps=a.steps // 10,
        save_steps=max(1, a.steps // 3),
        save_total_limit=2,
        logging_steps=max(1, a.steps // 10),
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=train, optimizers=(opt, None), callbacks=[cb]).train(
        resume_from_checkpoint=True if a.resume else None
    )
    rep = cb.report
    if args.process_index == 0:
        acc = accuracy(model.cpu(), test)
        out = Path(a.out) / "model.gblr.pt"
        gblrc.save(
            model,
            out,
            example_inputs={k: torch.stack([r[k] for r in test[:2]]) for k in ("input_ids", "attention_mask")},
        )
        print(
            f"GBLR encoder at budget {a.budget}: achieved cost ratio {rep['achieved_ratio']:.3f}, "
            f"{sum(r['blocks'] for r in rep['layers'])} blocks ({rep['structure_moved']['blocks_changed']:.2f} of "
            f"the initial ones moved); held-out genre accuracy {acc:.3f}; wrote {out}"
        )


if __name__ == "__main__":
    main()
