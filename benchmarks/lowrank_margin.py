"""When is the stacked low-rank lowering (X @ V^T @ U^T) faster than the dense MatMul, and what does the
static cost model estimate?  Per layer shape and FLOP ratio: measured time / dense (ONNX Runtime CPU,
interleaved, best of 3 sessions' medians, same run) beside the cost model's estimate / dense, and which
lowering the default pipeline picks (DENSE_MARGIN).

    .venv/bin/python -m benchmarks.lowrank_margin [--threads 1 2] [--tokens 1024] [--ratios 0.4 ... 0.9]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from gblrc.ir.structure import Block, Span, Structure
from gblrc.passes.cost_model import DEFAULT_COST_MODEL
from gblrc.runtime.timing import best_of_sessions
from benchmarks.common import provenance  # noqa: E402

SHAPES = ((384, 384), (384, 1536), (1536, 384))  # (n_in, n_out): MiniLM's layers


def _model(mats: list[np.ndarray], n_in: int, n_out: int) -> bytes:
    """x (T, n_in) @ mats[0] @ mats[1] ... + bias."""
    inits, nodes, cur = [], [], "x"
    for i, m in enumerate(mats):
        inits.append(numpy_helper.from_array(m.astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"h{i}"]))
        cur = f"h{i}"
    inits.append(numpy_helper.from_array(np.zeros(n_out, np.float32), "b"))
    nodes.append(helper.make_node("Add", [cur, "b"], ["y"]))
    g = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", n_out])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    args = ap.parse_args(argv)
    print(provenance(getattr(args, "threads", None)), flush=True)  # results files name the commit, libraries and cores
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.tokens, max(s[0] for s in SHAPES))).astype(np.float32)
    cm = DEFAULT_COST_MODEL
    print(
        f"stacked low rank vs dense MatMul, {args.tokens} tokens, ORT CPU; model = static cost model "
        f"estimate / dense; picked = default lowering (stacked only below {cm.stacked_margin} x dense)\n"
    )
    print(
        "| shape in x out | FLOP ratio | rank | "
        + " | ".join(f"time/dense ({t} thr)" for t in args.threads)
        + " | model | picked |"
    )
    print("|---|---|---|" + "---|" * len(args.threads) + "---|---|")
    for n_in, n_out in SHAPES:
        dense = _model([rng.standard_normal((n_in, n_out))], n_in, n_out)
        for f in args.ratios:
            R = max(1, int(f * n_in * n_out / (n_in + n_out)))
            low = _model([rng.standard_normal((n_in, R)), rng.standard_normal((R, n_out))], n_in, n_out)
            cells = []
            for t in args.threads:
                tm = best_of_sessions(
                    {"dense": dense, "low": low}, {"x": x[:, :n_in]}, threads=t, repeats=15, sessions=3
                )
                cells.append(f"{tm.ratio('low', 'dense'):.3f}")
            s = Structure(n_in, n_out, (Block((Span(0, n_out),), (Span(0, n_in),), R),))
            est = cm.stacked(s, True) / cm.dense(s, True)
            picked = cm.best(s, True)[0]
            print(f"| {n_in}x{n_out} | {f:.2f} | {R} | " + " | ".join(cells) + f" | {est:.3f} | {picked} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
