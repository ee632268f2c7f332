"""Whole-model latency: MiniLM with GBLR layers, lowered by `gblrc lower`, vs the dense ONNX export.

All 36 encoder Linear layers become GBLR layers at --budget, initialised from the pretrained weights
(--init svd: truncated SVD, i.e. full-width blocks; --init gblr: block pursuit, gblrc.nn.layer.fit_dense).
Both models run in ONNX Runtime (CPU provider, --threads threads) on the same --batch x --seq tokens,
interleaved, --repeats runs each; prints medians' ratio and the FLOP ratio of the compressed layers.
Usage: python -m benchmarks.minilm_latency [--budget 0.4] [--init svd|gblr] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import OrderedDict

import numpy as np
import onnxruntime as ort
import torch

from gblrc import GBLRLinear, lower

from benchmarks.compress_minilm import export_dense_fastest  # noqa: E402
from gblrc.learn.budget import cost_ratio
from gblrc.nn.layer import fit_dense, svd_layer
from gblrc.runtime import timing
from gblrc.io.zoo import english_sentences, load_minilm, minilm_linears
from benchmarks.common import provenance  # noqa: E402


def _set(root, name, new):
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent), leaf, new)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--init", choices=["svd", "gblr"], default="svd")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    print(provenance(getattr(a, "threads", None)), flush=True)  # results files name the commit, libraries and cores

    dense, tok = load_minilm()
    sents = english_sentences()[: a.batch]
    enc = tok(sents, padding="max_length", truncation=True, max_length=a.seq, return_tensors="pt")
    ex = OrderedDict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    feeds = {k: v.numpy() for k, v in ex.items()}

    model, _ = load_minilm()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for name, lin in minilm_linears(model):
        g = svd_layer(lin, a.budget).eval() if a.init == "svd" else fit_dense(lin, a.budget)
        _set(model, name, g)
    fit_s = time.perf_counter() - t0
    torch.set_num_threads(a.threads)
    layers = [m for m in model.modules() if isinstance(m, GBLRLinear)]
    flop_ratio = cost_ratio(layers)

    with tempfile.TemporaryDirectory() as d:
        p_dense, p_gblr = os.path.join(d, "dense.onnx"), os.path.join(d, "gblr.onnx")
        export_dense_fastest(dense, ex, p_dense, feeds, threads=a.threads)  # the fastest dense export
        rep = lower(model, ex, p_gblr)
        runners = {
            k: timing.Runner(timing.timing_session(p, timing.CPU, a.threads), feeds)
            for k, p in (("dense", p_dense), ("gblr", p_gblr))
        }
        times = timing.time_runs(runners, repeats=a.repeats, warmup=1)  # gblrc.runtime.timing, as `gblrc bench`
    med = {k: float(np.median(v)) for k, v in times.items()}
    strategies = {}
    for r in rep.passes:
        for k, v in (r.get("counts", {}) if isinstance(r, dict) else getattr(r, "counts", {})).items():
            if k.startswith("lowered_") or k == "dense_layers":
                strategies[k] = strategies.get(k, 0) + v
    print(
        f"MiniLM, 36 encoder Linear layers as GBLR (init {a.init}, fit {fit_s:.0f} s), budget {a.budget}; "
        f"{a.batch}x{a.seq} tokens; ORT {ort.__version__} CPU, {a.threads} threads, {a.repeats} interleaved runs"
    )
    print(f"lowering: {strategies}; parity: {rep.parity_line()}")
    print("| model | FLOP ratio (GBLR layers) | time ratio (median) | time ratio (min) |")
    print("|---|---|---|---|")
    print(
        f"| whole model | {flop_ratio:.3f} | {med['gblr'] / med['dense']:.3f} | "
        f"{min(times['gblr']) / min(times['dense']):.3f} |"
    )


if __name__ == "__main__":
    main()
