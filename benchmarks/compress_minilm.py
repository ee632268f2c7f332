"""MiniLM benchmark: all 36 encoder Linear layers at a budget, distilled on English sentences.

Compares the learned GBLR structure with truncated-SVD low rank at the same cost and the same
fine-tuning (full fixed widths), by the mean cosine similarity of mean-pooled sentence embeddings to the
dense model on held-out sentences; also the time of a compress training step vs a dense fine-tuning
step of the same model and batch.

    .venv/bin/python benchmarks/compress_minilm.py --steps 200 --budget 0.4
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import gblrc  # noqa: E402
from gblrc.io.zoo import english_passages, english_sentences, load_minilm  # noqa: E402
from benchmarks.common import provenance  # noqa: E402


def batches(tok, sents, bs, max_len=64):
    out = []
    for i in range(0, len(sents), bs):
        enc = tok(sents[i : i + bs], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def export_dense_fastest(dense, ex, path, feeds, threads=2, repeats=15, sessions=3):
    """Write the dense ONNX export of ``dense`` to ``path`` in its fastest attention form (eager or SDPA, both
    timed on ``feeds`` with ``threads`` threads: gblrc.export.attention, as `gblrc lower` chooses); print and
    return the choice.  Every benchmark's dense baseline is this one (issue 22: the honest baseline)."""
    import onnx

    from gblrc.export.attention import export_in_fastest_form, record_choice
    from gblrc.export.graph import export_onnx

    model, choice = export_in_fastest_form(
        dense, lambda: export_onnx(dense, ex), feeds=feeds, threads=threads, repeats=repeats, sessions=sessions
    )
    record_choice(model, choice)
    onnx.save(model, path)
    print(f"dense baseline: {choice.line()}", flush=True)
    return choice


@torch.no_grad()
def embed(model, bl):
    embs = []
    for b in bl:
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        embs.append((h * m).sum(1) / m.sum(1))
    return torch.cat(embs)


def dense_step_time(model, bl, n=8, lr=2e-4):
    """Seconds per dense fine-tuning step (forward, MSE to fixed targets, backward, AdamW)."""
    model = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    with torch.no_grad():
        targets = [model(**b).last_hidden_state for b in bl[:n]]
    times = []
    for b, t in zip(bl[:n], targets):
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(**b).last_hidden_state, t + 0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--heldout", type=int, default=256)
    ap.add_argument(
        "--variants",
        default="gblr:sequential,lowrank:sequential,lowrank:svd",
        help="comma-separated structure:init[:r=R][:tile=T][:alloc][:norms] (alloc: per-layer budgets from measured "
        "sensitivities; norms: LayerNorms trained too; cap=C: no layer above C x budget (default: no cap); "
        "init: sequential / data = activation-"
        "aware SVD with / without the sequential refit, svd = plain truncated SVD; r: rank per "
        "component; tile: widths and starts in multiples of T)",
    )
    ap.add_argument("--calib-batches", type=int, default=16)
    ap.add_argument(
        "--save",
        metavar="DIR",
        help="also save each compressed model as DIR/<variant>.gblr.pt (for benchmarks/minilm_speed.py)",
    )
    ap.add_argument("--layer-loss", type=float, default=1.0)
    ap.add_argument("--init-factor", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--text",
        default="sentences",
        metavar="sentences|passages[:N]",
        help="training text: the documentation sentences not held out, or N random word spans of the "
        "documentation text that never include a held-out sentence (default N 20000)",
    )
    ap.add_argument(
        "--train-eval",
        type=int,
        default=0,
        metavar="N",
        help="also print the cosine on N training sentences (to see over-fitting)",
    )
    args = ap.parse_args()
    print(provenance(getattr(args, "threads", None)), flush=True)  # results files name the commit, libraries and cores
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, tok = load_minilm()
    sents = english_sentences()
    random.Random(0).shuffle(sents)
    held, train = sents[: args.heldout], sents[args.heldout :]
    if args.text.startswith("passages"):
        train = english_passages(int(args.text.split(":")[1]) if ":" in args.text else 20000, exclude=held)
    train_b = batches(tok, train, args.batch_size)
    held_b = batches(tok, held, 64)
    ref = embed(dense, held_b)
    t_dense = dense_step_time(dense, train_b)
    print(
        f"MiniLM: {len(train)} training {args.text.split(':')[0]} ({len(train_b)} batches of {args.batch_size}), "
        f"{len(held)} held out; budget {args.budget}, {args.steps} steps, lr {args.lr}, "
        f"torch threads {torch.get_num_threads()}"
    )
    rows = []
    for variant in args.variants.split(","):
        structure, init, *opts = variant.split(":")
        opts = dict(o.split("=") if "=" in o else (o, "1") for o in opts)
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        cm, rep = gblrc.compress(
            model,
            args.budget,
            data=train_b,
            steps=args.steps,
            lr=args.lr,
            include=r"^encoder\.",
            structure=structure,
            init=init,
            progress=False,
            layer_loss=args.layer_loss,
            init_factor=args.init_factor,
            rank_per_component=int(opts.get("r", 1)),
            tile=int(opts.get("tile", 1)),
            calib_batches=args.calib_batches,
            allocate="sensitivity" if "alloc" in opts else "uniform",
            tune_norms="norms" in opts,
            allocate_cap=float(opts["cap"]) if opts.get("cap", "none") != "none" else None,
        )
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            gblrc.save(
                cm,
                os.path.join(args.save, variant.replace(":", "_").replace("=", "") + ".gblr.pt"),
                example_inputs=held_b[0],
            )
        secs = time.perf_counter() - t0
        cos = torch.nn.functional.cosine_similarity(embed(cm, held_b), ref).mean().item()
        step_t = rep.get("train_seconds", secs) / max(1, args.steps)
        ratios = [l["ratio"] for l in rep["layers"]]
        if args.train_eval:
            tb = batches(tok, train[: args.train_eval], 64)
            tc = torch.nn.functional.cosine_similarity(embed(cm, tb), embed(dense, tb)).mean().item()
            print(f"  {variant}: cosine on {args.train_eval} training sentences {tc:.4f}")
        rows.append(
            (
                variant,
                len(rep["layers"]),
                rep["achieved_ratio"],
                cos,
                step_t / t_dense,
                secs,
                min(ratios),
                max(ratios),
                sum(l["blocks"] for l in rep["layers"]),
            )
        )
        print(
            f"  {variant}: done in {secs:.0f} s; loss {rep['loss_curve'][0][1]:.4f} -> {rep['loss_curve'][-1][1]:.4f}"
            if rep["loss_curve"]
            else "",
            flush=True,
        )
    print()
    print(
        f"{'variant':<24}{'layers':>7}{'achieved':>10}{'cosine':>9}{'step/dense':>12}{'wall s':>8}"
        f"{'layer ratio min..max':>22}{'blocks':>8}"
    )
    for s, n, a, c, r, w, lo, hi, nb in rows:
        print(f"{s:<24}{n:>7}{a:>10.4f}{c:>9.4f}{r:>12.2f}{w:>8.0f}{lo:>12.3f}..{hi:<8.3f}{nb:>8}")
    print(f"(dense fine-tuning step: {t_dense * 1000:.0f} ms, median of 7)")


if __name__ == "__main__":
    main()
