"""Compressed MiniLMs against dense int8 at equal speed: time and out-of-domain fidelity in one run.

The question a user asks: "int8 dynamic quantisation makes my model 0.75x as slow and keeps ~0.99 of
its embeddings; at that speed, what does gblrc keep?"  This script times every given compressed model
(lowered by the default `gblrc lower`, fp32) beside the dense fp32 ONNX export and its int8 dynamic
quantisation (`gblrc.export.precision.quantize_checked`), all sessions in one process, runs
interleaved, medians of --repeats, best of --sessions fresh sessions; then judges each on held-out text
of the training source (pydoc, the same 256 sentences `fidelity_minilm.py` holds out) and on text of
other sources (stdlib-b, stdlib-a docstrings): mean (min) cosine of mean-pooled ONNX embeddings to the
dense fp32 model.  It ends by naming the cheapest model that is at least as fast as dense int8.

    python -m benchmarks.fidelity_minilm --budget 0.6 --save out/b06 ...   # make the models
    python -m benchmarks.speed_fidelity_minilm out/b06/*.gblr.pt out/b07/*.gblr.pt --threads 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import OrderedDict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import gblrc  # noqa: E402
from gblrc.export.precision import quantize_checked  # noqa: E402
from gblrc.io.zoo import load_minilm  # noqa: E402
from gblrc.runtime.timing import best_of_sessions  # noqa: E402

from benchmarks.compress_minilm import batches, export_dense_fastest  # noqa: E402
from benchmarks.deploy_minilm import cosines, embeddings  # noqa: E402
from benchmarks.fidelity_minilm import source  # noqa: E402
from benchmarks.common import provenance  # noqa: E402


def achieved_ratio(model) -> float:
    layers = [m for m in model.modules() if hasattr(m, "dense_flops") and hasattr(m, "flops")]
    return sum(int(m.flops()) for m in layers) / max(1, sum(int(m.dense_flops()) for m in layers))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="compressed MiniLMs (.gblr.pt)")
    ap.add_argument("--eval", default="stdlib-b,stdlib-a", help="other sources to judge on")
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--sessions", type=int, default=3)
    a = ap.parse_args()
    print(provenance(getattr(a, "threads", None)), flush=True)  # results files name the commit, libraries and cores
    for p in a.models:
        if not os.path.isfile(p):
            raise SystemExit(f"no such model file: {p}")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    dense, tok = load_minilm()
    pydoc = source("pydoc")
    sets = OrderedDict([("pydoc (in domain)", pydoc[:256])])
    for name in filter(None, a.eval.split(",")):
        sets[name] = source(name, seed=1)[: a.eval_n]
    feeds = {
        k: [{n: v.numpy() for n, v in b.items()} for b in batches(tok, s, 32, max_len=128)] for k, s in sets.items()
    }
    cal = [{n: v.numpy() for n, v in b.items()} for b in batches(tok, pydoc[256:512], 32)]
    enc = tok(pydoc[:2], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    ex = OrderedDict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    enc = tok(pydoc[: a.batch], padding="max_length", truncation=True, max_length=a.seq, return_tensors="np")
    time_feeds = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    rows: "OrderedDict[str, dict]" = OrderedDict()
    with tempfile.TemporaryDirectory() as d:
        P = lambda k: os.path.join(d, f"{k}.onnx")  # noqa: E731
        export_dense_fastest(dense, ex, P("dense"), time_feeds, threads=a.threads)  # the fastest dense export
        rows["dense"] = {"name": "dense fp32", "ratio": 1.0}
        q, pc, _, _ = quantize_checked(
            onnx.load(P("dense")), [{k: v.numpy() for k, v in ex.items()}] + cal, mode="dynamic"
        )
        onnx.save(q, P("dense8"))
        rows["dense8"] = {"name": f"dense int8 dynamic (per-channel {'on' if pc else 'off'})", "ratio": 1.0}
        for i, path in enumerate(a.models):
            cm = gblrc.load(path).eval()
            gblrc.lower(cm, ex, P(f"m{i}"))
            label = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
            rows[f"m{i}"] = {"name": f"gblrc lowered fp32: {label}", "ratio": achieved_ratio(cm)}
        emb = {k: {s: embeddings(P(k), f) for s, f in feeds.items()} for k in rows}
        for k, row in rows.items():
            for s in sets:
                c = cosines(emb[k][s], emb["dense"][s])
                row[s] = (float(c.mean()), float(c.min()))
        t = best_of_sessions(
            {k: P(k) for k in rows}, time_feeds, threads=a.threads, repeats=a.repeats, sessions=a.sessions
        )
    print(
        f"MiniLM; ONNX Runtime {ort.__version__} CPU provider, {a.threads} threads, {a.batch}x{a.seq} tokens, "
        f"medians of {a.repeats} interleaved runs, best of {a.sessions} fresh sessions; "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print()
    print("| model | FLOP ratio (linears) | time / dense fp32 | " + " | ".join(sets) + " |")
    print("|---|---|---|" + "---|" * len(sets))
    for k, row in rows.items():
        row["time"] = t.best[k] / t.best["dense"]
        print(
            f"| {row['name']} | {row['ratio']:.3f} | {row['time']:.2f} | "
            + " | ".join(f"{row[s][0]:.3f} ({row[s][1]:.2f})" for s in sets)
            + " |"
        )
    fast = [k for k in rows if k.startswith("m") and rows[k]["time"] <= rows["dense8"]["time"]]
    print()
    if fast:
        other = [s for s in sets if s != next(iter(sets))]
        best = max(fast, key=lambda k: min(rows[k][s][0] for s in other) if other else rows[k][next(iter(sets))][0])
        print(
            f"as fast as dense int8 ({rows['dense8']['time']:.2f}x): {len(fast)} of {len(a.models)}; the most "
            f"faithful out of domain is {rows[best]['name']} at {rows[best]['time']:.2f}x"
        )
    else:
        print(f"no compressed model is as fast as dense int8 ({rows['dense8']['time']:.2f}x dense fp32)")


if __name__ == "__main__":
    main()
