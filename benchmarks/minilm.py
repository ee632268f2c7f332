"""MiniLM against dense, in one command: compress, judge and time every deployable form (issues 21, 22, 27).

Run from the repository root; ``--help`` on each subcommand says what it measures::

    .venv/bin/python -m benchmarks.minilm front --threads 2         # the speed/fidelity front: hours (cached per model)
    .venv/bin/python -m benchmarks.minilm front --budgets 0.5 --structures lowrank --recipes steps0 --quick-init \\
        --eval-n 20 --heldout 32 --general 2000 --sessions 1 --repeats 2 --threads 1 --no-consumer \\
        --cache /tmp/front_smoke --out /tmp/front_smoke/front    # smoke run (~1 min)
    .venv/bin/python -m benchmarks.minilm compress --variants lowrank,gblr --steps 300 --save out/minilm
    .venv/bin/python -m benchmarks.minilm speed out/minilm/*.gblr.pt --threads 2 --lowered fp32,int8,fp16 --layers
    .venv/bin/python -m benchmarks.minilm refine-recipe --structure lowrank --variants batches=16:steps=128
    .venv/bin/python -m benchmarks.minilm hf-folder out/minilm/lowrank.gblr.pt

- ``front``: budgets x structures x recipes, each model made by one ``gblrc.compress`` run (cached), lowered
  fp32 and + int8 beside dense fp32 and dense int8; all judged and timed in one run; a table, JSON and the
  plot of time against other-genre fidelity with its Pareto front.
- ``compress``: variants (``STRUCTURE[:key=value...]``) compressed and judged in PyTorch; saved for ``speed``.
- ``speed``: saved models in the deployable forms asked for (fp32, int8 dynamic / static, fp16, the SDPA
  export, ``--optimize``) beside dense in its forms, judged and timed in one run, the same way as ``front``;
  ``--layers`` adds each layer's time against its dense MatMul.
- ``refine-recipe``: block-refinement variants on one cached ``--steps 0`` initialisation.
- ``hf-folder``: the ``gblrc lower --hf-folder`` output's embeddings against the model's own.

What they share is benchmarks/minilm_kit.py: the training text is what ``gblrc compress --data stdlib-a.txt``
trains on (stdlib-a docstrings mixed half and half with --general built-in package sentences, in the CLI's
TextBatches); fidelity is the mean (min) cosine of mean-pooled embeddings to the dense PyTorch model
(gblrc.learn.fidelity.Fidelity; ONNX graphs run by ONNX Runtime) on held-out stdlib-a ("in domain") and on
other sources (readme, sklearn, changelog: the "other genres"; pydoc, stdlib-b); the consumer judge: frozen
classifiers fitted on the dense model's embeddings of labelled sentences (which stdlib module's docstrings;
which installed distribution's README), scored on held-out ones through each model (accuracy, agreement
with dense); time: every graph in one process, runs interleaved, medians of --repeats, best of --sessions
fresh sessions, --batch x --seq tokens, ratios to the fastest dense fp32 export of the same run.

One real ``--steps 0`` compression of MiniLM takes 3-4 min at 2 threads, its refinement 4-5 more, 300 steps
of distillation ~9 more (benchmarks/results/front_minilm.txt, column "compress s"); --quick-init (plain SVD,
no data) replaces it in smoke runs only.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from dataclasses import dataclass, fields
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import click

from benchmarks import minilm_kit as K
from benchmarks.common import display_path, provenance

RECIPES = ("steps0", "refine", "distill", "distill-norefine")
DISTILL = dict(steps=300, lr=1e-3, batch_size=32)  # the "distill" recipes' loop: `gblrc compress --steps 300`
TARGET = 0.95  # the other-genre fidelity the verdict asks for
PARITY_MAX_REL = 1e-4  # lowered fp32 vs the PyTorch compressed model (lower's own fp32 gate)
DENSE_FORMS = {  # key -> precision label ("dense " + label names the row)
    "fp32": "fp32",
    "sdpa": "fp32 SDPA export",
    "eager": "fp32 eager export",
    "int8": "int8 per-tensor",
    "int8c": "int8 per-channel",
    "int8s": "int8 static QDQ",
    "fp16": "fp16",
}
LOWERED_FORMS = {  # key -> (label, gblrc.lower options); int8 = the fp32 graph quantised as `lower --quantize int8`
    "fp32": ("fp32", {}),
    "int8": ("int8", None),
    "int8s": ("int8 static QDQ", dict(quantize="int8", quant_mode="static")),
    "fp16": ("fp16", dict(precision="fp16")),
    "sdpa": ("fp32 SDPA export", dict(attention="sdpa")),
    "opt": ("--optimize fp32", dict(optimize=True)),
    "opt8": ("--optimize int8", dict(optimize=True, quantize="int8")),
}

# ------------------------------------------------------------------------------------------ options


def _names(choices=None):
    def split(ctx, param, value):
        got = [x for x in str(value).split(",") if x]
        bad = [x for x in got if choices is not None and x not in choices]
        if bad:
            raise click.BadParameter(f"{', '.join(bad)}: choose from {', '.join(choices)}")
        return got

    return split


def _floats(ctx, param, value):
    try:
        return [float(x) for x in str(value).split(",") if x]
    except ValueError:
        raise click.BadParameter(f"{value!r}: comma-separated numbers") from None


def _apply(f, opts):
    for o in reversed(opts):
        f = o(f)
    return f


def text_options(f):
    return _apply(
        f,
        [
            click.option("--train", default="stdlib-a", show_default=True, help=f"training source ({K.SOURCES})"),
            click.option("--train-n", default=0, help="at most N training sentences before the mix (0: all)"),
            click.option("--heldout", default=256, show_default=True, help="held-out training sentences: in domain"),
            click.option(
                "--general",
                default=K.GENERAL_TEXT,
                show_default=True,
                help="built-in package sentences mixed into the training text (the CLI's default; 0: none)",
            ),
            click.option("--general-share", default=0.5, show_default=True, help="the training source's share"),
            click.option(
                "--eval",
                "evals",
                default="readme,sklearn,changelog,pydoc,stdlib-b",
                show_default=True,
                callback=_names(),
                help="judge sets beside in domain",
            ),
            click.option("--eval-n", default=300, show_default=True, help="sentences per judge set"),
            click.option("--consumer/--no-consumer", default=True, show_default=True, help="the consumer judge"),
            click.option("--consumer-per-class", default=30, show_default=True, help="sentences per class"),
            click.option("--consumer-test", default=10, show_default=True, help="of them held out for scoring"),
            click.option("--dense-model", metavar="DIR", help="a Hugging Face folder instead of MiniLM (tests)"),
            click.option("--threads", default=2, show_default=True, help="torch and ONNX Runtime threads"),
        ],
    )


def timing_options(f):
    return _apply(
        f,
        [
            click.option("--sessions", default=3, show_default=True, help="fresh sessions (the best counts)"),
            click.option("--repeats", default=15, show_default=True, help="interleaved runs per session"),
            click.option("--batch", default=8, show_default=True, help="timing inputs: --batch x --seq tokens"),
            click.option("--seq", default=128, show_default=True),
            click.option("--calib-batches", default=8, show_default=True, help="static int8 calibration batches"),
        ],
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 118})
def cli():
    """MiniLM against dense: compress, judge and time every deployable form (benchmarks/minilm.py)."""


# ------------------------------------------------------------------------------------------ set-up


@dataclass
class Setup:
    dense: object
    tok: object
    lines: list
    train_b: object
    sets: dict
    judges: dict
    consumers: dict
    ex: dict
    feeds: dict
    cal: list
    log: list  # what the set-up measured (judge sets, consumers): the results file's head


def setup(a) -> Setup:
    """The dense model, the training text and batches, the judges (cosine per set; consumers) and the
    example / timing inputs, from the options ``a``."""
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dense, tok = K.load_dense(a.dense_model)
    held, lines = K.training_text(a.train, a.heldout, a.general, a.general_share, a.train_n)
    sets = K.judge_sets(tok, held, lines, a.evals, a.eval_n)
    consumers = {}
    if a.consumer:
        dense_embed = K.embedder(dense, tok)
        for kind in K.CONSUMERS:
            consumers[kind] = K.consumer_judge(dense_embed, kind, per_class=a.consumer_per_class, test=a.consumer_test)
    ex = K.example_inputs(tok, lines, getattr(a, "batch", 8), getattr(a, "seq", 128))
    cal = [K.numpy_feeds(b) for b in K.batches(tok, lines[: 32 * getattr(a, "calib_batches", 8)], 32)]
    s = Setup(
        dense=dense,
        tok=tok,
        lines=lines,
        train_b=K.training_batches(tok, dense, lines, getattr(a, "batch_size", 32)),
        sets=sets,
        judges=K.cosine_judges(dense, sets),
        consumers=consumers,
        ex=ex,
        feeds=K.numpy_feeds(ex),
        cal=cal,
        log=[
            "judge sets (sentences): "
            + ", ".join(f"{k} {sum(len(b['input_ids']) for b in v)}" for k, v in sets.items())
            + f"; training text: {len(lines)} sentences ({a.train} + {a.general} package sentences)"
        ],
    )
    s.log += [c.line() for c in consumers.values()]
    click.echo("\n".join(s.log))
    return s


# ------------------------------------------------------------------------------------- making models


def recipe_config(structure: str, budget: float, recipe: str, quick: bool = False):
    """The CompressConfig of one front point: what `gblrc compress --budget B --structure S --include
    '^encoder\\.'` gets with --steps 0 and refinement off (steps0), --steps 0 (refine: refinement is on by
    default), --steps 300 (distill) or --steps 300 with refinement off (distill-norefine)."""
    import gblrc

    common = dict(budget=budget, structure=structure, include=K.INCLUDE, progress=False)
    off = gblrc.TrainingConfig(refine_steps=0)
    cfg = {
        "steps0": lambda: gblrc.CompressConfig(steps=0, training=off, **common),
        "refine": lambda: gblrc.CompressConfig(steps=0, **common),
        "distill": lambda: gblrc.CompressConfig(**DISTILL, **common),
        "distill-norefine": lambda: gblrc.CompressConfig(training=off, **DISTILL, **common),
    }[recipe]()
    return cfg.replace(init="svd", allocate="uniform") if quick else cfg


def grid_model(s: Setup, cache: K.ModelCache, structure: str, budget: float, recipe: str, a, notes: list):
    """(model, facts, name) of one front point: from the cache when it holds the model made with this config
    and data, else one timed ``gblrc.compress`` run (saved there); None with --cached-only and no such model."""
    quick = getattr(a, "quick_init", False)
    name = f"{structure}_{budget:g}_{recipe}" + ("_quick" if quick else "")
    cfg = recipe_config(structure, budget, recipe, quick)
    want = {"config": K.config_facts(cfg), "data": None if quick else K.data_facts(a)}
    got = cache.get(name, want)
    if got is not None:
        return (*got, name)
    if getattr(a, "cached_only", False):
        why = cache.stale(name, want) or "not in the cache"
        notes.append(f"{name}: {why}, left out (--cached-only)")
        return None
    click.echo(f"compressing {name} ...")
    cm, facts = K.compress_timed(s.dense, cfg, None if quick else s.train_b)
    facts.update(want)
    cache.put(name, cm, facts, s.ex)
    return cm, {**facts, "cached": False}, name


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


def parse_kv(text: str) -> dict:
    """``key=value:key=value`` (a bare key: True) as keyword options, values parsed."""
    kw = {}
    for o in filter(None, text.split(":")):
        k, _, v = o.partition("=")
        kw[k.replace("-", "_")] = _value(v) if v else True
    return kw


def variant_config(text: str, a):
    """The CompressConfig of ``STRUCTURE[:key=value...]`` (keys: CompressConfig or TrainingConfig fields)."""
    import gblrc

    structure, _, rest = text.partition(":")
    kw = parse_kv(rest)
    top = {f.name for f in fields(gblrc.CompressConfig)}
    inner = {f.name for f in fields(gblrc.TrainingConfig)}
    bad = sorted(set(kw) - top - inner)
    if bad:
        raise click.UsageError(
            f"variant {text!r}: unknown setting(s) {', '.join(bad)} (CompressConfig or TrainingConfig)"
        )
    base = dict(budget=a.budget, steps=a.steps, lr=a.lr, batch_size=a.batch_size, include=K.INCLUDE, progress=False)
    training = gblrc.TrainingConfig(**{k: v for k, v in kw.items() if k in inner})
    return gblrc.CompressConfig(
        structure=structure, training=training, **{**base, **{k: v for k, v in kw.items() if k in top}}
    )


# --------------------------------------------------------------------------------- deployable forms


def parity(cm, onnx_path, batch) -> float:
    """Max relative error of the lowered graph's last hidden state vs the PyTorch model's (padding skipped)."""
    import torch

    from gblrc.export.precision import fidelity as output_agreement
    from gblrc.runtime import make_session

    feeds = K.numpy_feeds(batch)
    (h,) = make_session(str(onnx_path), log=False, threads=1).run(None, feeds)
    with torch.no_grad():
        ref = cm(**batch).last_hidden_state.numpy()
    return output_agreement([[h]], [[ref]], masks=[feeds["attention_mask"]]).max_rel


def dense_rows(s: Setup, P, a, notes: list) -> list[dict]:
    """Dense fp32 (its fastest export: the baseline, key "dense") and the dense forms in ``a.dense_forms``."""
    import onnx

    from gblrc.export.precision import quantize_checked, quantize_int8, to_fp16

    timing = dict(threads=a.threads, repeats=a.repeats, sessions=a.sessions)
    choice = K.export_dense(s.dense, s.ex, P("dense"), s.feeds, **timing)
    notes.append(f"dense baseline: {choice.line()}")
    d32 = onnx.load(P("dense"))
    rows = [dict(key="dense", name="dense fp32", family="dense", precision="fp32")]
    for f in a.dense_forms:
        key = f"dense_{f}"
        if f == "fp32":
            continue
        if f in ("sdpa", "eager"):
            K.export_dense(s.dense, s.ex, P(key), s.feeds, form=f)
        elif f in ("int8", "int8c"):
            onnx.save(quantize_int8(d32, mode="dynamic", per_channel=f == "int8c"), P(key))
        elif f == "int8s":
            q, pc, _, _ = quantize_checked(d32, [s.feeds] + s.cal, mode="static", calibration=s.cal)
            onnx.save(q, P(key))
            notes.append(f"dense int8 static: per-channel {'on' if pc else 'off'} (chosen by fidelity)")
        elif f == "fp16":
            onnx.save(to_fp16(d32), P(key))
        rows.append(dict(key=key, name=f"dense {DENSE_FORMS[f]}", family="dense", precision=DENSE_FORMS[f]))
    return rows


def lowered_rows(s: Setup, cm, key: str, name: str, base: dict, P, a, notes: list) -> list[dict]:
    """The model lowered by `gblrc lower` (fp32, parity-checked against PyTorch on a judge batch) and in the
    other forms of ``a.lowered``: one row each."""
    import gblrc
    import onnx

    from gblrc.export.precision import quantize_checked

    r = gblrc.lower(cm, s.ex, P(key), attention_threads=a.threads)
    err = parity(cm, P(key), s.sets["in domain"][0])
    line = f"{name}: lowered: {r.attention.line()}; {r.parity_line()}; on a judge batch, max rel error {err:.2e}"
    if err > PARITY_MAX_REL:
        raise click.ClickException(f"{name}: lowered fp32 differs from PyTorch by {err:.2e} (rel)")
    rows = []
    for f in a.lowered:
        label, kw = LOWERED_FORMS[f]
        k, extra = (key if f == "fp32" else f"{key}_{f}"), {}
        if f == "int8":
            q, pc, _, _ = quantize_checked(onnx.load(P(key)), [s.feeds])
            onnx.save(q, P(k))
            extra["per_channel"] = pc
        elif f != "fp32":
            calib = s.cal if kw.get("quant_mode") == "static" else None
            rr = gblrc.lower(cm, s.ex, P(k), attention_threads=a.threads, calib_feeds=calib, **kw)
            if rr.quantization:
                extra["per_channel"] = rr.quantization.get("per_channel")
            if rr.fusion is not None:
                notes += [f"{name} {f}: {x}" for x in rr.fusion.lines()]
        if "per_channel" in extra:
            line += f"; {f} per-channel {'on' if extra['per_channel'] else 'off'}"
        rows.append(dict(key=k, name=f"{name} {label}", precision=label, **base, **extra))
    notes.append(line)
    click.echo(line)
    return rows


def measure(rows: list[dict], s: Setup, P, a) -> dict:
    """Judge every row's graph (cosine per set, other-genre mean, consumers) and time them all in one
    interleaved run; sets each row's time (ratio to dense fp32), ms, pareto; returns the seconds."""
    click.echo(f"judging {len(rows)} ONNX graphs ...")
    for r in rows:
        enc = K.OnnxEncoder(P(r["key"]))
        r["fid"] = K.cosines(s.judges, enc)
        r["other"] = K.other_mean(r["fid"])
        if s.consumers:
            emb = K.embedder(enc, s.tok)
            r["consumer"] = {k: j.score(emb) for k, j in s.consumers.items()}
    click.echo(f"timing {len(rows)} sessions interleaved ...")
    t = K.time_graphs(
        {r["key"]: P(r["key"]) for r in rows}, s.feeds, threads=a.threads, repeats=a.repeats, sessions=a.sessions
    )
    for r in rows:
        r["time"], r["ms"] = round(t[r["key"]] / t["dense"], 4), round(t[r["key"]] * 1e3, 2)
        r["pareto"] = False
    for r in pareto(rows):
        r["pareto"] = True
    return t


# ------------------------------------------------------------------------------------------ report


def pareto(rows, x: str = "time", y: str = "other") -> list[dict]:
    """The rows no other row beats on both (lower ``x`` and higher ``y``), sorted by ``x``; rows lacking either
    value are left out."""
    pts = [r for r in rows if r.get(x) is not None and r.get(y) is not None]

    def beaten(r):
        return any(o[x] <= r[x] and o[y] >= r[y] and (o[x] < r[x] or o[y] > r[y]) for o in pts)

    return sorted((r for r in pts if not beaten(r)), key=lambda r: (r[x], -r[y]))


def verdict(rows) -> str:
    """The fastest gblrc point with other-genre fidelity >= TARGET, or the closest one."""
    pts = [r for r in rows if r["family"] != "dense" and r.get("other") is not None and r.get("time") is not None]
    ok = [r for r in pts if r["other"] >= TARGET]
    head = f"fastest gblrc point with other-genre fidelity >= {TARGET:g}: "
    if ok:
        r = min(ok, key=lambda r: r["time"])
        return head + f"{r['name']} (time {r['time']:.3f} x dense fp32, other genres {r['other']:.4f})"
    if not pts:
        return head + "none (no gblrc point)"
    r = max(pts, key=lambda r: r["other"])
    return head + f"none; closest: {r['name']} (other genres {r['other']:.4f}, time {r['time']:.3f} x dense fp32)"


def _cell(fid, k) -> str:
    return f"{fid[k][0]:.4f} ({fid[k][1]:.3f})" if k in fid else "–"


def table(rows, set_names, consumers=()) -> list[str]:
    """The markdown table: one row per graph, consumer accuracy (agreement with dense) beside the cosines,
    the Pareto-optimal rows marked."""
    front = {id(r) for r in pareto(rows)}
    others = [k for k in set_names if k != "in domain"]
    head = ["point", "time / dense fp32", "in domain mean (min)", "other genres", *others]
    head += [f"consumer {c} acc (agree)" for c in consumers] + ["compress s", "model from", "front"]
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        secs = "–" if r.get("compress_s") is None else f"{r['compress_s']:.0f}"
        made = "–" if r["family"] == "dense" else ("cache" if r.get("cached") else "made here")
        cells = [r["name"], f"{r['time']:.3f}", _cell(r["fid"], "in domain")]
        cells += ["–" if r.get("other") is None else f"{r['other']:.4f}"] + [_cell(r["fid"], k) for k in others]
        for c in consumers:
            v = r.get("consumer", {}).get(c)
            cells.append("–" if v is None else f"{v['accuracy']:.3f} ({v['agreement']:.3f})")
        out.append("| " + " | ".join(cells + [secs, made, "*" if id(r) in front else ""]) + " |")
    return out


DENSE_MARKERS = {"fp32": "*", "int8 per-tensor": "v", "int8 per-channel": "^"}
STRUCTURE_MARKERS = {"lowrank": "o", "gblr": "D"}
RECIPE_COLORS = {"steps0": "tab:blue", "refine": "tab:orange", "distill": "tab:green", "distill-norefine": "tab:olive"}


def _style(r: dict) -> dict:
    """Marker, colours and fill of one row: dense in black by precision; gblrc by structure (marker),
    recipe (colour), fp32 filled / the other forms hollow."""
    if r["family"] == "dense":
        m, c = DENSE_MARKERS.get(r["precision"], "s"), "black"
    else:
        m, c = STRUCTURE_MARKERS.get(r["family"], "s"), RECIPE_COLORS.get(r.get("recipe"), "gray")
    hollow = r["precision"] != "fp32"
    return dict(marker=m, edgecolors=c, facecolors="none" if hollow else c, s=110 if m == "*" else 45, linewidths=1.3)


def _legend_handles():
    from matplotlib.lines import Line2D

    def h(label, marker="o", color="gray", fill=True):
        fc = color if fill else "none"
        return Line2D([], [], ls="", marker=marker, color=color, markerfacecolor=fc, label=label, markersize=7)

    out = [h(f"dense {p}", m, "black", p == "fp32") for p, m in DENSE_MARKERS.items()]
    out += [h(s, m) for s, m in STRUCTURE_MARKERS.items()]
    out += [h(f"recipe {k}", "s", c) for k, c in RECIPE_COLORS.items()]
    out += [h("gblrc fp32 (filled)"), h("gblrc + int8 (hollow)", fill=False)]
    out.append(Line2D([], [], color="dimgray", lw=1.2, label="Pareto front (ringed)"))
    return out


def plot_front(rows, path, title: str | None = None) -> None:
    """Time ratio (x, lower is better) vs other-genre fidelity (y) of ``rows`` (dicts with name, family,
    precision, time, other; gblrc rows recipe and budget too), the Pareto front as a step line, written to
    ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("time") is not None and r.get("other") is not None]
    front = pareto(pts)
    on_front = {id(r) for r in front}
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for r in pts:
        ax.scatter([r["time"]], [r["other"]], zorder=3, **_style(r))
        label = r["name"] if id(r) in on_front else (f"{r['budget']:g}" if r.get("budget") is not None else "")
        ax.annotate(label, (r["time"], r["other"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if front:
        xs, ys = [r["time"] for r in front], [r["other"] for r in front]
        ax.step(xs, ys, where="post", color="dimgray", lw=1.2, zorder=2)
        ax.scatter(xs, ys, s=170, facecolors="none", edgecolors="dimgray", lw=0.8, zorder=2)
    ax.axhline(TARGET, color="tab:red", ls="--", lw=1)
    ax.text(ax.get_xlim()[1], TARGET, f"{TARGET:g} ", color="tab:red", ha="right", va="bottom", fontsize=8)
    ax.legend(handles=_legend_handles(), fontsize=7, loc="lower right", ncol=2)
    ax.set_xlabel("time / dense fp32 (ONNX Runtime CPU; lower is better)")
    ax.set_ylabel("other-genre fidelity (mean cosine to dense: " + ", ".join(K.GENRES) + ")")
    ax.set_title(title or "MiniLM: speed vs fidelity of every deployable form")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def report(a, s: Setup, rows, notes, t, t_start, out=None, plot=True) -> None:
    """Print the table, notes and verdict; with ``out`` also write OUT.txt, OUT.json (and OUT.png)."""
    head = [
        f"ONNX Runtime CPU, {a.threads} threads, {a.batch}x{a.seq} tokens, medians of {a.repeats} interleaved "
        f"runs, best of {a.sessions} fresh sessions; dense fp32 {t['dense'] * 1e3:.1f} ms; "
        f"{time.perf_counter() - t_start:.0f} s in all"
    ]
    body = head + [""] + table(rows, list(s.sets), list(s.consumers)) + [""] + notes + ["", verdict(rows)]
    click.echo("\n".join(body))
    if not out:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prov = provenance(a.threads)
    Path(f"{out}.txt").write_text("\n".join([prov, *s.log, *body]) + "\n")
    settings = {k: v for k, v in vars(a).items() if k not in ("cache", "out", "models")}
    settings.update(distill=DISTILL)
    if getattr(a, "cache", None):
        settings["cache"] = display_path(a.cache)
    payload = dict(
        provenance=prov,
        settings=settings,
        judge_sets={k: sum(len(b["input_ids"]) for b in v) for k, v in s.sets.items()},
        consumers={
            k: dict(classes=len(c.data.classes), test=len(c.data.test), dense=c.dense) for k, c in s.consumers.items()
        },
        rows=rows,
        verdict=body[-1],
    )
    Path(f"{out}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    if plot:
        plot_front(rows, f"{out}.png")
    click.echo(f"wrote {display_path(f'{out}.txt')}, .json" + (", .png" if plot else ""))


# ------------------------------------------------------------------------------------- subcommands


@cli.command()
@click.option("--budgets", default="0.3,0.4,0.5,0.6,0.7,0.8", show_default=True, callback=_floats)
@click.option("--structures", default="lowrank,gblr", show_default=True, callback=_names(("lowrank", "gblr")))
@click.option("--recipes", default=",".join(RECIPES), show_default=True, callback=_names(RECIPES))
@click.option("--cache", default=".cache/front", show_default=True, help="folder of the compressed models")
@click.option("--out", default="benchmarks/results/front_minilm", show_default=True, help="OUT.txt, .json, .png")
@click.option("--quick-init", is_flag=True, help="smoke runs only (--recipes steps0): plain SVD, no data, seconds")
@click.option("--compress-only", is_flag=True, help="only fill the cache; no lowering, judging or timing")
@click.option("--cached-only", is_flag=True, help="only the grid points in the cache (the others listed as left out)")
@text_options
@timing_options
def front(**kw):
    """The speed/fidelity front: every grid point lowered fp32 and + int8 beside dense fp32 and dense int8
    (per-tensor, per-channel), all judged and timed in one run.

    Each grid point is one ``gblrc.compress`` run with the config a CLI user gets (recipe_config: steps0 =
    --steps 0 without refinement, refine = --steps 0, distill = --steps 300, distill-norefine = --steps 300
    without refinement), on the CLI's TextBatches of the training text, timed as a whole and cached in
    --cache with its config, data and seconds (a cached model made otherwise is made again)."""
    a = SimpleNamespace(**kw, dense_forms=["fp32", "int8", "int8c"], lowered=["fp32", "int8"])
    if a.quick_init and a.recipes != ["steps0"]:
        raise click.UsageError("--quick-init is for smoke runs of --recipes steps0 only")
    t_start = time.perf_counter()
    click.echo(provenance(a.threads))
    s = setup(a)
    cache, notes, rows = K.ModelCache(a.cache), [], []
    with tempfile.TemporaryDirectory() as tmp:
        P = lambda k: os.path.join(tmp, f"{k}.onnx")  # noqa: E731
        if not a.compress_only:
            rows = dense_rows(s, P, a, notes)
        for recipe in a.recipes:
            for structure in a.structures:
                for b in a.budgets:
                    got = grid_model(s, cache, structure, b, recipe, a, notes)
                    if got is None or a.compress_only:
                        continue
                    cm, info, key = got
                    name = f"{structure} {b:g} {recipe}" + (" quick-init" if a.quick_init else "")
                    base = dict(family=structure, recipe=recipe, budget=b, compress_s=info["compress_s"])
                    base.update(cached=info["cached"], achieved_ratio=info.get("achieved_ratio"))
                    rows += lowered_rows(s, cm, key, name, base, P, a, notes)
                    notes[-1] += (
                        f" ({'from the cache' if info['cached'] else 'compressed here'}, {info['compress_s']:.0f} s)"
                    )
        if a.compress_only:
            click.echo("\n".join(notes + [f"cache filled: {display_path(a.cache)}"]))
            return
        t = measure(rows, s, P, a)
    report(a, s, rows, notes, t, t_start, a.out)


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--dense",
    "dense_forms",
    default="fp32,int8,int8c",
    show_default=True,
    callback=_names(DENSE_FORMS),
    help=f"dense forms ({', '.join(DENSE_FORMS)}); fp32, the fastest export, is always there",
)
@click.option(
    "--lowered",
    default="fp32,int8",
    show_default=True,
    callback=_names(LOWERED_FORMS),
    help=f"forms of each model ({', '.join(LOWERED_FORMS)})",
)
@click.option("--layers", is_flag=True, help="also each layer lowered against its dense MatMul (FLOP, estimate, time)")
@click.option("--out", help="also write OUT.txt, OUT.json, OUT.png")
@text_options
@timing_options
def speed(models, **kw):
    """Saved compressed MiniLMs (.gblr.pt) in the --lowered forms beside dense in the --dense forms: judged and
    timed in one run, as ``front`` does (deploying: fp16, int8 dynamic and static; the export form: SDPA
    against eager, --optimize)."""
    import gblrc

    a = SimpleNamespace(models=list(models), **kw)
    t_start = time.perf_counter()
    click.echo(provenance(a.threads))
    s = setup(a)
    notes, layer_lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        P = lambda k: os.path.join(tmp, f"{k}.onnx")  # noqa: E731
        rows = dense_rows(s, P, a, notes)
        for i, path in enumerate(a.models):
            cm = gblrc.load(path).eval()
            info_path = Path(str(path)[: -len(".gblr.pt")] + ".json") if str(path).endswith(".gblr.pt") else None
            info = json.loads(info_path.read_text()) if info_path and info_path.is_file() else {}
            structure = (info.get("config") or {}).get("structure", "gblrc")
            base = dict(family=structure, compress_s=info.get("compress_s"), cached=True)
            rows += lowered_rows(s, cm, f"m{i}", Path(path).name, base, P, a, notes)
            if a.layers:
                layer_lines += [f"{Path(path).name}:"] + layer_table(cm, a)
        t = measure(rows, s, P, a)
    report(a, s, rows, notes + layer_lines, t, t_start, a.out)


def layer_models(w, tokens):
    """(dense ONNX, lowered ONNX) of one layer: X (tokens x in) -> Y."""
    import numpy as np
    import onnx
    import onnx_graphsurgeon as gs

    from gblrc.ir.structure import ONNX_DOMAIN, ONNX_OP
    from gblrc.passes import run_pipeline
    from gblrc.passes.build import write_gblr_node

    s = w.structure
    x = lambda: gs.Variable("X", dtype=np.float32, shape=(tokens, s.in_features))  # noqa: E731
    y = lambda: gs.Variable("Y", dtype=np.float32, shape=(tokens, s.out_features))  # noqa: E731
    xi, yi = x(), y()
    node = gs.Node(ONNX_OP, "layer", inputs=[xi], outputs=[yi], domain=ONNX_DOMAIN)
    g = gs.Graph(nodes=[node], inputs=[xi], outputs=[yi], opset=17)
    write_gblr_node(g, node, w)
    lowered = gs.export_onnx(g)
    lowered.opset_import.append(onnx.helper.make_opsetid(ONNX_DOMAIN, 1))
    lowered, _ = run_pipeline(lowered)
    xd, yd = x(), y()
    W = gs.Constant("W", np.ascontiguousarray(w.dense().T, dtype=np.float32))
    mid = gs.Variable("XW", dtype=np.float32)
    nodes = [gs.Node("MatMul", inputs=[xd, W], outputs=[mid if w.bias is not None else yd])]
    if w.bias is not None:
        nodes.append(gs.Node("Add", inputs=[mid, gs.Constant("b", np.asarray(w.bias, np.float32))], outputs=[yd]))
    dense = gs.export_onnx(gs.Graph(nodes=nodes, inputs=[xd], outputs=[yd], opset=17))
    return dense, lowered


def layer_table(cm, a) -> list[str]:
    """Every GBLR layer lowered by the default pipeline against its dense MatMul (+ bias) on --batch x --seq
    token rows: FLOP ratio, the cost model's estimate and lowering, the measured time ratio, and whether it
    is within the lowering bar (time <= FLOP + 0.1 and <= 1.05 x dense)."""
    import numpy as np

    from gblrc.learn.budget import TimeCost
    from gblrc.nn.layer import GBLRLinear

    tokens, unit, x, out = a.batch * a.seq, TimeCost(), {}, []
    out.append(f"  {'layer':<42}{'FLOP':>7}{'est.':>7}{'lowering':>11}{'time':>7}{'time-FLOP':>11}  bar")
    gaps, held = [], 0
    layers = [(n, m) for n, m in cm.named_modules() if isinstance(m, GBLRLinear)]
    for name, m in layers:
        w = m.structure()
        n_in = w.structure.in_features
        x.setdefault(n_in, {"X": np.random.default_rng(0).standard_normal((tokens, n_in)).astype(np.float32)})
        dm, lm = layer_models(w, tokens)
        from gblrc.runtime.timing import best_of_sessions

        t = best_of_sessions(
            {"dense": dm, "gblr": lm}, x[n_in], threads=a.threads, repeats=a.repeats, sessions=a.sessions
        )
        r, f = t.ratio("gblr", "dense"), m.flops() / m.dense_flops()
        ok = r <= f + 0.1 and r <= 1.05
        held += ok
        gaps.append(r - f)
        est = unit.layer(m) / unit.dense(m)
        out.append(
            f"  {name:<42}{f:>7.3f}{est:>7.3f}{unit.strategy(m):>11}{r:>7.3f}{r - f:>+11.3f}  {'ok' if ok else 'OVER'}"
        )
    if layers:
        out.append(
            f"  lowering bar held on {held}/{len(layers)} layers; time - FLOP: max {max(gaps):+.3f}, "
            f"median {np.median(gaps):+.3f}"
        )
    return out


@cli.command()
@click.option(
    "--variants",
    default="lowrank,gblr",
    show_default=True,
    callback=_names(),
    help="comma-separated STRUCTURE[:key=value...]; keys: gblrc.CompressConfig or TrainingConfig fields "
    "(numbers, none, true/false parsed), e.g. gblr:allocate=uniform:refine_steps=0",
)
@click.option("--budget", default=0.4, show_default=True)
@click.option("--steps", default=300, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--save", metavar="DIR", help="save each model as DIR/<variant>.gblr.pt with its facts (for speed)")
@click.option("--json", "json_out", metavar="OUT", help="also write the rows as JSON")
@text_options
def compress(variants, json_out, **kw):
    """Compress MiniLM's 36 encoder Linear layers once per variant (one timed ``gblrc.compress`` run each, on
    the CLI's TextBatches of the training text) and judge each in PyTorch: cosine per judge set, consumers."""
    a = SimpleNamespace(**kw)
    click.echo(provenance(a.threads))
    s = setup(a)
    rows = []
    for text in variants:
        cfg = variant_config(text, a)
        cm, facts = K.compress_timed(s.dense, cfg, s.train_b)
        facts["data"] = K.data_facts(a)
        row = dict(variant=text, achieved=facts["achieved_ratio"], seconds=facts["compress_s"])
        row["fid"] = K.cosines(s.judges, cm)
        row["other"] = K.other_mean(row["fid"])
        if s.consumers:
            emb = K.embedder(cm, s.tok)
            row["consumer"] = {k: j.score(emb) for k, j in s.consumers.items()}
        rows.append(row)
        click.echo(
            f"  {text}: {row['seconds']:.0f} s, ratio {row['achieved']:.3f}, "
            + ", ".join(f"{k} {v[0]:.4f} (min {v[1]:.3f})" for k, v in row["fid"].items())
            + "".join(
                f", consumer {k} {v['accuracy']:.3f} ({v['agreement']:.3f})" for k, v in row.get("consumer", {}).items()
            )
        )
        if a.save:
            K.ModelCache(a.save).put(text.replace(":", "_").replace("=", ""), cm, facts, s.ex)
    keys = list(s.sets)
    click.echo("\n| variant | ratio | s | " + " | ".join(keys) + " | other genres |")
    click.echo("|---" * (len(keys) + 4) + "|")
    for r in rows:
        cells = [r["variant"], f"{r['achieved']:.3f}", f"{r['seconds']:.0f}"] + [_cell(r["fid"], k) for k in keys]
        click.echo("| " + " | ".join(cells + ["–" if r["other"] is None else f"{r['other']:.4f}"]) + " |")
    if json_out:
        Path(json_out).write_text(json.dumps({"settings": {**kw, "variants": variants}, "rows": rows}, indent=1) + "\n")


@cli.command("refine-recipe")
@click.option("--structure", default="lowrank", show_default=True, type=click.Choice(["lowrank", "gblr"]))
@click.option("--budget", default=0.4, show_default=True)
@click.option(
    "--variants",
    default="batches=16:steps=128",
    show_default=True,
    callback=_names(),
    help="comma-separated key=value:... over refine_blocks' settings: batches (of 32 sentences), steps (per "
    "block), lr, norms, target (dense | local), structure (true: GBLR widths and locations move too)",
)
@click.option("--cache", default=".cache/front", show_default=True, help="where the steps0 model is (made if not)")
@click.option("--init-from", type=click.Path(exists=True, dir_okay=False), help="start from this saved steps0 model")
@text_options
def refine_recipe(structure, budget, variants, init_from, **kw):
    """Block-refinement variants on one ``--steps 0`` initialisation without refinement (the front's steps0
    model, from --cache): each variant runs only gblrc.learn.refine.refine_blocks on a copy of it, so a recipe
    search costs the refinement only."""
    import gblrc
    from gblrc.learn.budget import cost_ratio, fit_to_budget
    from gblrc.learn.refine import refine_blocks
    from gblrc.learn.report import structure_movement
    from gblrc.nn.layer import GBLRLinear

    a = SimpleNamespace(**{**kw, "consumer": False})
    click.echo(provenance(a.threads))
    s = setup(a)
    if init_from:
        base = gblrc.load(init_from).eval()
        info_path = Path(init_from[: -len(".gblr.pt")] + ".json")
        init_s = json.loads(info_path.read_text())["compress_s"] if info_path.is_file() else float("nan")
    else:
        base, info, _ = grid_model(s, K.ModelCache(a.cache), structure, budget, "steps0", a, [])
        init_s = info["compress_s"]
    row0 = K.cosines(s.judges, base)
    click.echo(f"  init: {init_s:.0f} s  " + "  ".join(f"{k} {v[0]:.4f} ({v[1]:.2f})" for k, v in row0.items()))
    for text in variants:
        kw = parse_kv(text)
        nb = int(kw.pop("batches", 16))
        model = copy.deepcopy(base)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, GBLRLinear)}
        t0 = time.perf_counter()
        before = {n: m.hard_structure() for n, m in layers.items()}
        xs = list(islice(iter(s.train_b.with_lines(s.lines)), nb))  # the first nb batches of a first pass
        rep = refine_blocks(model, s.dense, layers, xs, **kw)
        if kw.get("structure"):  # the moved structure fitted to the budget, as compress does
            fit_to_budget(list(layers.values()), budget)
            rep["structure_moved"] = structure_movement(before, {n: m.hard_structure() for n, m in layers.items()})
        secs = time.perf_counter() - t0
        row = K.cosines(s.judges, model)
        losses = " ".join(f"{b['loss_before']:.3f}>{b['loss_after']:.3f}" for b in rep["blocks"])
        click.echo(
            f"  {text}: +{secs:.0f} s (total {init_s + secs:.0f} s), ratio {cost_ratio(layers.values()):.3f}  "
            + "  ".join(f"{k} {v[0]:.4f} ({v[1]:.2f})" for k, v in row.items())
            + f"\n      block losses {losses}"
            + (f"; moved {rep['structure_moved']}" if "structure_moved" in rep else "")
        )


ST_CHECK = """
import json, sys
from sentence_transformers import SentenceTransformer
st = SentenceTransformer(sys.argv[1], backend="onnx", device="cpu")
print(json.dumps({"emb": st.encode(json.load(open(sys.argv[2])), batch_size=32).tolist(),
                  "backend": type(st[0].auto_model).__name__}))
"""


def _st_embeddings(folder: Path, sentences, model=None, bs: int = 32):
    """Sentence embeddings through the folder's tokenizer and sentence-transformers' Pooling and Normalize:
    of ``model`` (PyTorch) or, without it, of the folder's onnx/model.onnx in ONNX Runtime."""
    import numpy as np
    import torch
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    cfg = folder / "sentence_bert_config.json"
    max_len = int(json.loads(cfg.read_text()).get("max_seq_length", 512)) if cfg.is_file() else 512
    pool, norm = Pooling.load(str(folder), subfolder="1_Pooling"), Normalize()
    run = model if model is not None else K.OnnxEncoder(folder / "onnx" / "model.onnx")
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), bs):
            enc = tok(sentences[i : i + bs], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            h = run(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
            h = getattr(h, "last_hidden_state", h)
            f = norm(pool({"token_embeddings": h, "attention_mask": enc["attention_mask"]}))
            out.append(f["sentence_embedding"].numpy())
    return np.concatenate(out)


@cli.command("hf-folder")
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--heldout", default=256, show_default=True, help="held-out training sentences embedded")
@click.option("--train", default="stdlib-a", show_default=True, help=f"their source ({K.SOURCES})")
@click.option("--threads", default=2, show_default=True)
@click.option("--st-python", help="a Python with sentence-transformers + optimum-onnx: also SentenceTransformer(OUT)")
def hf_folder(models, heldout, train, threads, st_python):
    """Each model's ``gblrc lower --hf-folder`` output: embeddings through the folder (its tokenizer, ONNX
    Runtime on onnx/model.onnx, sentence-transformers' Pooling and Normalize from its module files) against
    gblrc.load's model; with --st-python also through ``SentenceTransformer(OUT, backend="onnx")``."""
    import subprocess

    import gblrc
    import numpy as np

    from gblrc.export.hf_folder import write_hf_folder
    from gblrc.io.zoo import minilm_path

    click.echo(provenance(threads))
    held = K.source(train)[:heldout]
    cos = lambda x, y: (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)  # noqa: E731
    with tempfile.TemporaryDirectory() as d:
        for i, path in enumerate(models):
            cm = gblrc.load(path).eval()
            out = Path(d) / f"hf{i}"
            src = (cm.gblrc_meta or {}).get("source") or minilm_path()
            from transformers import AutoTokenizer

            ex = K.example_inputs(AutoTokenizer.from_pretrained(str(src)), held)
            write_hf_folder(cm, ex, out, src, attention_threads=threads)
            ref = _st_embeddings(out, held, model=cm)
            c = cos(_st_embeddings(out, held), ref)
            line = (
                f"{Path(path).name} --hf-folder: folder (tokenizer + ORT + sentence-transformers Pooling/Normalize) "
                f"vs gblrc.load: cosine min {c.min():.7f}, 1 - min {1 - c.min():.2e} over {len(held)} sentences"
            )
            if st_python:
                sj = Path(d) / "sents.json"
                sj.write_text(json.dumps(held))
                r = subprocess.run(
                    [st_python, "-c", ST_CHECK, str(out), str(sj)],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "HF_HUB_OFFLINE": "1"},
                )
                if r.returncode == 0:
                    got = json.loads(r.stdout.strip().splitlines()[-1])
                    c2 = cos(np.asarray(got["emb"]), ref)
                    line += f"; SentenceTransformer(OUT, backend='onnx') ({got['backend']}): cosine min {c2.min():.7f}"
                else:
                    why = (r.stderr.strip().splitlines() or [""])[-1][:200]
                    line += f"; SentenceTransformer(backend='onnx') failed: {why}"
            click.echo(line)


if __name__ == "__main__":
    cli()
