"""Fidelity of a compressed MiniLM on text of the training source *and* of other sources.

Users' traffic is never the calibration set: every variant is judged by the mean (and minimum)
cosine of mean-pooled sentence embeddings to the dense model on held-out sentences of the training
source (in domain) and on sentences of every other source (out of domain).  Sources, all offline:

    pydoc     CPython's documentation prose (pydoc_data.topics), ~1,800 sentences
    stdlib-a  docstrings of one half of the standard library's modules (a stable split by file name)
    stdlib-b  docstrings of the other half
    packages  docstrings of installed third-party packages (transformers, scikit-learn, SciPy, ...)
    readme, sklearn, changelog   other genres (gblrc.io.genres): README prose, dataset descriptions, changelogs

    .venv/bin/python benchmarks/fidelity_minilm.py --train pydoc --eval stdlib-b,packages \\
        --variants "lowrank,gblr" --steps 300

A variant is ``NAME[:key=value...]`` where NAME is ``gblr`` or ``lowrank`` (the ``structure``) and the
keys are other :func:`gblrc.compress` keyword arguments (numbers, ``none``, ``true``/``false`` parsed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import gblrc  # noqa: E402
from gblrc.io.genres import GENRES, genre_sentences  # noqa: E402
from gblrc.io.zoo import docstring_sentences, english_sentences, load_minilm, package_sentences  # noqa: E402

from benchmarks.compress_minilm import batches, embed  # noqa: E402  (the same tokenising and pooling)
from benchmarks.common import provenance  # noqa: E402


def source(name: str, n: int | None = None, seed: int = 0) -> list[str]:
    if name == "pydoc":
        s = english_sentences()
    elif name in ("stdlib-a", "stdlib-b"):
        k = 0 if name.endswith("a") else 1
        other = set(docstring_sentences(part=(1 - k, 2)))
        s = docstring_sentences(part=(k, 2), exclude=other)
    elif name.startswith("packages"):
        s = package_sentences(limit=int(name.split(":")[1]) if ":" in name else 30000)
    elif name in GENRES:
        s = genre_sentences(name)
    else:
        raise SystemExit(f"unknown source {name!r}: pydoc, stdlib-a, stdlib-b, packages[:N], {', '.join(GENRES)}")
    s = list(s)
    random.Random(seed).shuffle(s)
    return s[:n] if n else s


def fidelity(model, bl, ref) -> tuple[float, float]:
    c = torch.nn.functional.cosine_similarity(embed(model, bl), ref)
    return c.mean().item(), c.min().item()


def _value(v: str):
    low = v.lower()
    if low in ("none", "true", "false"):
        return {"none": None, "true": True, "false": False}[low]
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v


def parse_variant(text: str) -> tuple[str, dict]:
    name, *opts = text.split(":")
    kw = {"structure": name}
    for o in opts:
        k, _, v = o.partition("=")
        kw[k.replace("-", "_")] = _value(v) if v else True
    return text, kw


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default="pydoc", help="training source (see above)")
    ap.add_argument("--train-n", type=int, default=0, help="at most N training sentences (0: all not held out)")
    ap.add_argument("--eval", default="stdlib-b,packages", help="other sources to judge on, comma-separated")
    ap.add_argument(
        "--mix",
        default="",
        metavar="SOURCE",
        help="add this source's sentences to the training text (e.g. packages:20000); judge on others",
    )
    ap.add_argument(
        "--mix-share",
        type=float,
        default=0.0,
        metavar="F",
        help="with --mix: repeat the training source's sentences to about this share of the text",
    )
    ap.add_argument("--heldout", type=int, default=256, help="held-out sentences of the training source")
    ap.add_argument("--eval-n", type=int, default=300, help="sentences of each other source")
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--variants", default="lowrank,gblr")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    ap.add_argument("--save", metavar="DIR", help="also save each compressed model as DIR/<variant>.gblr.pt")
    args = ap.parse_args()
    print(provenance(getattr(args, "threads", None)), flush=True)  # results files name the commit, libraries and cores
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, tok = load_minilm()
    train_all = source(args.train)
    held, train = train_all[: args.heldout], train_all[args.heldout :]
    if args.train_n:
        train = train[: args.train_n]
    if args.mix:  # another source's sentences added to the training text (never judged on)
        extra = source(args.mix, seed=2)
        if args.mix_share:  # the training source repeated so that it is this share of the sentences
            reps = max(1, round(args.mix_share * len(extra) / ((1 - args.mix_share) * len(train))))
            train = train * reps
        train = train + extra
        random.Random(3).shuffle(train)
    evals = {f"{args.train} (in domain)": batches(tok, held, 64)}
    for name in filter(None, args.eval.split(",")):
        if name == args.train or name.split(":")[0] == args.mix.split(":")[0]:
            continue
        seen = set(train)
        sents = [s for s in source(name, seed=1) if s not in seen][: args.eval_n]
        evals[name] = batches(tok, sents, 64)
    refs = {k: embed(dense, b) for k, b in evals.items()}
    train_b = batches(tok, train, args.batch_size)
    sizes = ", ".join(f"{k} ({sum(len(x['input_ids']) for x in v)})" for k, v in evals.items())
    print(
        f"MiniLM, budget {args.budget}, {args.steps} steps, lr {args.lr}: training on {len(train)} sentences of "
        f"{args.train}{' + ' + args.mix if args.mix else ''}; judged on {sizes}; "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    rows = []
    for text in args.variants.split(","):
        text, kw = parse_variant(text)
        kw.setdefault("steps", args.steps)
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        cm, rep = gblrc.compress(
            model,
            args.budget,
            data=train_b,
            lr=args.lr,
            batch_size=args.batch_size,
            include=r"^encoder\.",
            progress=False,
            **kw,
        )
        secs = time.perf_counter() - t0
        row = {
            "variant": text,
            "achieved": rep["achieved_ratio"],
            "seconds": round(secs),
            "blocks": sum(l["blocks"] for l in rep["layers"]),
        }
        for k, b in evals.items():
            row[k] = fidelity(cm, b, refs[k])
        rows.append(row)
        print(
            f"  {text}: {secs:.0f} s, ratio {row['achieved']:.3f}, "
            + ", ".join(f"{k} {v[0]:.4f} (min {v[1]:.3f})" for k, v in row.items() if isinstance(v, tuple)),
            flush=True,
        )
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            gblrc.save(
                cm,
                os.path.join(args.save, text.replace(":", "_").replace("=", "") + ".gblr.pt"),
                example_inputs=evals[next(iter(evals))][0],
            )
    print()
    keys = list(evals)
    print(f"{'variant':<40}{'ratio':>7}{'s':>6}" + "".join(f"{k[:24]:>26}" for k in keys))
    for r in rows:
        print(
            f"{r['variant']:<40}{r['achieved']:>7.3f}{r['seconds']:>6}"
            + "".join(f"{r[k][0]:>18.4f} ({r[k][1]:.2f})" for k in keys)
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
