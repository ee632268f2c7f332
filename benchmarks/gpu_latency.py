"""Parity and latency of a lowered ONNX model against its dense ONNX export on the CUDA provider.

    python -m benchmarks.gpu_latency DENSE.onnx LOWERED.onnx [--repeats 50] [--cuda-graph]
    python -m benchmarks.gpu_latency DENSE.onnx LOWERED.onnx --provider cpu     # the same checks on CPU

Feeds: `gblrc bench`'s (gblrc.export.bench.make_feeds) at the models' static shapes (symbolic dims: --dim N).
Parity: the lowered model's outputs from the timed session on the chosen provider against the same
model on the CPU provider (max relative error, must be <= --rtol; an fp16 model is compared with its own
CPU run, so use --rtol 1e-2 for fp16).  Latency: gblrc.runtime.timing (the timing harness of `gblrc bench`
and the tuner): I/O binding with inputs and outputs on the device, optionally CUDA graph capture (static
shapes only), medians of --repeats interleaved runs, best of --sessions fresh sessions; prints the time
ratio lowered / dense.  Exit status 1 when parity fails or the provider is missing.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
import onnxruntime as ort

from gblrc.export.bench import graph_inputs, make_feeds
from gblrc.runtime.timing import CPU, CUDA, best_of_sessions, timing_session
from benchmarks.common import provenance  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dense")
    ap.add_argument("lowered")
    ap.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (CPU provider; 0: one per core)")
    ap.add_argument("--dim", type=int, default=128, help="size for symbolic input dims")
    ap.add_argument("--cuda-graph", action="store_true", help="capture a CUDA graph (static shapes only)")
    ap.add_argument("--rtol", type=float, default=1e-3)
    a = ap.parse_args()
    print(provenance(getattr(a, "threads", None)), flush=True)  # results files name the commit, libraries and cores
    print(f"onnxruntime {ort.__version__}; available providers: {ort.get_available_providers()}")
    if a.provider == "cuda" and CUDA not in ort.get_available_providers():
        print("error: the CUDA provider is not available; install onnxruntime-gpu on a machine with a GPU")
        return 1
    provider = CUDA if a.provider == "cuda" else CPU
    low = onnx.load(a.lowered)
    shapes = {s.name: [d if isinstance(d, int) and d > 0 else a.dim for d in s.dims] for s in graph_inputs(low)}
    feeds = make_feeds(low, shapes)
    ref = timing_session(low, CPU, a.threads or None).run(None, dict(feeds))
    t = best_of_sessions(
        {"dense": a.dense, "lowered": a.lowered},
        feeds,
        provider=provider,
        threads=a.threads or None,
        repeats=a.repeats,
        sessions=a.sessions,
        cuda_graph=a.cuda_graph,
        keep_outputs=True,
    )
    got = t.outputs["lowered"]
    rel = max(float(np.abs(g.astype(np.float64) - r).max() / max(np.abs(r).max(), 1e-30)) for g, r in zip(got, ref))
    print(f"parity ({a.provider} vs CPU, lowered model): max rel error {rel:.3g} (tolerance {a.rtol})")
    print(
        f"latency ({a.provider}, I/O binding{', CUDA graph' if a.cuda_graph else ''}, medians of {a.repeats} "
        f"interleaved runs, best of {a.sessions} sessions): dense {t.best['dense'] * 1e3:.3f} ms, "
        f"lowered {t.best['lowered'] * 1e3:.3f} ms, time ratio {t.ratio('lowered', 'dense'):.3f}"
    )
    return 0 if rel <= a.rtol else 1


if __name__ == "__main__":
    sys.exit(main())
