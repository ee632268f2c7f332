"""Initialisation on real weights: fit_dense vs truncated SVD on the 36 encoder Linear layers of MiniLM.

For every layer and budget: relative Frobenius error of fit_dense (GBLR) and of truncated SVD at the
same cost, the cost actually used, and the wall-clock and CPU seconds of fit_dense.  Prints one
markdown table (per budget: median / max GBLR/SVD error ratio, layers where GBLR < SVD strictly,
seconds per layer).  Exits non-zero if any ratio is above 1 or any layer is over budget.

    .venv/bin/python -m benchmarks.init_minilm [--budgets 0.2 0.4 0.6] [--threads 1] [--limit N]
"""

from __future__ import annotations

import argparse
import statistics as st
import sys
import time

import torch

from gblrc.nn.fit import relative_error
from gblrc.nn.layer import fit_dense, svd_layer
from gblrc.io.zoo import minilm_linears
from benchmarks.common import provenance  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads, also passed to fit_dense (default 1, fit_dense's default)",
    )
    ap.add_argument("--limit", type=int, default=None, help="only the first N layers (quick check)")
    args = ap.parse_args(argv)
    print(provenance(getattr(args, "threads", None)), flush=True)  # results files name the commit, libraries and cores
    torch.set_num_threads(args.threads)
    layers = minilm_linears()[: args.limit]
    rows = []
    for name, lin in layers:
        W = lin.weight.detach().double().numpy()
        for b in args.budgets:
            t0, c0 = time.perf_counter(), time.process_time()
            g = fit_dense(lin, b, threads=args.threads)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            with torch.no_grad():
                eg = relative_error(W, g.dense_weight().double().numpy())
                es = relative_error(W, svd_layer(lin, b).eval().dense_weight().double().numpy())
            shape = f"{lin.in_features}x{lin.out_features}"
            rows.append(
                dict(
                    name=name,
                    shape=shape,
                    budget=b,
                    eg=eg,
                    es=es,
                    ratio=eg / es,
                    cost=g.flops() / W.size,
                    wall=wall,
                    cpu=cpu,
                    K=g.num_components,
                    blocks=len(g.structure().structure.blocks),
                )
            )
            print(
                f"{name:45s} {shape:9s} b={b:.1f} gblr={eg:.4f} svd={es:.4f} ratio={eg / es:.4f} "
                f"cost={g.flops() / W.size:.4f} K={g.num_components} {wall:.2f}s (cpu {cpu:.2f}s)",
                file=sys.stderr,
                flush=True,
            )
    print(f"\nfit_dense vs truncated SVD, {len(layers)} MiniLM encoder layers, torch threads={args.threads}\n")
    print(
        "| budget | median GBLR/SVD | min | max | GBLR < SVD | max cost/dense | median s/layer (cpu) "
        "| s 384x1536 (cpu) | s 1536x384 (cpu) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    bad = 0
    for b in args.budgets:
        rs = [r for r in rows if r["budget"] == b]
        ratios = [r["ratio"] for r in rs]
        t = lambda sel, k: st.median([r[k] for r in sel]) if sel else float("nan")
        up, down = [r for r in rs if r["shape"] == "384x1536"], [r for r in rs if r["shape"] == "1536x384"]
        print(
            f"| {b:.1f} | {st.median(ratios):.4f} | {min(ratios):.4f} | {max(ratios):.4f} "
            f"| {sum(r['eg'] < r['es'] for r in rs)}/{len(rs)} | {max(r['cost'] for r in rs):.4f} "
            f"| {t(rs, 'wall'):.2f} ({t(rs, 'cpu'):.2f}) | {t(up, 'wall'):.2f} ({t(up, 'cpu'):.2f}) "
            f"| {t(down, 'wall'):.2f} ({t(down, 'cpu'):.2f}) |"
        )
        bad += sum(r["ratio"] > 1 or r["cost"] > b for r in rs)
    if bad:
        print(f"\nFAIL: {bad} fits worse than SVD or over budget", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
