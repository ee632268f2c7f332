"""MiniLM deployed the way users deploy: dense and gblrc-lowered, fp32 / fp16 / int8, fidelity and latency.

One process, one table.  The compressed model: --model FILE.gblr.pt (e.g. from benchmarks/compress_minilm.py
--save), else all 36 encoder Linear layers compressed here at --budget with `gblrc.compress` (defaults:
sequential data-aware init, sensitivity allocation) and --steps of distillation (default 0: the
initialisation only) on English documentation sentences (pydoc topics).  Every row is made by the same
code as the CLI: dense = the dense ONNX export, `gblrc.export.precision.to_fp16` / `quantize_checked` on it;
gblrc = `gblrc.lower(..., precision=..., quantize=..., quant_mode=...)`.  int8 static QDQ is calibrated
on --calib-batches batches of the training sentences; per-channel weight scales are chosen per model
by fidelity to its fp32 form (both tried).

Fidelity, out of domain: mean-pooled sentence embeddings of --heldout stdlib docstring sentences (text
nothing was fitted on), cosine to the dense fp32 model (mean, min) and to the row's own fp32 form.
Latency: ONNX Runtime CPU provider, --threads threads, --batch x --seq tokens, all rows' sessions in one
process, runs interleaved, medians of --repeats runs, best of --sessions fresh sessions
(gblrc.runtime.timing, as `gblrc bench`); time ratios to dense fp32 measured in the same run.

    python -m benchmarks.deploy_minilm --threads 2 [--model m.gblr.pt] [--steps 0] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import warnings
from collections import OrderedDict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import gblrc  # noqa: E402
from gblrc.export.precision import quantize_checked, to_fp16  # noqa: E402
from gblrc.runtime import make_session  # noqa: E402
from gblrc.runtime.timing import best_of_sessions  # noqa: E402
from gblrc.io.zoo import docstring_sentences, english_sentences, load_minilm  # noqa: E402

from benchmarks.compress_minilm import batches, export_dense_fastest  # noqa: E402
from benchmarks.common import provenance  # noqa: E402


def embeddings(path, feeds_list) -> np.ndarray:
    """Mean-pooled last hidden states of an ONNX MiniLM over batches of feeds."""
    sess = make_session(path, log=False, threads=1)
    out = []
    for f in feeds_list:
        (h,) = sess.run(None, f)
        m = f["attention_mask"][..., None].astype(np.float64)
        out.append((h.astype(np.float64) * m).sum(1) / m.sum(1))
    return np.concatenate(out)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a compressed MiniLM (.gblr.pt); default: compress here")
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--save", metavar="FILE.gblr.pt", help="save the model compressed here (for --model)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--heldout", type=int, default=256, help="docstring sentences for the fidelity columns")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument(
        "--rows",
        default="all",
        help="comma-separated row keys (default all): dense, dense16, dense8, dense8s, gblr, gblr16, gblr8, gblr8s",
    )
    a = ap.parse_args()
    print(provenance(getattr(a, "threads", None)), flush=True)  # results files name the commit, libraries and cores
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    dense, tok = load_minilm()
    sents = english_sentences()
    random.Random(0).shuffle(sents)
    train = sents[256:]
    train_b = batches(tok, train, 32)
    if a.model:
        cm = gblrc.load(a.model)
        how = f"{a.model}"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm, rep = gblrc.compress(
                load_minilm()[0], a.budget, data=train_b, steps=a.steps, include=r"^encoder\.", progress=False, lr=1e-3
            )
        how = f"compressed here: budget {a.budget}, achieved {rep['achieved_ratio']:.3f}, {a.steps} steps"
        if a.save:
            gblrc.save(cm, a.save, example_inputs=train_b[0])
    cm.eval()
    docs = docstring_sentences()
    held = docs[:: max(1, len(docs) // a.heldout)][: a.heldout]
    held_feeds = [{k: v.numpy() for k, v in b.items()} for b in batches(tok, held, 32, max_len=128)]
    cal = [{k: v.numpy() for k, v in b.items()} for b in train_b[: a.calib_batches]]
    enc = tok(sents[:2], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    ex = OrderedDict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    enc = tok(sents[: a.batch], padding="max_length", truncation=True, max_length=a.seq, return_tensors="np")
    time_feeds = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    want = None if a.rows == "all" else set(a.rows.split(","))
    rows: "OrderedDict[str, dict]" = OrderedDict()
    with tempfile.TemporaryDirectory() as d:
        P = lambda k: os.path.join(d, f"{k}.onnx")  # noqa: E731
        export_dense_fastest(dense, ex, P("dense"), time_feeds, threads=a.threads)  # the fastest dense export
        d32 = onnx.load(P("dense"))
        rows["dense"] = {"name": "dense fp32", "base": "dense"}
        if want is None or "dense16" in want:
            onnx.save(to_fp16(d32), P("dense16"))
            rows["dense16"] = {"name": "dense fp16 (ORT float16 converter)", "base": "dense"}
        for key, mode in (("dense8", "dynamic"), ("dense8s", "static")):
            if want is None or key in want:
                q, pc, fid, cand = quantize_checked(
                    d32,
                    [{k: v.numpy() for k, v in ex.items()}] + cal,
                    mode=mode,
                    calibration=cal if mode == "static" else None,
                )
                onnx.save(q, P(key))
                rows[key] = {"name": f"dense int8 {mode}", "base": "dense", "pc": pc}
        lowered = {
            "gblr": ("fp32", None, "dynamic"),
            "gblr16": ("fp16", None, "dynamic"),
            "gblr8": ("fp32", "int8", "dynamic"),
            "gblr8s": ("fp32", "int8", "static"),
        }
        for key, (prec, quant, mode) in lowered.items():
            if key != "gblr" and want is not None and key not in want:
                continue
            r = gblrc.lower(
                cm, ex, P(key), precision=prec, quantize=quant, quant_mode=mode, calib_feeds=cal if quant else None
            )
            label = {
                "gblr": "gblrc lowered fp32",
                "gblr16": "gblrc lowered fp16",
                "gblr8": "gblrc lowered int8 dynamic",
                "gblr8s": "gblrc lowered int8 static QDQ",
            }[key]
            rows[key] = {"name": label, "base": "gblr", "pc": r.quantization.get("per_channel")}
        # fidelity out of domain
        emb = {k: embeddings(P(k), held_feeds) for k in rows}
        for k, row in rows.items():
            c = cosines(emb[k], emb["dense"])
            row["cos_dense"] = (float(c.mean()), float(c.min()))
            c = cosines(emb[k], emb[row["base"]])
            row["cos_self"] = (float(c.mean()), float(c.min()))
        # latency: every row in one process, interleaved, best of fresh sessions
        t = best_of_sessions(
            {k: P(k) for k in rows}, time_feeds, threads=a.threads, repeats=a.repeats, sessions=a.sessions
        )
    print(
        f"MiniLM ({how}); ONNX Runtime {ort.__version__} CPU provider, {a.threads} threads, {a.batch}x{a.seq} "
        f"tokens, medians of {a.repeats} interleaved runs, best of {a.sessions} fresh sessions; fidelity on "
        f"{len(held)} stdlib docstring sentences (out of domain); {time.perf_counter() - t_start:.0f} s"
    )
    print()
    print("| model | time / dense fp32 | cosine to dense fp32, mean (min) | cosine to its own fp32 form, mean (min) |")
    print("|---|---|---|---|")
    for k, row in rows.items():
        pc = row.get("pc")
        name = row["name"] + ("" if pc is None else f" (per-channel {'on' if pc else 'off'})")
        cd, cs = row["cos_dense"], row["cos_self"]
        print(
            f"| {name} | {t.best[k] / t.best['dense']:.2f} | {cd[0]:.3f} ({cd[1]:.3f}) | "
            f"{'–' if k == row['base'] else f'{cs[0]:.4f} ({cs[1]:.4f})'} |"
        )
    print()
    if "gblr8" in rows:
        print(
            f"gblrc lowered int8 dynamic: {t.best['gblr8'] / t.best['gblr']:.2f}x lowered fp32"
            + (f", {t.best['gblr8'] / t.best['dense8']:.2f}x dense int8 dynamic" if "dense8" in rows else "")
        )
    if "gblr8s" in rows:
        print(
            f"gblrc lowered int8 static: {t.best['gblr8s'] / t.best['gblr']:.2f}x lowered fp32"
            + (f", {t.best['gblr8s'] / t.best['dense8s']:.2f}x dense int8 static" if "dense8s" in rows else "")
        )


if __name__ == "__main__":
    main()
