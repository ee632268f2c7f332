"""Sweep of random GBLR structures: the default (static) and the tuned lowering, each timed against dense.

For --n random structures (layer shapes 384x384, 384->1536 and 1536->384; 1 to 64 blocks; ranks 1
to 96; row and column widths from a few entries to the full axis; placed at random (overlapping),
as disjoint grid tiles or as disjoint column bands; FLOP ratios from about 0.05 to 1) this lowers
the layer three ways -- dense (one MatMul), the default pipeline (static cost model) and the tuned
pipeline (`gblrc lower --tune`: calibrated cost model + per-layer timing, in a fresh cache) --
checks each against a float64 reference, and times them in this process on ONNX Runtime CPU,
interleaved, median of --repeats runs (inputs bound once, outputs preallocated, as the tuner
times).  It prints per structure the FLOP ratio beside the time ratios to dense, and at the end the
worst-case and the median time ratio of the default and of the tuned lowering.

Timings on a loaded machine are noise: run it on a quiet one.  --quick: 6 structures, 5 repeats
(checks that it runs).

Usage: python -m benchmarks.lowering_sweep [--n 48] [--seed 0] [--tokens 1024] [--threads N]
       [--repeats 15] [--quick] [--plain-run] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
import onnxruntime as ort

from benchmarks.common import test_helper  # noqa: E402

gblr_model = test_helper("_onnx_builders").gblr_model  # tests/_onnx_builders.py: a GBLRLinear node model from the IR

from gblrc.passes import PASSES, TuneConfig, run_pipeline, run_tuned_pipeline  # noqa: E402
from gblrc.passes.base import import_graph, read_gblr_node, run_passes  # noqa: E402
from gblrc.passes.choose_products import is_tile  # noqa: E402
from gblrc.passes.cost_model import DEFAULT_COST_MODEL  # noqa: E402
from gblrc.passes.lower_gblr import LowerGBLR  # noqa: E402
from gblrc.passes.timing import CPU, Runner, effective_threads, make_session, time_runs  # noqa: E402
from gblrc.ir.structure import Block, GBLRWeights, Structure, cyclic_spans  # noqa: E402
from benchmarks.common import provenance  # noqa: E402

SHAPES = ((384, 384), (384, 1536), (1536, 384))  # (n_in, n_out)
MODES = ("overlap", "grid", "bands")


def _loguniform(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _width_frac(rng):
    return 1.0 if rng.random() < 0.2 else _loguniform(rng, 1 / 48, 1.0)


def random_structure(rng: np.random.Generator, n_in: int, n_out: int) -> tuple[Structure, str]:
    """A random structure with a FLOP ratio in about [0.05, 1]; and a short description."""
    for _ in range(50):
        nb = max(1, min(64, int(round(_loguniform(rng, 1, 64)))))
        mode = MODES[int(rng.integers(len(MODES)))]
        fr, fc = _width_frac(rng), _width_frac(rng)
        spans = []
        if mode == "overlap":
            for _ in range(nb):
                wr = int(np.clip(round(fr * n_out * rng.uniform(0.7, 1.3)), 1, n_out))
                wc = int(np.clip(round(fc * n_in * rng.uniform(0.7, 1.3)), 1, n_in))
                spans.append(
                    (cyclic_spans(int(rng.integers(n_out)), wr, n_out), cyclic_spans(int(rng.integers(n_in)), wc, n_in))
                )
        elif mode == "grid":
            gr = int(math.ceil(math.sqrt(nb)))
            gc = int(math.ceil(nb / gr))
            cells = rng.choice(gr * gc, size=nb, replace=False)
            hr, hc = n_out // gr, n_in // gc
            for c in cells:
                i, j = divmod(int(c), gc)
                wr = max(1, int(round(hr * max(fr, rng.uniform(0.5, 1.0)))))
                wc = max(1, int(round(hc * max(fc, rng.uniform(0.5, 1.0)))))
                spans.append((cyclic_spans(i * hr, wr, n_out), cyclic_spans(j * hc, wc, n_in)))
        else:  # disjoint column bands, rows anywhere
            hc = n_in // nb if nb <= n_in else 1
            for j in range(nb):
                wr = int(np.clip(round(fr * n_out * rng.uniform(0.7, 1.3)), 1, n_out))
                spans.append(
                    (cyclic_spans(int(rng.integers(n_out)), wr, n_out), cyclic_spans(j * hc, max(1, hc), n_in))
                )
        target = _loguniform(rng, 0.05, 1.0)
        per_rank = sum(sum(len(s) for s in r) + sum(len(s) for s in c) for r, c in spans)
        r0 = target * n_in * n_out / per_rank
        blocks = tuple(Block(r, c, int(np.clip(round(r0 * rng.uniform(0.6, 1.4)), 1, 96))) for r, c in spans)
        s = Structure(n_in, n_out, blocks).validate()
        if 0.03 <= s.cost_ratio() <= 1.05:
            ranks = [b.rank for b in blocks]
            mr = np.mean([b.n_rows for b in blocks]) / n_out
            mc = np.mean([b.n_cols for b in blocks]) / n_in
            desc = (
                f"{mode}, {nb} x r{min(ranks)}{'' if min(ranks) == max(ranks) else '-' + str(max(ranks))}, "
                f"mean widths {mr:.2f} rows / {mc:.2f} cols"
            )
            return s, desc
    raise RuntimeError("could not draw a structure in the FLOP-ratio range")


def random_weights(rng: np.random.Generator, s: Structure) -> GBLRWeights:
    U = tuple(rng.standard_normal((b.n_rows, b.rank)) / math.sqrt(b.rank) for b in s.blocks)
    V = tuple(rng.standard_normal((b.rank, b.n_cols)) / math.sqrt(b.n_cols) for b in s.blocks)
    return GBLRWeights(s, U, V, rng.standard_normal(s.out_features)).validate()


def choice_of(results) -> str:
    for r in results:
        for k, v in r.counts.items():
            if k.startswith("lowered_") and v and not k.startswith("lowered_conv"):
                return k.removeprefix("lowered_")
        if r.counts.get("dense_layers"):
            return "dense"
    return "?"


def check(model, w: GBLRWeights, x: np.ndarray, threads: int, name: str) -> None:
    sess = make_session(model, CPU, threads)
    y = sess.run(None, {"X": x})[0]
    x64 = x.astype(np.float64)
    ref = w.apply(x64)
    scale = float(np.max(np.abs(x64) @ np.abs(w.dense()).T + np.abs(w.bias)))
    err = float(np.abs(y - ref).max() / scale)
    if not err <= 1e-5:
        raise AssertionError(f"{name}: relative error {err:.3g} against the float64 reference")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48, help="number of random structures")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=1024, help="rows of X")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: one per core)")
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per variant (median)")
    ap.add_argument("--sessions", type=int, default=3, help="fresh sessions per variant (best median counts)")
    ap.add_argument("--quick", action="store_true", help="6 structures, 5 repeats: checks that it runs")
    ap.add_argument(
        "--plain-run", action="store_true", help="time session.run (copies the output) instead of IO binding"
    )
    ap.add_argument("--cache-dir", help="tuning cache folder (default: a fresh temporary one, removed at the end)")
    a = ap.parse_args(argv)
    print(provenance(getattr(a, "threads", None)), flush=True)  # results files name the commit, libraries and cores
    if a.cache_dir:
        return sweep(a, a.cache_dir)
    with tempfile.TemporaryDirectory(prefix="gblrc-sweep-") as cache:
        return sweep(a, cache)


def sweep(a, cache: str) -> None:
    if a.quick:
        a.n, a.repeats = min(a.n, 6), min(a.repeats, 5)
    threads = effective_threads(a.threads)
    rng = np.random.default_rng(a.seed)
    config = TuneConfig(tokens=a.tokens, threads=threads, provider="cpu", cache=cache)
    x = np.random.default_rng(a.seed + 1).standard_normal((a.tokens, max(n for n, _ in SHAPES))).astype(np.float32)
    print(
        f"ONNX Runtime {ort.__version__} CPU, {threads} threads, X {a.tokens} rows; {a.n} structures, seed {a.seed}; "
        f"time ratio = median(variant) / median(dense) over {a.repeats} interleaved runs, best of {a.sessions} sessions"
        f"{' (session.run)' if a.plain_run else ' (IO binding)'}; tuning cache {cache}"
    )
    print(
        "| # | layer (out x in) | structure | FLOP ratio | dense ms | default (choice) | default's estimate | "
        "tuned (choice) | tuner's times vs dense | tune s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    t_start = time.perf_counter()
    for i in range(a.n):
        n_in, n_out = SHAPES[i % len(SHAPES)]
        s, desc = random_structure(rng, n_in, n_out)
        w = random_weights(rng, s)
        base = gblr_model(w)
        xi = np.ascontiguousarray(x[:, :n_in])
        dense, _ = run_passes(base, [LowerGBLR(force="dense"), PASSES["cleanup"]])
        default, dres = run_pipeline(base)
        decided = run_passes(base, [PASSES["merge-blocks"], PASSES["choose-products"]])[0]
        dw = read_gblr_node(import_graph(decided).nodes[0])
        tiles = frozenset(j for j, v in enumerate(dw.V) if is_tile(v))
        est_name, est = DEFAULT_COST_MODEL.best(dw.structure, True, tiles)
        est /= DEFAULT_COST_MODEL.dense(dw.structure, True)
        t0 = time.perf_counter()
        tuned, tres, setup = run_tuned_pipeline(base, config)
        tune_s = time.perf_counter() - t0
        if i == 0 and setup.calibration is not None:
            print(f"<!-- {setup.calibration.describe()} -->")
        variants = {"dense": dense, "default": default, "tuned": tuned}
        for k, m in variants.items():
            check(m, w, xi, threads, f"structure {i} {k}")
        # a session's speed on a shared machine is bimodal, fixed when it is created (the same MatMul
        # at 0.67 or 1.28 ms): best of a.sessions fresh sessions per variant
        med, low = {}, {}
        for _ in range(a.sessions):
            sessions = {}
            for k, m in variants.items():
                sess = make_session(m, CPU, threads)
                sessions[k] = (
                    (lambda sess=sess: sess.run(None, {"X": xi})) if a.plain_run else Runner(sess, {"X": xi}, CPU)
                )
            runs = time_runs(sessions, repeats=a.repeats, warmup=2)
            med = {k: min(float(np.median(v)), med.get(k, np.inf)) for k, v in runs.items()}
            low = {k: min(float(np.min(v)), low.get(k, np.inf)) for k, v in runs.items()}
        r_def, r_tun = med["default"] / med["dense"], med["tuned"] / med["dense"]
        rows.append((s.cost_ratio(), r_def, r_tun, low["default"] / low["dense"], low["tuned"] / low["dense"]))
        tt = [d for r in tres for d in r.details]
        cand = (
            ", ".join(
                f"{k} {v / tt[0]['times']['dense']:.2f}" for k, v in sorted(tt[0]["times"].items()) if k != "dense"
            )
            if tt and "dense" in tt[0]["times"]
            else "not timed"
        )
        print(
            f"| {i} | {n_out}x{n_in} | {desc} | {s.cost_ratio():.3f} | {1e3 * med['dense']:.2f} | "
            f"{r_def:.2f} ({choice_of(dres)}) | {est:.2f} ({est_name}) | {r_tun:.2f} ({choice_of(tres)}) | {cand} | "
            f"{tune_s:.1f} |",
            flush=True,
        )
    for name, col, mcol in (("default:", 1, 3), ("tuned:  ", 2, 4)):
        r = np.array([row[col] for row in rows])
        m = np.array([row[mcol] for row in rows])
        print(
            f"{name} worst time ratio {r.max():.2f}, median {np.median(r):.2f}, {int(np.sum(r > 1.05))} of {len(r)} "
            f"above 1.05 x dense (ratio of minimum times, less sensitive to other load: worst {m.max():.2f}, "
            f"median {np.median(m):.2f})"
        )
    print(f"({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
