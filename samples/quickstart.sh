#!/usr/bin/env bash
# The built-in example, end to end: compress the digits MLP to 40% of its dense multiply-adds,
# lower it to a standard-ops ONNX graph (parity-checked against PyTorch), and show its structure.
set -euo pipefail
cd "$(dirname "$0")/.."
GBLRC=${GBLRC:-.venv/bin/gblrc}
mkdir -p out
"$GBLRC" compress samples/digits_mlp.pt --budget 0.4 --data samples/digits_data.pt -o out/digits.gblr.pt
"$GBLRC" lower out/digits.gblr.pt -o out/digits.onnx
"$GBLRC" inspect out/digits.onnx
echo "outputs: out/digits.gblr.pt (+ .report.json, .structure.png), out/digits.onnx"
