"""GBLR vs low rank at equal cost when the structured layers are trained FROM SCRATCH (the paper's setting).

benchmarks/model_families.py compresses a trained dense model; here every structured model starts from the model's
random initialisation.  For ViT and MLP-Mixer on scikit-learn's digits (16x16, samples/families.py "bench"
sizes, fixed 80/20 split), at each budget and seed, from the untrained model (built with ``seed``):

* GBLR     -- ``--api loop`` (default): the user-loop API in a plain PyTorch loop,
  ``samples/scratch_loop.py`` ``train_structured`` (``gblrc.prepare(model, CompressConfig(budget, steps=STEPS,
  init="svd", allocate="uniform", training=TrainingConfig(train_rest=True)))``, AdamW on the controller's
  groups, DataLoader batches, ``ctrl.step(opt)`` after each step, ``gblrc.finalize``); ``--api compress``:
  ``gblrc.compress(model, budget, data=train, structure="gblr", init="svd", allocate="uniform", loss="task",
  steps=STEPS, seed=seed, lr=LR, batch_size=64)`` (gblrc's own loop): widths/locations learned while training;
* low rank -- the same with ``structure="lowrank"`` (truncated SVD of the random weights, content trained);
* dense    -- benchmarks/model_families.py ``train_dense`` (AdamW wd 0.01, 5% warm-up, cosine, all parameters) for
  STEPS steps: the usual from-scratch reference;
* dense/cr -- (``--methods`` with dense/cr) dense with the compress recipe: the same parameters compress trains
  (``--rest``), AdamW wd 0, the
  content-lr schedule of gblrc's trainer (cosine lr -> 0.1 lr), same batches: isolates the cost of the structure
  from the cost of the recipe.

``--rest`` sets what else trains besides the compressed layers: "frozen" (the library default: the head,
LayerNorms, position embedding and class token stay at their random init), "norms" (``tune_norms=True``) or
"all" (every non-compressed parameter, head included: ``compress(..., train_rest=True)``).  The results file
was measured with an equivalent earlier form of "all" (the same parameters passed through a patched norm hook,
before ``train_rest`` existed).

Scores: held-out accuracy, mean +- sd (ddof 1) over seeds; the achieved cost ratio (compressed layers'
multiply-adds / dense); GBLR - low rank per seed (same init, same batches), mean +- sd.

    .venv/bin/python -m benchmarks.scratch_structures              # full run (~40 min, 1 thread)
    .venv/bin/python -m benchmarks.scratch_structures --quick      # smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import model_families as bf  # noqa: E402
from benchmarks.common import sample  # noqa: E402

fam = bf.fam
sl = sample("scratch_loop")  # samples/scratch_loop.py: the plain-loop training with gblrc.prepare / finalize

import gblrc  # noqa: E402
import gblrc.learn.compress as gc  # noqa: E402
from gblrc.nn.layer import GBLRLinear  # noqa: E402
from gblrc.nn.replace import as_linear, find_linears  # noqa: E402
from benchmarks.common import provenance  # noqa: E402

LR = {"vit": 1e-3, "mixer": 2e-3}  # families.py's dense learning rates
METHODS = ("dense", "dense/cr", "lowrank", "gblr")


def rest_params(model, rest):
    """Non-compressed parameters trained alongside the compressed layers (``--rest``)."""
    if rest == "frozen":
        return []
    if rest == "norms":
        return gc._norm_params(model)
    inside = {id(p) for m in model.modules() if isinstance(m, GBLRLinear) for p in m.parameters()}
    inside |= {id(p) for _, m in find_linears(model) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in inside and p.is_floating_point()]


def structured(model, budget, data, method, a, seed, lr):
    if a.api == "loop":
        if a.rest != "all":
            raise SystemExit("--api loop trains the whole model (rest=all); use --api compress for --rest frozen/norms")
        model, rep = sl.train_structured(
            model,
            budget,
            data,
            structure=method,
            steps=a.steps,
            lr=lr,
            lr_struct=a.lr_struct,
            batch_size=a.batch_size,
            seed=seed,
        )
        note = f"{sum(r['blocks'] for r in rep['layers'])} blocks, {rep['structure_moved']['blocks_changed']:.2f} moved"
        return model, rep["achieved_ratio"], note
    kw = dict(
        data=data,
        structure=method,
        init="svd",
        allocate="uniform",
        loss="task",
        steps=a.steps,
        progress=False,
        seed=seed,
        lr=lr,
        batch_size=a.batch_size,
        lr_struct=a.lr_struct,
        tune_norms=a.rest == "norms",
        train_rest=a.rest == "all",
    )
    model, rep = gblrc.compress(model, budget, **kw)
    note = f"{sum(r['blocks'] for r in rep['layers'])} blocks, {rep['structure_moved']['blocks_changed']:.2f} moved"
    return model, rep["achieved_ratio"], note


def dense_compress_recipe(model, data, a, seed, lr):
    """What gblrc's trainer does for the content, on the dense model: same parameters, lr schedule, batches."""
    params = [p for _, m in find_linears(model) for p in as_linear(m).parameters()] + rest_params(model, a.rest)
    torch.manual_seed(seed)
    return bf.train_like_compress(model, params, data, steps=a.steps, batch_size=a.batch_size, lr=lr, seed=seed)


def one_run(name, method, budget, seed, a, task):
    size = "tiny" if a.quick else "bench"
    model = fam.build(name, size, seed=seed, image_size=a.image_size)  # untrained
    lr = a.lr if a.lr is not None else LR[name]
    if method == "dense":
        task.train_steps, task.train_lr = a.steps, lr
        model, ratio, note = bf.train_dense(task, model, seed=seed), 1.0, ""
    elif method == "dense/cr":
        model, ratio, note = dense_compress_recipe(model, task.train_data, a, seed, lr), 1.0, ""
    else:
        model, ratio, note = structured(model, budget, task.train_data, method, a, seed, lr)
    return bf.accuracy(model, task.test_data), ratio, note


def ms(v):
    v = np.asarray(v, dtype=float)
    sd = v.std(ddof=1) if len(v) > 1 else float("nan")
    return f"{v.mean():.4f} ± {sd:.4f}"


def table(res, a) -> str:
    out = [
        "| model | budget | method | achieved ratio | accuracy (mean ± sd) | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for name in a.models:
        for key in [("dense", None), ("dense/cr", None)] + [(m, b) for b in a.budgets for m in ("lowrank", "gblr")]:
            if key[0] not in a.methods:
                continue
            accs = [res[(name, key[0], key[1], s)][0] for s in a.seeds]
            ratio = np.mean([res[(name, key[0], key[1], s)][1] for s in a.seeds])
            label = {
                "dense": "dense (train_dense, all params)",
                "dense/cr": f"dense (compress recipe, rest={a.rest})",
                "lowrank": "low rank",
                "gblr": "GBLR",
            }[key[0]]
            out.append(
                f"| {name} | {'—' if key[1] is None else key[1]} | {label} | {ratio:.3f} | {ms(accs)} | "
                + " ".join(f"{x:.4f}" for x in accs)
                + " |"
            )
        if {"lowrank", "gblr"} <= set(a.methods):
            for b in a.budgets:
                d = [res[(name, "gblr", b, s)][0] - res[(name, "lowrank", b, s)][0] for s in a.seeds]
                out.append(
                    f"| {name} | {b} | **GBLR − low rank** (paired by seed) | — | {ms(d).replace('± ', '± ')} | "
                    + " ".join(f"{x:+.4f}" for x in d)
                    + " |"
                )
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit,mixer")
    ap.add_argument("--budgets", default="0.15,0.3")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="dense,lowrank,gblr", help="subset of dense,dense/cr,lowrank,gblr")
    ap.add_argument("--steps", type=int, default=None, help="training steps of every model (default 1000; --quick 60)")
    ap.add_argument(
        "--lr", type=float, default=None, help="learning rate (default families.py's: vit 1e-3, mixer 2e-3)"
    )
    ap.add_argument("--lr-struct", type=float, default=None, help="GBLR structure lr (default: compress's, 5 x lr)")
    ap.add_argument(
        "--rest",
        default="all",
        choices=["frozen", "norms", "all"],
        help="non-compressed parameters trained with the structured layers (module doc)",
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--api",
        default="loop",
        choices=["loop", "compress"],
        help="loop: gblrc.prepare + a plain PyTorch loop + gblrc.finalize; compress: gblrc.compress",
    )
    ap.add_argument("--quick", action="store_true", help="tiny models on 8x8 digits, few steps, 1 seed")
    a = ap.parse_args(argv)
    print(provenance(getattr(a, "threads", None)), flush=True)  # results files name the commit, libraries and cores
    torch.set_num_threads(1)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    a.budgets = [float(b) for b in a.budgets.split(",") if b.strip()]
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if a.quick:
        a.seeds = a.seeds[:2]
    a.steps = a.steps if a.steps is not None else (60 if a.quick else 1000)
    a.image_size = 8 if a.quick else 16
    t_all, res = time.perf_counter(), {}
    for name in a.models:
        task = bf.image_task(name, a.quick, a.image_size)
        for seed in a.seeds:
            runs = [(m, None) for m in ("dense", "dense/cr") if m in a.methods]
            runs += [(m, b) for b in a.budgets for m in ("lowrank", "gblr") if m in a.methods]
            for method, budget in runs:
                t0 = time.perf_counter()
                res[(name, method, budget, seed)] = one_run(name, method, budget, seed, a, task)
                acc, ratio, note = res[(name, method, budget, seed)]
                print(
                    f"[{name} seed {seed}] {method}{'' if budget is None else f' @ {budget}'}: ratio {ratio:.3f}, "
                    f"accuracy {acc:.4f} ({time.perf_counter() - t0:.0f} s{'; ' + note if note else ''})",
                    flush=True,
                )
    print()
    print(
        f"scratch_structures{' (--quick)' if a.quick else ''}: {','.join(a.models)} "
        f"({'tiny, 8x8' if a.quick else 'bench, 16x16'} "
        f"digits), {a.steps} steps from random init, batch {a.batch_size}, lr {a.lr or LR}, lr_struct "
        f"{a.lr_struct if a.lr_struct is not None else '5 x lr (default)'}, rest={a.rest}, api={a.api}, "
        f"seeds {a.seeds}; "
        f"torch {torch.__version__}, 1 thread; total {time.perf_counter() - t_all:.0f} s"
    )
    print(table(res, a))
    return res


if __name__ == "__main__":
    main()
