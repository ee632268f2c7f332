"""Parity and latency of a lowered ONNX model against its dense ONNX export on the CUDA provider.

    python benchmarks/gpu_latency.py DENSE.onnx LOWERED.onnx [--repeats 50] [--cuda-graph]
    python benchmarks/gpu_latency.py DENSE.onnx LOWERED.onnx --provider cpu     # the same checks on CPU

Feeds: random token ids / floats of the models' static input shapes (symbolic dims: --dim N).  Parity:
the lowered model on the chosen provider against the same model on the CPU provider (max relative
error, must be <= --rtol).  Latency: I/O binding with inputs and outputs on the device (no host copies
in the timed loop), optionally CUDA graph capture (static shapes only), medians of --repeats runs,
sessions interleaved; prints the time ratio lowered / dense.  Exit status 1 when parity fails or the
provider is missing.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort


def feeds_for(path: str, dim: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for i in onnx.load(path, load_external_data=False).graph.input:
        t = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dim for d in t.shape.dim]
        if t.elem_type == onnx.TensorProto.INT64:
            out[i.name] = (np.ones(shape, np.int64) if "mask" in i.name else rng.integers(0, 1000, shape))
        else:
            out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def session(path: str, provider: str, cuda_graph: bool):
    so = ort.SessionOptions()
    if provider == "cuda":
        opts = {"enable_cuda_graph": "1"} if cuda_graph else {}
        return ort.InferenceSession(path, so, providers=[("CUDAExecutionProvider", opts)])
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


class Bound:
    """A session with its inputs and outputs bound on the device (CUDA) or host (CPU)."""

    def __init__(self, sess, feeds: dict, provider: str):
        self.sess, self.binding = sess, sess.io_binding()
        dev = "cuda" if provider == "cuda" else "cpu"
        self.vals = {k: ort.OrtValue.ortvalue_from_numpy(v, dev, 0) for k, v in feeds.items()}
        for k, v in self.vals.items():
            self.binding.bind_ortvalue_input(k, v)
        for o in sess.get_outputs():
            self.binding.bind_output(o.name, dev, 0)

    def run(self):
        self.sess.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()

    def outputs(self):
        return [o.numpy() for o in self.binding.get_outputs()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dense")
    ap.add_argument("lowered")
    ap.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--dim", type=int, default=128, help="size for symbolic input dims")
    ap.add_argument("--cuda-graph", action="store_true", help="capture a CUDA graph (static shapes only)")
    ap.add_argument("--rtol", type=float, default=1e-3)
    a = ap.parse_args()
    print(f"onnxruntime {ort.__version__}; available providers: {ort.get_available_providers()}")
    if a.provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        print("error: the CUDA provider is not available; install onnxruntime-gpu on a machine with a GPU")
        return 1
    feeds = feeds_for(a.lowered, a.dim)
    ref = session(a.lowered, "cpu", False).run(None, feeds)
    runs = {k: Bound(session(p, a.provider, a.cuda_graph), feeds, a.provider)
            for k, p in (("dense", a.dense), ("lowered", a.lowered))}
    for r in runs.values():
        r.run()  # warm-up (and CUDA graph capture)
    got = runs["lowered"].outputs()
    rel = max(float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30)) for g, r in zip(got, ref))
    times = {k: [] for k in runs}
    for _ in range(a.repeats):
        for k, r in runs.items():
            t = time.perf_counter()
            r.run()
            times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"parity ({a.provider} vs CPU, lowered model): max rel error {rel:.3g} (tolerance {a.rtol})")
    print(f"latency ({a.provider}, I/O binding{', CUDA graph' if a.cuda_graph else ''}, median of {a.repeats}): "
          f"dense {med['dense'] * 1e3:.3f} ms, lowered {med['lowered'] * 1e3:.3f} ms, "
          f"time ratio {med['lowered'] / med['dense']:.3f}")
    return 0 if rel <= a.rtol else 1


if __name__ == "__main__":
    sys.exit(main())
