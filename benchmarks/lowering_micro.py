"""Per-layer latency of each lowering strategy vs the dense MatMul on ONNX Runtime CPU.

x: TOKENS x 384, W: 1536 x 384 (a MiniLM FFN layer).  For each structure it prints the FLOP
ratio and the time ratio to dense (median of interleaved runs; the last column: ratio of minimum
times, less sensitive to other load) of every strategy (each after merge-blocks and choose-products)
and of the default pipeline's choice.  Every variant is checked against a float64 reference first.
Usage: python -m benchmarks.lowering_micro [--tokens 1024] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnxruntime as ort

from benchmarks.common import test_helper  # noqa: E402

gblr_model = test_helper("_onnx_builders").gblr_model  # tests/_onnx_builders.py: a GBLRLinear node model from the IR

from gblrc.passes import PASSES, TIMED_PIPELINE, run_pipeline  # noqa: E402
from gblrc.passes.base import import_graph, read_gblr_node, run_passes  # noqa: E402
from gblrc.passes.choose_products import is_tile  # noqa: E402
from gblrc.passes.cost_model import DEFAULT_COST_MODEL  # noqa: E402
from gblrc.passes.lower_gblr import LowerGBLR  # noqa: E402
from gblrc.runtime import timing  # noqa: E402
from gblrc.ir.structure import Block, GBLRWeights, Span, Structure, cyclic_spans  # noqa: E402
from benchmarks.common import provenance  # noqa: E402

N_IN, N_OUT = 384, 1536


def weights(blocks, seed=0):
    rng = np.random.default_rng(seed)
    s = Structure(N_IN, N_OUT, tuple(blocks)).validate()
    return GBLRWeights(
        s,
        tuple(rng.standard_normal((b.n_rows, b.rank)) for b in s.blocks),
        tuple(rng.standard_normal((b.rank, b.n_cols)) for b in s.blocks),
        rng.standard_normal(N_OUT),
    )


def random_blocks(n_blocks, rank, frac, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_blocks):
        rows = cyclic_spans(int(rng.integers(0, N_OUT)), int(frac * N_OUT), N_OUT)
        cols = cyclic_spans(int(rng.integers(0, N_IN)), int(frac * N_IN), N_IN)
        out.append(Block(rows, cols, rank))
    return out


STRUCTURES = {
    "1 x r96 full width": [Block((Span(0, N_OUT),), (Span(0, N_IN),), 96)],
    "4 x r24 half width": random_blocks(4, 24, 0.5, 1),
    "8 x r24 half width": random_blocks(8, 24, 0.5, 2),
    "16 x r12 half width": random_blocks(16, 12, 0.5, 3),
    "32 x r6 quarter width": random_blocks(32, 6, 0.25, 4),
    "96 x r1 half width": random_blocks(96, 1, 0.5, 5),
    "128 x r1 quarter width": random_blocks(128, 1, 0.25, 6),
    "8 x r48 quarter width": random_blocks(8, 48, 0.25, 7),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    print(provenance(getattr(a, "threads", None)), flush=True)  # results files name the commit, libraries and cores
    x = np.random.default_rng(0).standard_normal((a.tokens, N_IN)).astype(np.float32)
    print(
        f"ORT {ort.__version__} CPU, {a.threads} threads, x {a.tokens}x{N_IN}, W {N_OUT}x{N_IN}; "
        f"time ratio = median(variant) / median(dense), {a.repeats} interleaved runs"
    )
    print(
        "| structure | FLOP ratio | dense ms | stacked | sliced | default (choice, ops, blocks after merge) "
        "| default, min-time ratio | model's estimate | lower-timed (choice) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for name, blocks in STRUCTURES.items():
        w = weights(blocks)
        base = gblr_model(w)
        variants = {"dense": run_passes(base, [LowerGBLR(force="dense"), PASSES["cleanup"]])[0]}
        for s in ("stacked", "sliced"):
            variants[s] = run_passes(
                base, [PASSES["merge-blocks"], PASSES["choose-products"], LowerGBLR(force=s), PASSES["cleanup"]]
            )[0]
        decided = run_passes(base, [PASSES["merge-blocks"], PASSES["choose-products"]])[0]
        dw = read_gblr_node(import_graph(decided).nodes[0])
        tiles = frozenset(i for i, v in enumerate(dw.V) if is_tile(v))
        est = DEFAULT_COST_MODEL.best(dw.structure, True, tiles)[1] / DEFAULT_COST_MODEL.dense(dw.structure, True)
        default, res = run_pipeline(base)
        variants["timed"], tres = run_pipeline(base, list(TIMED_PIPELINE))
        tchoice = [
            k.replace("lowered_", "") for r in tres for k, v in r.counts.items() if k.startswith("lowered_") and v
        ]
        tchoice = tchoice[0] if tchoice else "dense"
        variants["default"] = default
        choice = [k.replace("lowered_", "") for r in res for k, v in r.counts.items() if k.startswith("lowered_") and v]
        choice = choice or (["dense"] if any(r.counts.get("dense_layers") for r in res) else ["?"])
        sess = {k: timing.timing_session(m, timing.CPU, a.threads) for k, m in variants.items()}
        ref = w.apply(x.astype(np.float64))
        for k, s in sess.items():
            err = np.abs(s.run(None, {"X": x})[0] - ref).max() / np.abs(ref).max()
            assert err < 1e-5, (name, k, err)
        times = timing.time_runs({k: timing.Runner(s, {"X": x}) for k, s in sess.items()}, repeats=a.repeats, warmup=1)
        med = {k: float(np.median(v)) for k, v in times.items()}
        r = {k: med[k] / med["dense"] for k in med}
        best = {k: float(np.min(v)) for k, v in times.items()}
        rmin = {k: best[k] / best["dense"] for k in best}
        worst = max(worst, r["default"])
        ops = sum(1 for _ in default.graph.node)
        print(
            f"| {name} | {w.structure.cost_ratio():.3f} | {1e3 * med['dense']:.2f} | {r['stacked']:.2f} | "
            f"{r['sliced']:.2f} | {r['default']:.2f} ({choice[0]}, {ops} ops, {len(dw.structure.blocks)} blocks) | "
            f"{rmin['default']:.2f} | {min(est, 1.0):.2f} | {r['timed']:.2f} ({tchoice}) |"
        )
    print(f"worst default time ratio: {worst:.2f}")


if __name__ == "__main__":
    main()
