"""MiniLM's speed/fidelity front: every deployable form, timed and judged in one process, on one plot (issue 21).

Points: dense fp32 (the fastest dense export, as every MiniLM benchmark's baseline), dense int8 dynamic
per-tensor and per-channel; gblrc at each --budgets x --structures x --recipes, each lowered fp32
(`gblrc.lower`, default pipeline) and + int8 dynamic (as `gblrc lower --quantize int8`: per-channel chosen
by fidelity).  Recipes: steps0 = ``compress --steps 0`` without block refinement; refine = the same with
refinement (:data:`REFINE`); distill = :data:`DISTILL` steps of distillation with refinement;
distill-norefine = the same without refinement (the default compress before refinement existed).  The
training text is refine_recipe_minilm's (stdlib-a docstrings mixed half and half with --general package
sentences).  Compressed models are cached in --cache as ``<structure>_<budget>_<recipe>.gblr.pt`` (with
a .json of how long the compression took), so the grid can be run in pieces and extended.

Fidelity is judged on what deploys: every ONNX graph run by ONNX Runtime on the judge sets (held-out
stdlib-a = in domain; readme, sklearn, changelog = the "other genre" figure; pydoc, stdlib-b), mean-pooled
last hidden states, cosine to the dense PyTorch model.  Time: all sessions in one interleaved run
(gblrc.runtime.timing: medians of --repeats, best of --sessions fresh sessions), --batch x --seq tokens,
ratios to dense fp32 of the same run.  Writes OUT.txt (the table), OUT.json (the rows), OUT.png (time
vs other-genre fidelity, the Pareto front marked).

    .venv/bin/python -m benchmarks.front_minilm --threads 2        # the full grid: hours (cached per model)
    .venv/bin/python -m benchmarks.front_minilm --budgets 0.5 --structures lowrank --recipes steps0 --quick-init \\
        --eval-n 20 --heldout 32 --general 2000 --sessions 1 --repeats 2 --threads 1 \\
        --cache /tmp/front_smoke --out /tmp/front_smoke/front       # smoke run (~1 min)

One real ``--steps 0`` compression of MiniLM takes 3-4 min at 2 threads, its refinement 4-5 more, 300 steps of
distillation ~9 more (benchmarks/results/front_minilm.txt, "compress s");
--quick-init (plain SVD, no data) replaces it in smoke runs only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx  # noqa: E402
import torch  # noqa: E402

import gblrc  # noqa: E402
from gblrc.export.precision import fidelity as output_agreement, quantize_checked, quantize_int8  # noqa: E402
from gblrc.io.fileio import atomic_path  # noqa: E402
from gblrc.io.zoo import load_minilm  # noqa: E402
from gblrc.runtime import make_session  # noqa: E402
from gblrc.runtime.timing import best_of_sessions  # noqa: E402

from benchmarks.common import display_path, provenance  # noqa: E402
from benchmarks.compress_minilm import batches, embed, export_dense_fastest  # noqa: E402
from benchmarks.deploy_minilm import cosines, embeddings  # noqa: E402
from benchmarks.refine_recipe_minilm import EVAL_GENRES, judge_sets, training_text  # noqa: E402

REFINE = dict()  # the "refine" recipe's TrainingConfig settings: the defaults (block refinement on, with data)
DISTILL = dict(steps=300, lr=1e-3, batch_size=32)  # as benchmarks/fidelity_minilm.py distils
RECIPES = ("steps0", "refine", "distill", "distill-norefine")
TARGET = 0.95  # the other-genre fidelity the verdict asks for
PARITY_MAX_REL = 1e-4  # lowered fp32 vs the PyTorch compressed model (lower's own fp32 gate)


def recipe_config(structure: str, budget: float, recipe: str) -> gblrc.CompressConfig:
    """The CompressConfig of one grid point."""
    common = dict(budget=budget, structure=structure, include=r"^encoder\.", progress=False)
    if recipe == "steps0":
        return gblrc.CompressConfig(steps=0, training=gblrc.TrainingConfig(refine_steps=0), **common)
    if recipe == "refine":
        return gblrc.CompressConfig(steps=0, training=gblrc.TrainingConfig(**REFINE), **common)
    if recipe == "distill-norefine":  # the default compress before refinement existed
        return gblrc.CompressConfig(training=gblrc.TrainingConfig(refine_steps=0), **DISTILL, **common)
    if recipe == "distill":
        return gblrc.CompressConfig(training=gblrc.TrainingConfig(**REFINE), **DISTILL, **common)
    raise SystemExit(f"unknown recipe {recipe!r}: choose from {', '.join(RECIPES)}")


def cache_paths(structure: str, budget: float, recipe: str, a) -> tuple[Path, Path]:
    """(model, facts) paths of one grid point in the cache."""
    stem = Path(a.cache) / f"{structure}_{budget:g}_{recipe}{'_quick' if a.quick_init else ''}"
    return stem.with_name(stem.name + ".gblr.pt"), stem.with_name(stem.name + ".json")


def cached_model(dense, train_b, structure: str, budget: float, recipe: str, a) -> tuple:
    """(compressed model, facts): loaded from ``a.cache`` when there, else compressed and saved there."""
    path, info_path = cache_paths(structure, budget, recipe, a)
    if path.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        info["cached"] = True
        if (info.get("general"), info.get("heldout")) != (a.general, a.heldout):
            info["note"] = f"cached model trained with general={info.get('general')}, heldout={info.get('heldout')}"
        return gblrc.load(path), info
    if recipe == "refine" and not a.quick_init:  # the steps0 model + the refine stage: the init runs once
        return refined_from_steps0(dense, train_b, structure, budget, a, path, info_path)
    cfg, example = recipe_config(structure, budget, recipe), train_b[0]
    if a.quick_init:  # smoke runs: plain truncated SVD, uniform split, no data (seconds, poor fidelity)
        cfg, train_b = cfg.replace(init="svd", allocate="uniform"), None
    print(f"compressing {path.name} ...", flush=True)
    t0 = time.perf_counter()
    cm, rep = gblrc.compress(copy.deepcopy(dense), cfg, data=train_b)
    info = {
        "compress_s": round(time.perf_counter() - t0, 1),
        "achieved_ratio": rep["achieved_ratio"],
        "general": a.general,
        "heldout": a.heldout,
        "torch_threads": torch.get_num_threads(),
        "quick_init": a.quick_init,
        "made": time.strftime("%Y-%m-%d %H:%M"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        gblrc.save(cm, tmp, example_inputs=example, meta={"recipe": recipe, **info})
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return cm.eval(), {**info, "cached": False}


def refined_from_steps0(dense, train_b, structure: str, budget: float, a, path, info_path) -> tuple:
    """The "refine" point: the (cached) steps0 model refined by the stage compress runs at the end of its
    initialisation (gblrc.learn.refine, the config's settings, its first refine_batches batches), fitted to
    the budget again when the structure moves; its compress seconds = the steps0 model's + the stage's."""
    from gblrc.learn.budget import cost_ratio, fit_to_budget
    from gblrc.learn.refine import refine_blocks, refine_settings
    from gblrc.nn.layer import GBLRLinear

    cm, base = cached_model(dense, train_b, structure, budget, "steps0", a)
    t = recipe_config(structure, budget, "refine").training
    layers = {n: m for n, m in cm.named_modules() if isinstance(m, GBLRLinear)}
    print(f"refining {path.name} ...", flush=True)
    rep = refine_blocks(cm, dense, layers, train_b[: t.refine_batches], **refine_settings(t))
    if t.refine_structure:
        fit_to_budget(list(layers.values()), budget)
    ratio = cost_ratio(layers.values())
    info = {**{k: v for k, v in base.items() if k != "cached"}, "refine_s": rep["seconds"], "achieved_ratio": ratio}
    info["compress_s"] = round(base["compress_s"] + rep["seconds"], 1)
    with atomic_path(path) as tmp:
        gblrc.save(cm, tmp, example_inputs=train_b[0], meta={"recipe": "refine", **info})
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return cm.eval(), {**info, "cached": False}


def parity(cm, onnx_path, batch) -> float:
    """Max relative error of the lowered graph's last hidden state vs the PyTorch model's (padding skipped)."""
    feeds = {k: v.numpy() for k, v in batch.items()}
    (h,) = make_session(onnx_path, log=False, threads=1).run(None, feeds)
    with torch.no_grad():
        ref = cm(**batch).last_hidden_state.numpy()
    return output_agreement([[h]], [[ref]], masks=[feeds["attention_mask"]]).max_rel


def judge(path, sets_np: dict, refs: dict) -> dict:
    """{judge set: (mean, min) cosine} of the ONNX graph's mean-pooled embeddings to the dense PyTorch ones."""
    out = {}
    for k, feeds in sets_np.items():
        c = cosines(embeddings(path, feeds), refs[k])
        out[k] = (round(float(c.mean()), 4), round(float(c.min()), 3))
    return out


def dense_points(dense, ex, time_feeds, P, a) -> list[dict]:
    """The dense fp32 export (fastest form) and its int8 dynamic quantisations, per-tensor and per-channel."""
    export_dense_fastest(dense, ex, P("dense"), time_feeds, threads=a.threads, repeats=a.repeats, sessions=a.sessions)
    d32 = onnx.load(P("dense"))
    rows = [dict(key="dense", name="dense fp32", family="dense", precision="fp32")]
    for pc, label in ((False, "int8 per-tensor"), (True, "int8 per-channel")):
        key = f"dense8{'c' if pc else 't'}"
        onnx.save(quantize_int8(d32, mode="dynamic", per_channel=pc), P(key))
        rows.append(dict(key=key, name=f"dense {label}", family="dense", precision=label))
    return rows


def gblrc_points(dense, train_b, ex, P, parity_batch, a, notes: list) -> list[dict]:
    """Every grid point compressed (or loaded), lowered fp32 and + int8; a parity note per model."""
    rows = []
    for recipe in a.recipes:
        for structure in a.structures:
            for b in a.budgets:
                if a.cached_only and not cache_paths(structure, b, recipe, a)[0].is_file():
                    notes.append(f"{structure} {b:g} {recipe}: not in the cache, left out (--cached-only)")
                    continue
                cm, info = cached_model(dense, train_b, structure, b, recipe, a)
                if a.compress_only:
                    continue
                name = f"{structure} {b:g} {recipe}" + (" quick-init" if a.quick_init else "")
                key = f"{structure}_{b:g}_{recipe}"
                r = gblrc.lower(cm, ex, P(key), attention_threads=a.threads)
                err = parity(cm, P(key), parity_batch)
                q, pc, _, _ = quantize_checked(onnx.load(P(key)), [{k: v.numpy() for k, v in ex.items()}])
                onnx.save(q, P(key + "_8"))
                base = dict(family=structure, recipe=recipe, budget=b, compress_s=info["compress_s"])
                base.update(cached=info["cached"], achieved_ratio=info.get("achieved_ratio"), note=info.get("note"))
                rows.append(dict(key=key, name=f"{name} fp32", precision="fp32", **base))
                rows.append(dict(key=key + "_8", name=f"{name} int8", precision="int8", per_channel=pc, **base))
                notes.append(
                    f"{name}: {'from the cache' if info['cached'] else 'compressed here'} "
                    f"({info['compress_s']:.0f} s when made); lowered: {r.attention.line()}; {r.parity_line()}; "
                    f"on a judge batch, max rel error vs PyTorch {err:.2e}; int8 per-channel {'on' if pc else 'off'}"
                    + (f"; NOTE {info['note']}" if info.get("note") else "")
                )
                print(notes[-1], flush=True)
                assert err <= PARITY_MAX_REL, f"{name}: lowered fp32 differs from PyTorch by {err:.2e} (rel)"
                del cm
    return rows


def pareto(rows, x: str = "time", y: str = "other") -> list[dict]:
    """The rows no other row beats on both (lower ``x`` and higher ``y``), sorted by ``x``; rows lacking either
    value are left out."""
    pts = [r for r in rows if r.get(x) is not None and r.get(y) is not None]

    def beaten(r):
        return any(o[x] <= r[x] and o[y] >= r[y] and (o[x] < r[x] or o[y] > r[y]) for o in pts)

    return sorted((r for r in pts if not beaten(r)), key=lambda r: (r[x], -r[y]))


def other_mean(fid: dict):
    """Mean of the other genres' (readme, sklearn, changelog) mean cosines present in ``fid``."""
    vals = [fid[g][0] for g in EVAL_GENRES if g in fid]
    return round(sum(vals) / len(vals), 4) if vals else None


DENSE_MARKERS = {"fp32": "*", "int8 per-tensor": "v", "int8 per-channel": "^"}
STRUCTURE_MARKERS = {"lowrank": "o", "gblr": "D"}
RECIPE_COLORS = {"steps0": "tab:blue", "refine": "tab:orange", "distill": "tab:green", "distill-norefine": "tab:olive"}


def _style(r: dict) -> dict:
    """Marker, colours and fill of one row: dense in black by precision; gblrc by structure (marker),
    recipe (colour), fp32 filled / int8 hollow."""
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
    handles = _legend_handles()
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], color="dimgray", lw=1.2, label="Pareto front (ringed)"))
    ax.legend(handles=handles, fontsize=7, loc="lower right", ncol=2)
    ax.set_xlabel("time / dense fp32 (ONNX Runtime CPU; lower is better)")
    ax.set_ylabel("other-genre fidelity (mean cosine to dense: " + ", ".join(EVAL_GENRES) + ")")
    ax.set_title(title or "MiniLM: speed vs fidelity of every deployable form")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _cell(fid, k) -> str:
    return f"{fid[k][0]:.4f} ({fid[k][1]:.3f})" if k in fid else "–"


def table(rows, set_names) -> list[str]:
    """The markdown table: one row per point, the Pareto-optimal ones marked."""
    front = {id(r) for r in pareto(rows)}
    others = [s for s in set_names if s != "in domain"]
    head = ["point", "time / dense fp32", "in domain mean (min)", "other genres"] + others
    out = ["| " + " | ".join(head + ["compress s", "model from", "front"]) + " |", "|---" * (len(head) + 3) + "|"]
    for r in rows:
        secs = "–" if r.get("compress_s") is None else f"{r['compress_s']:.0f}"
        made = "–" if r["family"] == "dense" else ("cache" if r.get("cached") else "made here")
        other = "–" if r.get("other") is None else f"{r['other']:.4f}"
        cells = [r["name"], f"{r['time']:.3f}", _cell(r["fid"], "in domain"), other]
        cells += [_cell(r["fid"], s) for s in others] + [secs, made, "*" if id(r) in front else ""]
        out.append("| " + " | ".join(cells) + " |")
    return out


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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--budgets", type=floats, default=floats("0.3,0.4,0.5,0.6,0.7,0.8"))
    ap.add_argument("--structures", type=names, default=names("lowrank,gblr"))
    ap.add_argument("--recipes", type=names, default=list(RECIPES), help=f"of {', '.join(RECIPES)}")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime (timing) and torch (compression) threads")
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8, help="timing inputs: --batch x --seq tokens")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--eval", default="readme,sklearn,changelog,pydoc,stdlib-b", help="judge sets beside in domain")
    ap.add_argument("--eval-n", type=int, default=300, help="sentences per judge set")
    ap.add_argument("--heldout", type=int, default=256, help="held-out stdlib-a sentences (in domain)")
    ap.add_argument("--general", type=int, default=12000, help="package sentences mixed in (the CLI's default)")
    ap.add_argument("--cache", default=".cache/front", help="folder of the compressed models")
    ap.add_argument("--out", default="benchmarks/results/front_minilm", help="writes OUT.txt, OUT.json, OUT.png")
    ap.add_argument(
        "--quick-init",
        action="store_true",
        help="smoke runs only (with --recipes steps0): compress by plain truncated SVD with no data, in seconds; "
        "cached as ..._quick.gblr.pt",
    )
    ap.add_argument(
        "--compress-only",
        action="store_true",
        help="only fill the cache (compress the grid's missing models); no lowering, judging or timing",
    )
    ap.add_argument(
        "--cached-only",
        action="store_true",
        help="only the grid points already in the cache (the others are listed as left out), none compressed",
    )
    a = ap.parse_args(argv)
    if a.quick_init and a.recipes != ["steps0"]:
        ap.error("--quick-init is for smoke runs of --recipes steps0 only")
    for r in a.recipes:
        if r not in RECIPES:
            ap.error(f"unknown recipe {r!r}: choose from {', '.join(RECIPES)}")
    return a


def prepare(a) -> dict:
    """The dense model, training batches, judge sets (torch and numpy batches), their dense references and
    the --batch x --seq example / timing inputs."""
    dense, tok = load_minilm()
    held, train = training_text(a.heldout, a.general)
    train_b = batches(tok, train, 32)
    sets = judge_sets(tok, held, train, a.eval_n, [x for x in a.eval.split(",") if x])
    enc = tok(train[: a.batch], padding="max_length", truncation=True, max_length=a.seq, return_tensors="pt")
    ex = OrderedDict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return dict(
        dense=dense,
        train_b=train_b,
        n_train=len(train),
        sets=sets,
        sets_np={k: [{n: v.numpy() for n, v in b.items()} for b in bl] for k, bl in sets.items()},
        refs={k: embed(dense, bl).double().numpy() for k, bl in sets.items()},
        ex=ex,
        time_feeds={k: v.numpy() for k, v in ex.items()},
    )


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    lines = [provenance(a.threads)]
    print(lines[0], flush=True)
    d = prepare(a)
    lines.append(
        "judge sets (sentences): "
        + ", ".join(f"{k} {sum(len(b['input_ids']) for b in v)}" for k, v in d["sets"].items())
        + f"; training text: {d['n_train']} sentences (stdlib-a + {a.general} package sentences)"
    )
    print(lines[-1], flush=True)
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        P = lambda k: os.path.join(tmp, f"{k}.onnx")  # noqa: E731
        rows = [] if a.compress_only else dense_points(d["dense"], d["ex"], d["time_feeds"], P, a)
        rows += gblrc_points(d["dense"], d["train_b"], d["ex"], P, d["sets"]["in domain"][0], a, notes)
        if a.compress_only:
            print("\n".join(notes + [f"cache filled: {display_path(a.cache)}"]), flush=True)
            return
        print(f"judging {len(rows)} ONNX graphs ...", flush=True)
        for r in rows:
            r["fid"] = judge(P(r["key"]), d["sets_np"], d["refs"])
            r["other"] = other_mean(r["fid"])
        print(f"timing {len(rows)} sessions interleaved ...", flush=True)
        t = best_of_sessions(
            {r["key"]: P(r["key"]) for r in rows},
            d["time_feeds"],
            threads=a.threads,
            repeats=a.repeats,
            sessions=a.sessions,
        ).best
    for r in rows:
        r["time"], r["ms"] = round(t[r["key"]] / t["dense"], 4), round(t[r["key"]] * 1e3, 2)
        r["pareto"] = False
    for r in pareto(rows):
        r["pareto"] = True
    lines.append(
        f"ONNX Runtime CPU, {a.threads} threads, {a.batch}x{a.seq} tokens, medians of {a.repeats} interleaved "
        f"runs, best of {a.sessions} fresh sessions; dense fp32 {t['dense'] * 1e3:.1f} ms; "
        f"{time.perf_counter() - t_start:.0f} s in all"
    )
    lines += [""] + table(rows, list(d["sets"])) + [""] + notes + ["", verdict(rows)]
    write_results(a, lines, rows, d)


def write_results(a, lines, rows, d) -> None:
    """Print the report and write OUT.txt, OUT.json and OUT.png."""
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines[2:]) + "\n"
    print(text, end="")
    Path(f"{out}.txt").write_text("\n".join(lines) + "\n")
    settings = {k: v for k, v in vars(a).items() if k not in ("cache", "out")}
    settings.update(cache=display_path(a.cache), refine=REFINE, distill=DISTILL)
    sets = {k: sum(len(b["input_ids"]) for b in v) for k, v in d["sets"].items()}
    payload = dict(provenance=lines[0], settings=settings, judge_sets=sets, rows=rows, verdict=lines[-1])
    Path(f"{out}.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot_front(rows, f"{out}.png")
    print(f"wrote {display_path(f'{out}.txt')}, .json, .png", flush=True)


if __name__ == "__main__":
    main()
