#!/usr/bin/env bash
# GPU check (CUDA provider): parity and latency of lowered GBLR models against their dense exports,
# in fp32 and fp16, with I/O binding, and with CUDA graph capture.
#   bash benchmarks/gpu_check.sh            # on a machine with a GPU and onnxruntime-gpu
#   PROVIDER=cpu bash benchmarks/gpu_check.sh   # the same script on CPU (to try it anywhere)
#   MINILM=0 REPEATS=5 bash benchmarks/gpu_check.sh   # skip the MiniLM part, fewer timed runs
# If /tmp/ortgpu.part* exist (the onnxruntime-gpu wheel split into parts), they are joined and installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
PROVIDER=${PROVIDER:-cuda}
MINILM=${MINILM:-1}
REPEATS=${REPEATS:-50}
if ls /tmp/ortgpu.part* >/dev/null 2>&1; then
  cat /tmp/ortgpu.part* > /tmp/onnxruntime_gpu-py3-none-any.whl
  "$PY" -m pip install -q --no-deps --force-reinstall /tmp/onnxruntime_gpu-py3-none-any.whl
fi
"$PY" -c "import gblrc" 2>/dev/null || "$PY" -m pip install -q --no-deps -e .
mkdir -p out/gpu
# 1. A stack of MiniLM-shaped FFN layers (384 -> 1536 -> 384, x 4), GBLR at budget 0.4 (initialised from
#    the dense weights), exported dense and lowered, fp32 and fp16, static shapes (8 x 128 tokens).
# 2. MiniLM itself (all 36 encoder layers low rank at budget 0.4, truncated SVD: speed, not accuracy),
#    lowered with its dense reference (`--with-dense`), fp32 and fp16, static 8 x 128 tokens; the attention
#    form (eager / SDPA) chosen by timing on the provider (`lower`'s default, attention="auto").
# 3. The same model through ONNX Runtime's transformer optimizer (`lower --optimize`: SkipLayerNormalization,
#    BiasGelu, and Attention in the blocks where dense Q/K/V/O + the fused kernel time faster on the provider),
#    with its dense reference optimized the same way, fp32 and fp16: the fused forms against the dense fused
#    model and against the plain lowered graph.
MINILM="$MINILM" "$PY" - <<'PY'
import os
import warnings

import onnx
import torch
from torch import nn

import gblrc
from gblrc.export.graph import export_onnx
from gblrc.export.precision import to_fp16

torch.manual_seed(0)
layers = []
for _ in range(4):
    layers += [nn.Linear(384, 1536), nn.GELU(), nn.Linear(1536, 384), nn.GELU()]
model = nn.Sequential(*layers, nn.Linear(384, 8)).eval()
x = torch.randn(8, 128, 384)
export_onnx(model, x, "out/gpu/ffn_dense.onnx", dynamic_axes={})
onnx.save(to_fp16(onnx.load("out/gpu/ffn_dense.onnx")), "out/gpu/ffn_dense16.onnx")
cm, rep = gblrc.compress(model, 0.4, progress=False)
for p in ("fp32", "fp16"):
    lr = gblrc.lower(cm, x, f"out/gpu/ffn_lowered{'16' if p == 'fp16' else ''}.onnx", dynamic_axes={}, precision=p)
    print(f"FFN stack {p}: cost ratio {rep['achieved_ratio']:.3f}; {lr.parity_line()}", *lr.precision_lines())
if os.environ.get("MINILM") == "1":
    try:
        from gblrc.io.zoo import load_minilm
        dense, tok = load_minilm()
    except Exception as e:  # the model package is optional
        print(f"MiniLM skipped: {e}")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm, rep = gblrc.compress(dense, 0.4, steps=0, progress=False, init="svd", structure="lowrank",
                                     allocate="uniform", include=r"^encoder\.")
        enc = tok(["A sentence for the GPU check."] * 8, padding="max_length", max_length=128, return_tensors="pt")
        ex = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        for p in ("fp32", "fp16"):
            s = "16" if p == "fp16" else ""
            lr = gblrc.lower(cm, ex, f"out/gpu/minilm_lowered{s}.onnx", dynamic_axes={}, precision=p,
                             with_dense=f"out/gpu/minilm_dense{s}.onnx")
            print(f"MiniLM {p}: cost ratio {rep['achieved_ratio']:.3f}; {lr.attention.line()}; {lr.parity_line()}",
                  *lr.precision_lines())
        for p in ("fp32", "fp16"):
            s = "16" if p == "fp16" else ""
            try:
                lr = gblrc.lower(cm, ex, f"out/gpu/minilm_opt{s}.onnx", dynamic_axes={}, precision=p, optimize=True,
                                 with_dense=f"out/gpu/minilm_opt_dense{s}.onnx")
            except Exception as e:  # report and go on: the other checks still run
                print(f"MiniLM --optimize {p} failed: {e}")
                continue
            print(f"MiniLM --optimize {p}: {lr.parity_line()}", *lr.precision_lines(), *lr.fusion.lines(), sep="\n  ")
PY
run() {  # name dense lowered rtol
  echo "== $1"
  "$PY" -m benchmarks.gpu_latency "$2" "$3" --provider "$PROVIDER" --repeats "$REPEATS" --rtol "$4"
  if [ "$PROVIDER" = cuda ]; then
    "$PY" -m benchmarks.gpu_latency "$2" "$3" --provider cuda --repeats "$REPEATS" --rtol "$4" --cuda-graph
  fi
}
run "FFN stack fp32" out/gpu/ffn_dense.onnx out/gpu/ffn_lowered.onnx 1e-3
run "FFN stack fp16" out/gpu/ffn_dense16.onnx out/gpu/ffn_lowered16.onnx 1e-2
if [ -f out/gpu/minilm_lowered.onnx ]; then
  run "MiniLM fp32" out/gpu/minilm_dense.onnx out/gpu/minilm_lowered.onnx 1e-3
  run "MiniLM fp16" out/gpu/minilm_dense16.onnx out/gpu/minilm_lowered16.onnx 1e-2
fi
for s in "" 16; do  # the optimizer-fused forms (3.): first against the dense fused model, then 'dense' = plain lowered
  tol=1e-3; [ -n "$s" ] && tol=1e-2
  if [ -f "out/gpu/minilm_opt$s.onnx" ]; then
    run "MiniLM --optimize fp${s:-32} vs dense --optimize" "out/gpu/minilm_opt_dense$s.onnx" "out/gpu/minilm_opt$s.onnx" "$tol"
    run "MiniLM --optimize fp${s:-32} vs plain lowered ('dense' = lowered without --optimize)" \
      "out/gpu/minilm_lowered$s.onnx" "out/gpu/minilm_opt$s.onnx" "$tol"
  fi
done
# 4. Training on the GPU: `gblrc compress --device` on the built-in digits MLP (300 steps), fp32 and bf16
#    autocast, against the same run on the CPU; prints each run's wall time, cost ratio and held-out accuracy.
TRAIN=${TRAIN:-1}
if [ "$TRAIN" = 1 ]; then
  devs="cpu"
  [ "$PROVIDER" = cuda ] && devs="cpu cuda"
  for dev in $devs; do
    for mp in no bf16; do
      [ "$dev" = cpu ] && [ "$mp" = bf16 ] && continue
      echo "== compress --device $dev --mixed-precision $mp"
      TIMEFORMAT="   wall %R s"
      time "$PY" -c "from gblrc.cli import main; main()" compress samples/digits_mlp.pt --budget 0.4 \
        --data samples/digits_data.pt --steps 300 --device "$dev" --mixed-precision "$mp" -q \
        -o "out/gpu/digits_${dev}_${mp}.gblr.pt" | tail -n 3
    done
  done
fi
