"""Does a block-sparse FFN pair run at its cost?  MiniLM's FFN (384 -> 1536, GELU, 1536 -> 384) pruned to k of
its 1536 neurons (``gblrc.learn.neurons.pruned_pair``: two block-sparse GBLR layers) and lowered by the default
pipeline (narrow-pairs: one MatMul per matrix on the kept slice), timed on ONNX Runtime against the dense pair
exported beside it (``gblrc.lower(..., with_dense=...)``: the same graph with every GBLR layer as its dense
MatMul), in the same run: interleaved runs, the best of 3 sessions' medians.  Issue 28's bar: lowered time /
dense <= the cost ratio k / 1536 + 0.05.

    .venv/bin/python -m benchmarks.block_sparse_speed [--threads 1] [--tokens 1024] [--ratios 0.3 0.5 0.7 0.9]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import provenance


def _pair(d: int, f: int, keep: int, seed: int = 0) -> tuple[nn.Module, float]:
    """(the pruned pair as a module, its cost ratio) from a random dense pair and random inputs."""
    from gblrc.learn.neurons import pruned_pair

    torch.manual_seed(seed)
    up, act, down = nn.Linear(d, f), nn.GELU(), nn.Linear(f, d)
    a = act(up(torch.randn(4096, d))).detach().double()
    gu, gd, _ = pruned_pair(up, down, a.t() @ a / a.shape[0], a.mean(0), keep)
    m = nn.Sequential(gu, act, gd).eval()
    return m, (gu.flops() + gd.flops()) / (gu.dense_flops() + gd.dense_flops())


def main(argv=None) -> int:
    from gblrc import lower
    from gblrc.runtime.timing import best_of_sessions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--f", type=int, default=1536)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(provenance(args.threads), flush=True)
    print(
        f"FFN {args.d} -> {args.f} -> {args.d} (GELU), {args.tokens} tokens, ORT CPU, {args.threads} thread(s): "
        "the pruned pair lowered by the default pipeline / the dense pair (same run)\n"
    )
    print("| kept neurons | cost ratio | time / dense | bar (cost + 0.05) | MatMul weights |")
    print("|---|---|---|---|---|")
    x = torch.randn(1, args.tokens, args.d)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for r in args.ratios:
            keep = max(1, int(r * args.f))
            m, cost = _pair(args.d, args.f, keep)
            low, dense = Path(tmp) / "low.onnx", Path(tmp) / "dense.onnx"
            lower(m, OrderedDict(x=x), low, with_dense=dense)
            import onnx

            g = onnx.load(low).graph
            dims = {i.name: tuple(i.dims) for i in g.initializer}
            mats = [dims.get(n.input[1]) for n in g.node if n.op_type == "MatMul"]
            t = best_of_sessions(
                {"low": low.read_bytes(), "dense": dense.read_bytes()},
                {"x": x.numpy()},
                threads=args.threads,
                repeats=15,
                sessions=3,
            )
            ratio = t.ratio("low", "dense")
            ok = ok and ratio <= cost + 0.05
            print(f"| {keep} | {cost:.3f} | {ratio:.3f} | {'met' if ratio <= cost + 0.05 else 'NOT met'} | {mats} |")
    print(f"\nbar (every ratio): {'met' if ok else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
