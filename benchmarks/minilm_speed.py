"""Latency of compressed MiniLM models (from benchmarks/compress_minilm.py --save DIR) against dense.

For each saved model: the embedding cosine to the dense model on the held-out sentences (the same
split as compress_minilm.py), the FLOP ratio of its GBLR layers, the whole-model time ratio of the
lowered ONNX (`gblrc.lower`, default pipeline) to the dense ONNX export, and per layer the time ratio
of the lowered layer to its dense MatMul (+bias) on --batch x --seq token rows; FFN layers
(intermediate/output.dense, 384x1536 and 1536x384) listed separately.  ONNX Runtime CPU provider,
--threads threads, sessions interleaved, medians of --repeats runs, best of 3 fresh sessions per model
(a session's speed here is bimodal, fixed when it is created).

    python -m benchmarks.minilm_speed out/minilm/*.gblr.pt [--threads 2] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from collections import OrderedDict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx_graphsurgeon as gs  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import gblrc  # noqa: E402
from gblrc.learn.budget import TimeCost, cost_ratio  # noqa: E402
from gblrc.nn.layer import GBLRLinear  # noqa: E402
from gblrc.runtime import timing  # noqa: E402
from gblrc.passes import run_pipeline  # noqa: E402
from gblrc.passes.build import write_gblr_node  # noqa: E402
from gblrc.ir.structure import ONNX_DOMAIN, ONNX_OP  # noqa: E402
from gblrc.io.zoo import english_sentences, load_minilm  # noqa: E402

from benchmarks.compress_minilm import batches, embed, export_dense_fastest  # noqa: E402
from benchmarks.common import provenance  # noqa: E402


def best_of_sessions(models: dict, feeds: dict, repeats: int, threads: int, sessions: int = 3) -> dict:
    """Per model, the smallest of the medians over ``sessions`` fresh sessions (interleaved runs, I/O
    binding): gblrc.runtime.timing, the timing harness of `gblrc bench` and the tuner.

    A session's speed on this machine is bimodal (e.g. 0.67 or 1.28 ms for the same MatMul, fixed at
    session creation): the best of a few sessions compares the models, not the luck of the draw."""
    return timing.best_of_sessions(models, feeds, threads=threads, repeats=repeats, sessions=sessions).best


def layer_models(w, tokens):
    """(dense ONNX, lowered ONNX) of one layer: X (tokens x in) -> Y."""
    s = w.structure
    out = []
    for lowered in (False, True):
        x = gs.Variable("X", dtype=np.float32, shape=(tokens, s.in_features))
        y = gs.Variable("Y", dtype=np.float32, shape=(tokens, s.out_features))
        if lowered:
            node = gs.Node(ONNX_OP, "layer", inputs=[x], outputs=[y], domain=ONNX_DOMAIN)
            g = gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=17)
            write_gblr_node(g, node, w)
            model = gs.export_onnx(g)
            model.opset_import.append(__import__("onnx").helper.make_opsetid(ONNX_DOMAIN, 1))
            model, _ = run_pipeline(model)
        else:
            W = gs.Constant("W", np.ascontiguousarray(w.dense().T, dtype=np.float32))
            mid = gs.Variable("XW", dtype=np.float32)
            nodes = [gs.Node("MatMul", inputs=[x, W], outputs=[mid if w.bias is not None else y])]
            if w.bias is not None:
                nodes.append(
                    gs.Node("Add", inputs=[mid, gs.Constant("b", np.asarray(w.bias, np.float32))], outputs=[y])
                )
            model = gs.export_onnx(gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=17))
        out.append(model)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="compressed MiniLM files (.gblr.pt)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--heldout", type=int, default=256)
    ap.add_argument("--sessions", type=int, default=3, help="fresh ORT sessions per layer pair (the best counts)")
    ap.add_argument(
        "--verbose",
        action="store_true",
        help="print every layer: FLOP ratio, the cost model's estimated time ratio and lowering "
        "(gblrc.ir.cost.lowered_estimate), the measured time ratio, and whether it is within "
        "the lowering bar (time <= FLOP + 0.1 and <= 1.05 x dense)",
    )
    a = ap.parse_args()
    print(provenance(getattr(a, "threads", None)), flush=True)  # results files name the commit, libraries and cores
    torch.set_num_threads(1)
    dense, tok = load_minilm()
    sents = english_sentences()
    random.Random(0).shuffle(sents)
    held_b = batches(tok, sents[: a.heldout], 64)
    ref = embed(dense, held_b)
    enc = tok(sents[: a.batch], padding="max_length", truncation=True, max_length=a.seq, return_tensors="pt")
    ex = OrderedDict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    feeds = {k: v.numpy() for k, v in ex.items()}
    tokens = a.batch * a.seq
    print(
        f"MiniLM, {a.batch}x{a.seq} tokens; ORT {ort.__version__} CPU, {a.threads} threads, "
        f"medians of {a.repeats} interleaved runs, best of {a.sessions} sessions (whole model: 3); per-layer rows: "
        f"{tokens} x in"
    )
    print(
        "| model | cosine | FLOP ratio | whole model time ratio | FFN layers time ratio (max, median) | "
        "attention layers (max, median) | lowerings |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        p_dense = os.path.join(d, "dense.onnx")
        export_dense_fastest(dense, ex, p_dense, feeds, threads=a.threads)  # the fastest dense export
        for path in a.models:
            model = gblrc.load(path)
            cos = torch.nn.functional.cosine_similarity(embed(model, held_b), ref).mean().item()
            layers = {n: m for n, m in model.named_modules() if isinstance(m, GBLRLinear)}
            flop = cost_ratio(layers.values())
            p_gblr = os.path.join(d, "gblr.onnx")
            rep = gblrc.lower(model, ex, p_gblr)
            whole = best_of_sessions({"dense": p_dense, "gblr": p_gblr}, feeds, a.repeats, a.threads)
            kinds = {}
            for r in rep.passes:
                for k, v in (r.get("counts", {}) if isinstance(r, dict) else {}).items():
                    if k.startswith("lowered_") and v:
                        kinds[k[8:]] = kinds.get(k[8:], 0) + v
            x = {}
            ffn, att, table = [], [], []
            unit = TimeCost()
            for name, m in layers.items():
                w = m.structure()
                n_in = w.structure.in_features
                x.setdefault(n_in, {"X": np.random.default_rng(0).standard_normal((tokens, n_in)).astype(np.float32)})
                dm, lm = layer_models(w, tokens)
                t = best_of_sessions({"dense": dm, "gblr": lm}, x[n_in], a.repeats, a.threads, a.sessions)
                ratio = t["gblr"] / t["dense"]
                (
                    ffn
                    if ("intermediate" in name or name.endswith("output.dense") and "attention" not in name)
                    else att
                ).append(ratio)
                table.append(
                    (name, m.flops() / m.dense_flops(), unit.layer(m) / unit.dense(m), unit.strategy(m), ratio)
                )
            if a.verbose:
                print(f"  {'layer':<42}{'FLOP':>7}{'est.':>7}{'lowering':>11}{'time':>7}{'time-FLOP':>11}  bar")
                for name, f, e, how, r in table:
                    ok = r <= f + 0.1 and r <= 1.05
                    print(f"  {name:<42}{f:>7.3f}{e:>7.3f}{how:>11}{r:>7.3f}{r - f:>+11.3f}  {'ok' if ok else 'OVER'}")
                gaps = [r - f for _, f, _, _, r in table]
                held = sum(r <= f + 0.1 and r <= 1.05 for _, f, _, _, r in table)
                print(
                    f"  lowering bar held on {held}/{len(table)} layers; time - FLOP: max {max(gaps):+.3f}, "
                    f"median {np.median(gaps):+.3f}; max time {max(r for *_, r in table):.3f}"
                )
            fmt = lambda v: f"{max(v):.2f}, {np.median(v):.2f}" if v else "-"
            print(
                f"| {os.path.basename(path)} | {cos:.4f} | {flop:.3f} | {whole['gblr'] / whole['dense']:.3f} | "
                f"{fmt(ffn)} | {fmt(att)} | {kinds} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
