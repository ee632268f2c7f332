"""The paper's model families: GBLR vs low rank vs Monarch at the same budgets, trained from scratch offline.

Models (samples/families.py, "bench" sizes): ViT and MLP-Mixer on scikit-learn's digits upsampled to
16x16, a ResNet-style CNN on the 8x8 digits (only when gblrc compresses nn.Conv2d), all scored by
held-out accuracy (fixed 80/20 split); a byte-level GPT-2 trained on the text of Python's bundled
documentation (``pydoc_data.topics``), scored by held-out perplexity per byte (last 10% of the text).

For each model: train the dense model from scratch (AdamW, cosine schedule), then, at every budget, from a
copy of the trained dense model:

* GBLR     — ``gblrc.compress(..., structure="gblr")`` (learned widths/locations);
* low rank — ``gblrc.compress(..., structure="lowrank")`` (truncated SVD at the budget, full widths);
* Monarch  — ``gblrc.nn.monarch.replace_with_monarch`` (Monarch projection, the block count under the budget
  closest to it) and a plain fine-tuning loop with what gblrc's trainer does for the content: the same
  batches (``gblrc.learn.data.batch_stream``, same seed), task loss, AdamW (weight decay 0) on the replaced
  layers only, the same lr and cosine decay to 0.1 x lr, the same number of steps, model in eval mode.

Every variant is lowered with ``gblrc.lower`` (parity-checked against PyTorch) and timed in ONNX Runtime
(CPU provider) against the dense ONNX export of the same model, all variants of a model interleaved in the
same loop; the time ratio is the ratio of medians.  The achieved ratio is the compressed layers' multiply-adds
over their dense multiply-adds (gblrc's report for GBLR/low rank; Monarch's cost is quantised by its block
count, so it lands under the budget, sometimes well under).

    .venv/bin/python -m benchmarks.model_families --plot out/families.png     # full run (~10 min, 2 shared cores)
    .venv/bin/python -m benchmarks.model_families --quick --plot /tmp/families.png   # smoke run (~20 s)
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from benchmarks.common import display_path, sample  # noqa: E402

fam = sample("families")  # samples/families.py

import gblrc  # noqa: E402
from gblrc.runtime import timing  # noqa: E402
from gblrc.learn.data import batch_stream, call_model, model_output  # noqa: E402
from gblrc.nn.monarch import MonarchLinear, replace_with_monarch  # noqa: E402
from gblrc.learn.objective import task_loss  # noqa: E402
from gblrc.learn.config import CompressConfig  # noqa: E402
from gblrc.learn.train import Schedule  # noqa: E402
from benchmarks.common import provenance  # noqa: E402

METHODS = ("gblr", "lowrank", "monarch")
LABEL = {"dense": "dense", "gblr": "GBLR", "lowrank": "low rank", "monarch": "Monarch"}


def conv_supported() -> bool:
    """Does gblrc compress nn.Conv2d (gblrc.nn.conv + gblrc.nn.replace.is_conv2d)?"""
    try:
        import gblrc.nn.conv  # noqa: F401
        from gblrc.nn import replace
    except ImportError:
        return False
    return hasattr(replace, "is_conv2d") and hasattr(gblrc, "GBLRConv2d")


# ----------------------------------------------------------------------------------- tasks
class Task:
    """A model family with its data, its dense training and its metric."""

    def __init__(
        self,
        name,
        model_fn,
        train_data,
        test_data,
        example,
        latency_feeds,
        metric,
        higher_better,
        train_steps,
        train_lr,
        batch_size,
    ):
        self.name, self.model_fn = name, model_fn
        self.train_data, self.test_data, self.example, self.latency_feeds = (
            train_data,
            test_data,
            example,
            latency_feeds,
        )
        self.metric, self.higher_better = metric, higher_better
        self.train_steps, self.train_lr, self.batch_size = train_steps, train_lr, batch_size


@torch.no_grad()
def accuracy(model, data, bs=256):
    model.eval()
    x, y = data["inputs"], data["targets"]
    hits = sum(int((model(x[i : i + bs]).argmax(-1) == y[i : i + bs]).sum()) for i in range(0, len(x), bs))
    return hits / len(x)


@torch.no_grad()
def perplexity(model, data, bs=32):
    model.eval()
    ids, y = data["inputs"]["input_ids"], data["targets"]
    tot, n = 0.0, 0
    for i in range(0, len(ids), bs):
        logits = model(input_ids=ids[i : i + bs]).logits
        tot += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y[i : i + bs].reshape(-1), reduction="sum"
            )
        )
        n += y[i : i + bs].numel()
    return math.exp(tot / n)


def image_task(name, quick, image_size):
    xtr, ytr, xte, yte = fam.digits(image_size=image_size, seed=0)
    size = "tiny" if quick else "bench"
    kw = dict(image_size=image_size) if name != "cnn" else {}
    steps = {"vit": 600, "mixer": 600, "cnn": 500}[name]
    lr = {"vit": 1e-3, "mixer": 2e-3, "cnn": 3e-3}[name]
    g = torch.Generator().manual_seed(1)
    lat = torch.rand(256, 1, image_size, image_size, generator=g)
    return Task(
        name,
        lambda: fam.build(name, size, seed=0, **kw),
        {"inputs": xtr, "targets": ytr},
        {"inputs": xte, "targets": yte},
        xte[:4],
        {"input": lat.numpy()},
        accuracy,
        True,
        120 if quick else steps,
        lr,
        64,
    )


def gpt2_task(quick):
    seq = 32 if quick else 64
    tr, te = fam.pydoc_bytes(seq_len=seq, held_out=0.1)
    te = te[: (64 if quick else 512)]
    size = "tiny" if quick else "bench"
    over = dict(vocab_size=256)
    g = torch.Generator().manual_seed(1)
    lat = torch.randint(0, 256, (16, seq), generator=g)
    return Task(
        "gpt2",
        lambda: fam.build("gpt2", size, seed=0, **over),
        {"inputs": {"input_ids": tr[:, :-1]}, "targets": tr[:, 1:]},
        {"inputs": {"input_ids": te[:, :-1]}, "targets": te[:, 1:]},
        OrderedDict(input_ids=te[:2, :-1]),
        {"input_ids": lat.numpy()},
        perplexity,
        False,
        150 if quick else 800,
        2e-3,
        16,
    )


# ------------------------------------------------------------------------------- training
def train_dense(task: Task, model, seed=0):
    """From scratch: AdamW (weight decay 0.01), linear warm-up 5%, cosine decay; model in train mode."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=task.train_lr, weight_decay=0.01)
    warm = max(1, task.train_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / task.train_steps)))
    )
    stream = batch_stream(task.train_data, task.batch_size, seed + 100)
    model.train()
    for _ in range(task.train_steps):
        x, y = next(stream)
        loss = task_loss(model_output(call_model(model, x)), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.eval()


def finetune_monarch(model, data, *, steps, batch_size, lr, seed=0):
    """What gblrc's trainer does for the content, on the Monarch layers (module doc)."""
    params = [p for m in model.modules() if isinstance(m, MonarchLinear) for p in m.parameters()]
    return train_like_compress(model, params, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed)


def train_like_compress(model, params, data, *, steps, batch_size, lr, seed=0):
    """Train only ``params`` the way gblrc's trainer trains the content: task loss on the same batches
    (``batch_stream``, same seed), AdamW with weight decay 0, cosine lr to 0.1 x lr, model in eval mode."""
    cfg = Schedule.of(
        CompressConfig(budget=1.0, steps=steps, batch_size=batch_size, lr=lr, seed=seed, structure="lowrank")
    )
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": 0.0}])
    stream = batch_stream(data, batch_size, seed)
    model.eval()
    for step in range(steps):
        x, y = next(stream)
        loss = task_loss(model_output(call_model(model, x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.param_groups[0]["lr"] = cfg.content_lr(step)
        opt.step()
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def compress_variant(task: Task, dense, method, budget, a):
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    if method == "monarch":
        from gblrc.nn.replace import find_linears, is_linear

        if not any(is_linear(m) for _, m in find_linears(model)):
            return (
                None,
                "n/a: the Monarch baseline replaces linear layers; this model's compressible layers are convolutions",
            )
        try:
            model, rep = replace_with_monarch(model, budget)
        except ValueError as e:
            return None, f"n/a ({e})"
        finetune_monarch(model, task.train_data, steps=a.steps, batch_size=task.batch_size, lr=a.lr)
        skipped = [s["name"] for s in rep["skipped"]]
        note = f"{len(rep['layers'])} layers, blocks {sorted({r['nblocks'] for r in rep['layers']})}" + (
            f", {len(skipped)} convs left dense" if skipped else ""
        )
    else:
        model, rep = gblrc.compress(
            model,
            budget,
            data=task.train_data,
            steps=a.steps,
            batch_size=task.batch_size,
            lr=a.lr,
            structure=method,
            progress=False,
            seed=0,
            allocate=a.allocate,
            **(a.gblr_options if method == "gblr" else {}),
        )
        note = f"{len(rep['layers'])} layers, {sum(r['blocks'] for r in rep['layers'])} blocks"
    return {"model": model, "ratio": rep["achieved_ratio"], "seconds": time.perf_counter() - t0, "note": note}, None


# ----------------------------------------------------------------------------- latency
def time_sessions(paths: dict, feeds: dict, threads: int, repeats: int) -> dict:
    """Median seconds per run of every ONNX file, runs interleaved (one of each per round), one session each,
    inputs bound once (gblrc.runtime.timing: the timing harness of `gblrc bench` and the tuner)."""
    return timing.best_of_sessions(paths, feeds, threads=threads, repeats=repeats, sessions=1, warmup=1).best


# ---------------------------------------------------------------------------------- main
def run_task(task: Task, a, tmp: str) -> list[dict]:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dense = train_dense(task, task.model_fn())
    train_s = time.perf_counter() - t0
    rows = [
        {
            "model": task.name,
            "method": "dense",
            "budget": 1.0,
            "ratio": 1.0,
            "metric": task.metric(dense, task.test_data),
            "seconds": train_s,
            "note": f"trained from scratch, {task.train_steps} steps",
        }
    ]
    paths = {"dense": os.path.join(tmp, f"{task.name}_dense.onnx")}
    gblrc.lower(dense, task.example, paths["dense"])
    print(f"[{task.name}] dense: {task.metric.__name__} {rows[0]['metric']:.4f} ({train_s:.0f} s)", flush=True)
    for budget in a.budgets:
        for method in a.methods:
            res, why = compress_variant(task, dense, method, budget, a)
            if res is None:
                rows.append(
                    {
                        "model": task.name,
                        "method": method,
                        "budget": budget,
                        "ratio": float("nan"),
                        "metric": float("nan"),
                        "seconds": float("nan"),
                        "time_ratio": float("nan"),
                        "note": why,
                    }
                )
                print(f"[{task.name}] {method} @ {budget}: {why}", flush=True)
                continue
            key = f"{method}@{budget}"
            paths[key] = os.path.join(tmp, f"{task.name}_{method}_{budget}.onnx")
            lrep = gblrc.lower(res["model"], task.example, paths[key])
            assert not any(k.startswith("gblrc.") for k in lrep.ops_after), lrep.ops_after
            row = {
                "model": task.name,
                "method": method,
                "budget": budget,
                "ratio": res["ratio"],
                "metric": task.metric(res["model"], task.test_data),
                "seconds": res["seconds"],
                "note": res["note"],
                "key": key,
                "parity": lrep.max_rel_err,
            }
            rows.append(row)
            print(
                f"[{task.name}] {method} @ {budget}: ratio {row['ratio']:.3f}, {task.metric.__name__} "
                f"{row['metric']:.4f} ({row['seconds']:.0f} s; parity {lrep.max_rel_err:.1e})",
                flush=True,
            )
    med = time_sessions(paths, task.latency_feeds, a.threads, a.repeats)
    for r in rows:
        r["time_ratio"] = (
            med[r["key"]] / med["dense"] if "key" in r else (1.0 if r["method"] == "dense" else float("nan"))
        )
        if r["method"] == "dense":
            r["dense_ms"] = med["dense"] * 1e3
    return rows


def fmt_table(rows, tasks) -> str:
    out = [
        "| model | method | budget | achieved ratio | metric | ONNX time / dense | fine-tune s | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = tasks[r["model"]]
        name = "accuracy" if t.higher_better else "perplexity"
        metric = "n/a" if math.isnan(r["metric"]) else f"{name} {r['metric']:.4f}"
        budget = "—" if r["method"] == "dense" else f"{r['budget']:g}"
        ratio = "n/a" if math.isnan(r["ratio"]) else f"{r['ratio']:.3f}"
        tr = "n/a" if math.isnan(r.get("time_ratio", float("nan"))) else f"{r['time_ratio']:.2f}"
        if r["method"] == "dense":
            tr += f" ({r['dense_ms']:.1f} ms)"
        secs = "n/a" if math.isnan(r["seconds"]) else f"{r['seconds']:.0f}"
        out.append(
            f"| {r['model']} | {LABEL[r['method']]} | {budget} | {ratio} | {metric} | {tr} | {secs} | {r['note']} |"
        )
    return "\n".join(out)


def plot(rows, tasks, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(tasks)
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7.5), squeeze=False)
    style = {"gblr": ("tab:red", "o"), "lowrank": ("tab:blue", "s"), "monarch": ("tab:green", "^")}
    for j, n in enumerate(names):
        rs = [r for r in rows if r["model"] == n]
        dense = next(r for r in rs if r["method"] == "dense")
        for i, (key, ylab) in enumerate(
            (
                ("metric", "held-out accuracy" if tasks[n].higher_better else "held-out perplexity (per byte)"),
                ("time_ratio", "ONNX time / dense"),
            )
        ):
            ax = axes[i][j]
            ax.axhline(dense[key], color="k", ls="--", lw=1, label="dense")
            for m, (c, mk) in style.items():
                pts = sorted((r["ratio"], r[key]) for r in rs if r["method"] == m and not math.isnan(r["ratio"]))
                if pts:
                    ax.plot(*zip(*pts), color=c, marker=mk, label=LABEL[m])
            ax.set_xlabel("achieved cost ratio (compressed layers)")
            ax.set_ylabel(ylab)
            ax.set_title(n if i == 0 else f"{n}: lowered ONNX latency")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _option(text: str):
    """A --gblr-options value: int, float, true/false or the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit,mixer,cnn,gpt2", help="comma-separated subset of vit,mixer,cnn,gpt2")
    ap.add_argument("--budgets", default="0.15,0.3,0.5")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--steps", type=int, default=None, help="fine-tuning steps per compressed variant (default 300; --quick 20)"
    )
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (all methods)")
    ap.add_argument(
        "--allocate",
        default="uniform",
        choices=["auto", "sensitivity", "uniform"],
        help="budget split across layers for GBLR and low rank (the published table: uniform)",
    )
    ap.add_argument(
        "--gblr-options",
        default="",
        metavar="K=V,...",
        help="extra gblrc.compress arguments for the GBLR method, e.g. lr_struct=0.001,init_factor=1.2",
    )
    ap.add_argument("--repeats", type=int, default=None, help="interleaved latency runs (default 21; --quick 5)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime intra-op threads (latency)")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads for training (1: these small models gain nothing from more on a shared CPU)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke run")
    ap.add_argument("--plot", metavar="PNG", help="write the plot here")
    a = ap.parse_args(argv)
    print(provenance(getattr(a, "threads", None)), flush=True)  # results files name the commit, libraries and cores
    a.budgets = [float(b) for b in a.budgets.split(",") if b.strip()]
    a.gblr_options = {
        k.strip(): _option(v) for k, _, v in (o.partition("=") for o in a.gblr_options.split(",") if o.strip())
    }
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    a.steps = a.steps if a.steps is not None else (20 if a.quick else 300)
    a.repeats = a.repeats if a.repeats is not None else (5 if a.quick else 21)
    torch.set_num_threads(a.torch_threads)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if "cnn" in models and not conv_supported():
        print(
            "note: gblrc does not compress nn.Conv2d in this checkout (no gblrc.nn.conv / replace.is_conv2d): "
            "the CNN is skipped"
        )
        models.remove("cnn")
    size = 8 if a.quick else 16
    builders = {
        "vit": lambda: image_task("vit", a.quick, size),
        "mixer": lambda: image_task("mixer", a.quick, size),
        "cnn": lambda: image_task("cnn", a.quick, 8),
        "gpt2": lambda: gpt2_task(a.quick),
    }
    unknown = [m for m in models if m not in builders]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}")
    t_all = time.perf_counter()
    tasks, rows = OrderedDict(), []
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            tasks[m] = builders[m]()
            rows += run_task(tasks[m], a, tmp)
    import onnxruntime as ort

    print()
    print(
        f"families benchmark{' (--quick)' if a.quick else ''}: fine-tuning {a.steps} steps, lr {a.lr:g}, "
        f"budgets {a.budgets}; torch {torch.__version__} ({a.torch_threads} thread(s) for training), "
        f"ONNX Runtime {ort.__version__} CPU, {a.threads} threads, "
        f"median of {a.repeats} interleaved runs (images: 256 per run; GPT-2: "
        f"{'x'.join(map(str, tasks['gpt2'].latency_feeds['input_ids'].shape)) if 'gpt2' in tasks else '-'} tokens); "
        f"total {time.perf_counter() - t_all:.0f} s"
    )
    print(fmt_table(rows, tasks))
    if a.plot:
        plot(rows, tasks, a.plot)
        print(f"plot: {display_path(a.plot)}")
    return rows


if __name__ == "__main__":
    main()
