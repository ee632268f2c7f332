"""The block-refinement recipe on MiniLM: one post-training initialisation, then refinement variants.

The initialisation (``compress --steps 0`` with refinement off: calibration, sensitivity allocation,
data-aware SVD, sequential refit) runs once per structure and is cached; each variant then runs only
:func:`gblrc.learn.refine.refine_blocks` on a copy of it, so a recipe search costs the refinement only.
The training text is what ``gblrc compress --data stdlib-a.txt`` trains on: the stdlib-a docstrings
mixed half and half with 12,000 built-in package-docstring sentences (the CLI's default mix).
Fidelity = mean cosine of mean-pooled embeddings to the dense model, on held-out stdlib-a sentences
(in domain) and on other genres (gblrc.io.genres: README prose, scikit-learn dataset descriptions,
Debian changelogs; pydoc: CPython's documentation; stdlib-b: docstrings of other modules).

    .venv/bin/python -m benchmarks.refine_recipe_minilm --structure lowrank \\
        --variants "batches=16:steps=128,batches=64:steps=256,batches=64:steps=256:norms=true"

A variant is ``key=value:...`` over refine_blocks' settings: batches (calibration batches of 32
sentences), steps (per block), lr, norms (true: LayerNorms train too), target (dense | local),
structure (true: GBLR widths and locations move too).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import gblrc  # noqa: E402
from gblrc.io.genres import genre_sentences  # noqa: E402
from gblrc.io.zoo import load_minilm, mix_text  # noqa: E402
from gblrc.learn import compress as C  # noqa: E402
from gblrc.learn.budget import cost_ratio, fit_to_budget  # noqa: E402
from gblrc.learn.refine import refine_blocks  # noqa: E402
from gblrc.learn.report import structure_movement  # noqa: E402
from gblrc.nn.layer import GBLRLinear  # noqa: E402

from benchmarks.common import display_path, provenance  # noqa: E402
from benchmarks.compress_minilm import batches, embed  # noqa: E402
from benchmarks.fidelity_minilm import _value, source  # noqa: E402

EVAL_GENRES = ("readme", "sklearn", "changelog")


def judge_sets(tok, held, train, n: int, names) -> dict:
    """{name: batches}: the held-out training sentences, then ``n`` sentences of each other source."""
    sets = {"in domain": batches(tok, held, 64)}
    seen = set(train)
    for name in names:
        s = genre_sentences(name) if name in EVAL_GENRES else source(name, seed=1)
        s = [x for x in s if x not in seen]
        random.Random(1).shuffle(s)
        sets[name] = batches(tok, s[:n], 64)
    return sets


def training_text(heldout: int = 256, general: int = 12000) -> tuple[list[str], list[str]]:
    """(held-out stdlib-a sentences, training sentences): the rest of stdlib-a mixed half and half with
    ``general`` built-in package sentences, as ``gblrc compress --data stdlib-a.txt`` mixes by default."""
    all_a = source("stdlib-a")
    held, lines = all_a[:heldout], all_a[heldout:]
    return held, mix_text(lines, general, share=0.5, seed=0)


def fidelity(model, sets, refs) -> dict:
    out = {}
    with torch.no_grad():
        for k, b in sets.items():
            c = torch.nn.functional.cosine_similarity(embed(model, b), refs[k])
            out[k] = (round(c.mean().item(), 4), round(c.min().item(), 3))
    return out


def timed_init(dense, train_b, structure: str, budget: float) -> tuple:
    """compress --steps 0 without refinement, stage by stage: (model, layers, {stage: seconds}, report)."""
    cfg = gblrc.CompressConfig(budget=budget, steps=0, structure=structure, include=r"^encoder\.", progress=False)
    run = C.start(copy.deepcopy(dense), cfg, data=train_b)
    times = {}
    for stage in C.STAGES:
        t0 = time.perf_counter()
        stage(run)
        times[stage.__name__] = round(time.perf_counter() - t0, 1)
    return run.model, C.make_report(run), times


def parse(text: str) -> dict:
    kw = {}
    for o in filter(None, text.split(":")):
        k, _, v = o.partition("=")
        kw[k] = _value(v) if v else True
    return kw


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structure", default="lowrank", choices=("lowrank", "gblr"))
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--variants", default="batches=16:steps=128")
    ap.add_argument("--eval", default="readme,sklearn,changelog,pydoc,stdlib-b")
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--heldout", type=int, default=256)
    ap.add_argument("--general", type=int, default=12000, help="package sentences mixed in (the CLI's default)")
    ap.add_argument("--cache", default=".cache/refine_recipe", help="folder for the cached initialisations")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--init-from", metavar="M.gblr.pt", help="start from this saved steps0 model (with its .json)")
    args = ap.parse_args()
    print(provenance(args.threads or None), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, tok = load_minilm()
    held, train = training_text(args.heldout, args.general)
    train_b = batches(tok, train, 32)
    sets = judge_sets(tok, held, train, args.eval_n, filter(None, args.eval.split(",")))
    refs = {k: embed(dense, b) for k, b in sets.items()}
    print(
        f"MiniLM {args.structure} budget {args.budget}: {len(train)} training sentences (stdlib-a + "
        f"{args.general} package sentences); judged on "
        + ", ".join(f"{k} ({sum(len(b['input_ids']) for b in v)})" for k, v in sets.items()),
        flush=True,
    )
    os.makedirs(args.cache, exist_ok=True)
    path = os.path.join(args.cache, f"{args.structure}_{args.budget}_{args.general}.pt")
    if args.init_from:  # e.g. a steps0 model benchmarks.front_minilm cached (same training text)
        base, times = (
            gblrc.load(args.init_from),
            {"front cache": json.loads(Path(args.init_from[: -len(".gblr.pt")] + ".json").read_text())["compress_s"]},
        )
        print(f"initialisation from {display_path(args.init_from)} (made in {times['front cache']} s)", flush=True)
    elif os.path.exists(path):
        base, times = torch.load(path, weights_only=False)
        print(f"initialisation from the cache ({path}); it took {times}", flush=True)
    else:
        base, rep, times = timed_init(dense, train_b, args.structure, args.budget)
        torch.save((base, times), path)
        print(f"initialisation: {times} (ratio {rep['achieved_ratio']:.3f})", flush=True)
    init_s = sum(times.values())
    row0 = fidelity(base, sets, refs)
    print(f"  init: {init_s:.0f} s  " + "  ".join(f"{k} {v[0]:.4f} ({v[1]:.2f})" for k, v in row0.items()), flush=True)
    for text in args.variants.split(","):
        kw = parse(text)
        nb = int(kw.pop("batches", 16))
        model = copy.deepcopy(base)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, GBLRLinear)}
        t0 = time.perf_counter()
        before = {n: m.hard_structure() for n, m in layers.items()}
        rep = refine_blocks(model, dense, layers, train_b[:nb], **kw)
        if kw.get("structure"):  # the moved structure fitted to the budget, as compress does
            fit_to_budget(list(layers.values()), args.budget)
            rep["structure_moved"] = structure_movement(before, {n: m.hard_structure() for n, m in layers.items()})
        secs = time.perf_counter() - t0
        ratio = cost_ratio(layers.values())
        row = fidelity(model, sets, refs)
        losses = " ".join(f"{b['loss_before']:.3f}>{b['loss_after']:.3f}" for b in rep["blocks"])
        print(
            f"  {text}: +{secs:.0f} s (total {init_s + secs:.0f} s), ratio {ratio:.3f}  "
            + "  ".join(f"{k} {v[0]:.4f} ({v[1]:.2f})" for k, v in row.items())
            + f"\n      block losses {losses}"
            + (f"; moved {rep['structure_moved']}" if "structure_moved" in rep else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
