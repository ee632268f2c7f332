#!/usr/bin/env bash
# GPU check (CUDA provider): parity and latency of a lowered GBLR model against its dense export.
#   bash benchmarks/gpu_check.sh            # on a machine with a GPU and onnxruntime-gpu
#   PROVIDER=cpu bash benchmarks/gpu_check.sh   # the same script on CPU (to try it anywhere)
# If /tmp/ortgpu.part* exist (the onnxruntime-gpu wheel split into parts), they are joined and installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
PROVIDER=${PROVIDER:-cuda}
if ls /tmp/ortgpu.part* >/dev/null 2>&1; then
  cat /tmp/ortgpu.part* > /tmp/onnxruntime_gpu-py3-none-any.whl
  "$PY" -m pip install -q --no-deps --force-reinstall /tmp/onnxruntime_gpu-py3-none-any.whl
fi
"$PY" -c "import gblrc" 2>/dev/null || "$PY" -m pip install -q --no-deps -e .
mkdir -p out/gpu
# A stack of MiniLM-shaped FFN layers (384 -> 1536 -> 384, x 4), GBLR at budget 0.4 (initialised from
# the dense weights), exported dense and lowered, on 8 x 128 tokens.
"$PY" - <<'PY'
import torch
from torch import nn
import gblrc
from gblrc.export import export_onnx

torch.manual_seed(0)
layers = []
for _ in range(4):
    layers += [nn.Linear(384, 1536), nn.GELU(), nn.Linear(1536, 384), nn.GELU()]
model = nn.Sequential(*layers, nn.Linear(384, 8)).eval()
x = torch.randn(8, 128, 384)
export_onnx(model, x, "out/gpu/dense.onnx", dynamic_axes={})
cm, rep = gblrc.compress(model, 0.4, progress=False)
lr = gblrc.lower(cm, x, "out/gpu/lowered.onnx", dynamic_axes={})
print(f"compressed: cost ratio {rep['achieved_ratio']:.3f}; {lr.parity_line()}")
PY
"$PY" benchmarks/gpu_latency.py out/gpu/dense.onnx out/gpu/lowered.onnx --provider "$PROVIDER" --repeats 50
if [ "$PROVIDER" = cuda ]; then
  "$PY" benchmarks/gpu_latency.py out/gpu/dense.onnx out/gpu/lowered.onnx --provider cuda --repeats 50 --cuda-graph
fi
