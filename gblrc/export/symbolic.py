"""ONNX symbolics that the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) lacks but
models gblrc meets need.

* ``aten::diff`` — Hugging Face transformers (5.x) calls ``torch.diff`` on the position ids when a
  decoder (GPT-2, ...) is called without an ``attention_mask`` (``masking_utils.
  find_packed_sequence_indices``), so exporting such a model with ``input_ids`` alone failed with
  "Exporting the operator 'aten::diff' to ONNX opset version 17 is not supported".  Lowered to
  Concat (prepend/append) + Slice + Sub, ``n`` times.
* ``aten::cumsum`` on a bool tensor (the same function: ``(diff != 1).cumsum(-1)``) — the built-in
  symbolic emits CumSum on bool, which ONNX does not allow; cast to int64 first (torch's result type),
  or to the requested ``dtype``.

:func:`register` is idempotent; :func:`gblrc.export.lowering.lower` calls it before exporting.
"""

from __future__ import annotations

import torch

__all__ = ["register"]

_DONE: set[int] = set()
_INT64_MAX = 9223372036854775807


def _diff_symbolic():
    from torch.onnx import symbolic_helper as sh

    @sh.parse_args("v", "i", "i", "v", "v")
    def diff(g, x, n, dim, prepend, append):
        parts = [p for p in (prepend, x, append) if not sh._is_none(p)]
        y = g.op("Concat", *parts, axis_i=dim) if len(parts) > 1 else x

        def const(v):
            return g.op("Constant", value_t=torch.tensor([v], dtype=torch.int64))

        axes = const(dim)
        for _ in range(n):
            hi = g.op("Slice", y, const(1), const(_INT64_MAX), axes)
            lo = g.op("Slice", y, const(0), const(-1), axes)
            y = g.op("Sub", hi, lo)
        return y

    return diff


def _cumsum_symbolic():
    from torch.onnx import symbolic_helper as sh

    # torch ScalarType code -> ONNX TensorProto type: int32, int64, float16, float32, float64
    onnx_type = {3: 6, 4: 7, 5: 10, 6: 1, 7: 11}

    @sh.parse_args("v", "i", "none")
    def cumsum(g, x, dim, dtype):
        axis = g.op("Constant", value_t=torch.tensor(dim, dtype=torch.int64))
        to = None
        if dtype is not None and not sh._is_none(dtype):
            code = sh._get_const(dtype, "i", "dtype")
            to = onnx_type.get(code)
            if to is None:
                try:
                    from torch.onnx._internal.torchscript_exporter._type_utils import JitScalarType
                except ImportError:  # older torch
                    from torch.onnx._type_utils import JitScalarType
                to = int(JitScalarType(code).onnx_type())
        elif x.type().scalarType() in ("Bool", "Byte", "Char", "Short"):
            to = 7  # torch sums booleans and small integers as int64
        return g.op("CumSum", g.op("Cast", x, to_i=to) if to is not None else x, axis)

    return cumsum


def register(opset: int = 17) -> None:
    """Register the missing symbolics for ``opset`` (once per opset)."""
    opset = int(opset)
    if opset in _DONE:
        return
    torch.onnx.register_custom_op_symbolic("aten::diff", _diff_symbolic(), opset)
    torch.onnx.register_custom_op_symbolic("aten::cumsum", _cumsum_symbolic(), opset)
    _DONE.add(opset)
