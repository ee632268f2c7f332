"""Data-aware GBLR structure (gblrc.nn.fit_data.fit_inputs) vs data-aware low rank (whitened SVD),
per MiniLM encoder layer, in the metric of each layer's real inputs; and how the structures lower.

Inputs: second moments C = X^T X / n of every layer's input rows (real tokens) on three disjoint text
sets: calibration (1,024 stdlib docstring sentences; the fits see only these), held-out A (256 other
docstring sentences) and held-out B (256 sentences of CPython's documentation, another source).
The relative output error ||X (W - W^)^T|| / ||X W^T|| on a set is exact from its C.
Prints per budget the held-out GBLR / whitened-SVD error ratio (median, min, max, wins), per layer
type, and the seconds per fit.  With --time B: every layer's data-aware GBLR fit at budget B and its
whitened SVD lowered by the default `gblrc lower` pipeline, timed against the dense MatMul
(ONNX Runtime CPU, --threads, best of 3 sessions' medians; ratios from the same run).

    .venv/bin/python -m benchmarks.structure_minilm [--budgets 0.2 0.4 0.6] [--limit N] [--time 0.4]
        [--opts '{"seed_frac": 0.5, "refit_rounds": 25}']
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import statistics as st
import sys
import tempfile
import time
from pathlib import Path

import torch

from gblrc.io import zoo
from gblrc.nn.fit_data import fit_inputs, output_error, whitened_svd_fit
from gblrc.nn.layer import GBLRLinear
from benchmarks.common import provenance  # noqa: E402

KINDS = [
    ("attention.self.query", "query"),
    ("attention.self.key", "key"),
    ("attention.self.value", "value"),
    ("attention.output.dense", "attn out"),
    ("intermediate.dense", "FFN up"),
    ("output.dense", "FFN down"),
]


def kind(name: str) -> str:
    return next(k for s, k in KINDS if name.endswith(s))


@torch.no_grad()
def capture(model, tok, layers, sets: dict) -> dict:
    """{set: {layer: C}} over the real (non-padding) token rows of each layer's inputs."""
    state, acc = {}, {}

    def hook(name):
        def f(_m, inp):
            x = inp[0].detach()[state["mask"]].double()
            s, n = acc.get(name, (0, 0))
            acc[name] = (s + x.t() @ x, n + x.shape[0])

        return f

    hs = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    out = {}
    try:
        for key, sents in sets.items():
            acc.clear()
            for i in range(0, len(sents), 32):
                b = tok(sents[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
                state["mask"] = b["attention_mask"].bool()
                model(**b)
            out[key] = {n: s / c for n, (s, c) in acc.items()}
    finally:
        for h in hs:
            h.remove()
    return out


def fit_options(text: str) -> dict:
    """``--opts`` as keyword options of fit_inputs; SystemExit with a one-line message otherwise."""
    known = [
        p.name
        for p in inspect.signature(fit_inputs).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name != "return_info"
    ]
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--opts: not JSON ({e})") from None
    if not isinstance(opts, dict):
        raise SystemExit(f"--opts: expected a JSON object of fit_inputs options {known}, got {text!r}")
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise SystemExit(f"--opts: unknown fit_inputs option(s) {unknown}; known: {known}")
    return opts


def lowered_time(W: torch.Tensor, fits: dict, threads: int) -> dict:
    """Time ratio to dense of each fit's layer lowered by the default pipeline (one run, interleaved)."""
    import gblrc
    from gblrc.runtime.timing import best_of_sessions

    x = torch.randn(1024, W.shape[1])
    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for k, f in fits.items():
            layer = GBLRLinear.from_fitted(f, torch.zeros(W.shape[0]), dtype=torch.float32).eval()
            kw = {"with_dense": f"{d}/dense.onnx"} if not paths else {}
            gblrc.lower(torch.nn.Sequential(layer), x, f"{d}/{k}.onnx", **kw)
            paths[k] = f"{d}/{k}.onnx"
        paths["dense"] = f"{d}/dense.onnx"
        import onnxruntime as ort

        name = ort.InferenceSession(paths["dense"], providers=["CPUExecutionProvider"]).get_inputs()[0].name
        t = best_of_sessions(paths, {name: x.numpy()}, threads=threads, repeats=15, sessions=3)
    return {k: t.ratio(k, "dense") for k in fits}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--limit", type=int, default=None, help="only the first N layers")
    ap.add_argument("--opts", default="{}", help="fit_inputs options as JSON: tile, seed_frac, refit_rounds")
    ap.add_argument("--time", type=float, default=None, metavar="B", help="also time the lowered fits at budget B")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the per-layer rows here")
    args = ap.parse_args(argv)
    print(provenance(getattr(args, "threads", None)), flush=True)  # results files name the commit, libraries and cores
    opts = fit_options(args.opts)
    torch.set_num_threads(args.threads)
    model, tok = zoo.load_minilm()
    layers = zoo.minilm_linears(model)[: args.limit]
    doc = zoo.docstring_sentences()
    random.Random(0).shuffle(doc)
    eng = zoo.english_sentences()
    random.Random(1).shuffle(eng)
    t0 = time.perf_counter()
    C = capture(model, tok, layers, {"cal": doc[:1024], "hold": doc[1024:1280], "holdB": eng[:256]})
    print(f"captured input statistics of {len(layers)} layers in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    rows = []
    for name, lin in layers:
        W = lin.weight.detach().double()
        for b in args.budgets:
            t0 = time.perf_counter()
            f = fit_inputs(W, C["cal"][name], b, **opts)
            sec = time.perf_counter() - t0
            s = whitened_svd_fit(W, C["cal"][name], b)
            row = {
                "name": name,
                "kind": kind(name),
                "budget": b,
                "seconds": sec,
                "blocks": f.num_components,
                "over_budget": f.flops() > b * W.numel(),
            }
            for key in ("cal", "hold", "holdB"):
                row[key] = output_error(W, f.dense(), C[key][name]) / output_error(W, s.dense(), C[key][name])
            if args.time is not None and abs(b - args.time) < 1e-9:
                row.update({f"time_{k}": v for k, v in lowered_time(W, {"gblr": f, "svd": s}, args.threads).items()})
                row["flop_ratio"] = f.flops() / W.numel()
            rows.append(row)
            print(
                f"{name:45s} b={b} held-out A {row['hold']:.4f} B {row['holdB']:.4f} {sec:.1f}s"
                + (f" time gblr {row['time_gblr']:.3f} svd {row['time_svd']:.3f}" if "time_gblr" in row else ""),
                file=sys.stderr,
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\nGBLR / whitened-SVD held-out output error, {len(layers)} MiniLM layers, options {opts or 'default'}\n")
    print("| budget | held-out A median (min, max) | held-out B median | GBLR < SVD (A) | over budget | median s/fit |")
    print("|---|---|---|---|---|---|")
    for b in args.budgets:
        rs = [r for r in rows if r["budget"] == b]
        a = [r["hold"] for r in rs]
        print(
            f"| {b:.1f} | {st.median(a):.4f} ({min(a):.3f}, {max(a):.3f}) | {st.median(r['holdB'] for r in rs):.4f} "
            f"| {sum(x < 1 for x in a)}/{len(a)} | {sum(r['over_budget'] for r in rs)} "
            f"| {st.median(r['seconds'] for r in rs):.1f} |"
        )
    print("\n| type | " + " | ".join(f"b={b:.1f}" for b in args.budgets) + " |")
    print("|---|" + "---|" * len(args.budgets))
    for _, kd in KINDS:
        cells = [
            st.median(r["hold"] for r in rows if r["budget"] == b and r["kind"] == kd)
            if any(r["kind"] == kd for r in rows)
            else float("nan")
            for b in args.budgets
        ]
        print(f"| {kd} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    timed = [r for r in rows if "time_gblr" in r]
    if timed:
        print(
            f"\nDefault `gblrc lower`, time / dense MatMul at budget {args.time} "
            f"(1024 tokens, {args.threads} thread(s))\n"
        )
        print("| | median | max | layers within FLOP ratio + 0.1 |")
        print("|---|---|---|---|")
        for k in ("gblr", "svd"):
            v = [r[f"time_{k}"] for r in timed]
            ok = sum(r[f"time_{k}"] <= r["flop_ratio"] + 0.1 for r in timed)
            print(
                f"| {'data-aware GBLR' if k == 'gblr' else 'whitened SVD'} | {st.median(v):.3f} | {max(v):.3f} "
                f"| {ok}/{len(timed)} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
