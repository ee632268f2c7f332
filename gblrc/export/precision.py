"""Deployment precision for lowered ONNX models: fp16 (GPU) and int8 (CPU), with ONNX Runtime's own tools.

- :func:`to_fp16`: weights and compute in half precision with ONNX Runtime's float16 converter
  (``onnxruntime.transformers.float16``, the maintained copy of onnxconverter-common's), keeping the
  numerically sensitive ops -- LayerNormalization, Softmax, the reductions, Pow/Sqrt/Exp/Log -- in
  fp32 (Casts around them) and the graph's inputs and outputs in their original types, so the fp16
  model is a drop-in replacement for the fp32 one.
- :func:`quantize_int8`: ONNX Runtime quantisation of the MatMul/Gemm (and Conv) weights: dynamic
  (weights int8, activations quantised at run time; no data needed) or static QDQ (activation ranges
  calibrated on batches), per channel or per tensor.
- :func:`fidelity`: how close one model's outputs are to another's (max relative error, cosine).

No torch here.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx

from gblrc.errors import GblrcError
from gblrc.export.options import check_quant_mode
from gblrc.export.metadata import set_metadata

__all__ = [
    "FP32_OPS",
    "FP16_RTOL",
    "FP16_ATOL",
    "QUANT_OPS",
    "to_fp16",
    "quantize_int8",
    "quantize_checked",
    "quantizable_nodes",
    "OutputAgreement",
    "fidelity",
    "float_dtype_of",
]

# Ops kept in fp32 inside an fp16 model (numerically sensitive: normalisation, exponentials, reductions),
# plus Range, which has no fp16 kernel on the CUDA provider.
FP32_OPS = (
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "Pow",
    "Sqrt",
    "Exp",
    "Log",
    "Range",
)

# The parity gate of an fp16 model against PyTorch (float64): max|a - b| <= atol + rtol * max|b| per output.
# fp16 has a 2^-11 (~5e-4) relative rounding step; after a few layers of products that round their
# inputs and outputs, 1e-2 of the output's scale is what a correct fp16 graph meets (MiniLM: ~3e-3).
FP16_RTOL, FP16_ATOL = 1e-2, 1e-3

QUANT_OPS = ("MatMul", "Gemm", "Conv")
MASK_INPUT = "attention_mask"  # an input of this name marks padding positions: fidelity skips them


def float_dtype_of(model: onnx.ModelProto) -> str:
    """'fp16' when the model's weights are mostly float16, else 'fp32'."""
    counts = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
    for t in model.graph.initializer:
        if t.data_type in counts:
            counts[t.data_type] += int(np.prod(t.dims)) if t.dims else 1
    return "fp16" if counts[onnx.TensorProto.FLOAT16] > counts[onnx.TensorProto.FLOAT] else "fp32"


def to_fp16(model: onnx.ModelProto, *, keep_fp32: Sequence[str] = FP32_OPS) -> onnx.ModelProto:
    """A float16 copy of ``model`` (float32 weights and activations become float16), with the ops in
    ``keep_fp32`` computed in float32 and the graph inputs/outputs kept in their types."""
    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError as e:  # pragma: no cover - ships with onnxruntime
        raise GblrcError(f"the float16 converter (onnxruntime.transformers.float16) is not available ({e})") from None
    if not any(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer):
        raise GblrcError("the model has no float32 weights; nothing to convert to fp16")
    src = onnx.ModelProto()
    src.CopyFrom(model)
    with warnings.catch_warnings():  # "values clamped to the fp16 range" (attention masks' -3.4e38): expected
        warnings.simplefilter("ignore")
        out = convert_float_to_float16(
            src,
            keep_io_types=True,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(keep_fp32),
            disable_shape_infer=False,
        )
    from onnxruntime.transformers.onnx_model import OnnxModel

    om = OnnxModel(out)
    om.topological_sort()  # the converter appends the Casts of graph inputs at the end
    out = om.model
    set_metadata(out, {"gblrc.export.precision": "fp16"})
    return out


def quantizable_nodes(model: onnx.ModelProto, op_types: Iterable[str] = QUANT_OPS) -> list[str]:
    """Names (or op types) of the nodes whose weight is a float32 initializer: what int8 quantisation can change."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in op_types or len(n.input) < 2:
            continue
        w = inits.get(n.input[1])
        if w is not None and w.data_type == onnx.TensorProto.FLOAT and len(w.dims) >= 2:
            out.append(n.name or n.op_type)
    return out


class _Batches:
    """ORT CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - not called by the MinMax calibrator
        pass


def quantize_int8(
    model: onnx.ModelProto,
    *,
    mode: str = "dynamic",
    per_channel: bool = True,
    calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
    op_types: Sequence[str] = QUANT_OPS,
) -> onnx.ModelProto:
    """An int8 copy of the float32 ``model`` made by ONNX Runtime's quantiser.

    mode 'dynamic': weights int8 (per output channel when ``per_channel``), activations quantised at run
    time (MatMulInteger / DynamicQuantizeLinear; Conv through ConvInteger).  mode 'static': QDQ format,
    activation ranges from ``calibration`` (a list of feeds: input name -> array; MinMax), activations
    uint8, weights int8.  Only nodes of ``op_types`` with constant float32 weights are quantised;
    GblrcError when there are none.
    """
    check_quant_mode(str(mode))
    if float_dtype_of(model) != "fp32":
        raise GblrcError("int8 quantisation needs a float32 model (this one is fp16); quantise the fp32 model")
    targets = quantizable_nodes(model, op_types)
    if not targets:
        raise GblrcError(
            f"the model has nothing to quantise: no {'/'.join(op_types)} node with a constant float32 "
            "weight (int8 quantisation changes only those)"
        )
    check_quant_mode(mode, bool(calibration))
    extra = {"MatMulConstBOnly": True}
    if any(n.domain == "com.microsoft" for n in model.graph.node):
        # a graph fused by ONNX Runtime's transformer optimizer: the quantiser cannot infer the types of its
        # contrib ops' outputs (Attention, SkipLayerNormalization, ...); they are float32 here
        extra["DefaultTensorType"] = onnx.TensorProto.FLOAT
    # the quantiser works on files; ORT's pre-processing (shape inference) is part of its recommended flow
    with tempfile.TemporaryDirectory(prefix="gblrc-quant-") as d:
        src, dst = Path(d, "fp32.onnx"), Path(d, "int8.onnx")
        m = onnx.ModelProto()
        m.CopyFrom(model)
        try:
            m = onnx.shape_inference.infer_shapes(m)
        except Exception:  # pragma: no cover - shapes are a help to the quantiser, not a need
            pass
        onnx.save(m, os.fspath(src))
        _run_quantiser(src, dst, mode, per_channel, calibration, op_types, extra)
        out = onnx.load(os.fspath(dst))
    quantized = {
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeLinear",
        "QuantizeLinear",
        "DequantizeLinear",
        "QLinearMatMul",
        "QLinearConv",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
    }
    if not any(n.op_type in quantized for n in out.graph.node):
        raise GblrcError("ONNX Runtime's quantiser changed nothing in this model; nothing to quantise")
    set_metadata(out, {"gblrc.export.precision": f"int8-{mode}"})
    return out


def _run_quantiser(src: Path, dst: Path, mode: str, per_channel: bool, calibration, op_types, extra: dict) -> None:
    """ONNX Runtime's quantiser from file ``src`` to file ``dst`` (dynamic, or static QDQ calibrated on
    ``calibration``), its log advice and warnings silenced; its failures as GblrcError."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    logging.disable(logging.WARNING)  # the quantiser logs advice on the root logger ("consider pre-processing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "dynamic":
                quantize_dynamic(
                    src,
                    dst,
                    per_channel=per_channel,
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=list(op_types),
                    extra_options=dict(extra),
                )
            else:
                quantize_static(
                    src,
                    dst,
                    _Batches([dict(f) for f in calibration]),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=list(op_types),
                    extra_options=dict(extra),
                )
    except GblrcError:
        raise
    except Exception as e:
        raise GblrcError(
            f"ONNX Runtime quantisation failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    finally:
        logging.disable(logging.NOTSET)


@dataclass
class OutputAgreement:
    """Outputs of a model against a reference: over all outputs, the largest relative error (to each
    output's max |reference|), and the cosine similarity of rows (vectors along the last axis):
    mean and minimum; ``n`` rows compared."""

    max_rel: float
    cosine_mean: float
    cosine_min: float
    n: int

    def line(self) -> str:
        return (
            f"max rel error {self.max_rel:.3g}, cosine mean {self.cosine_mean:.4f} (min {self.cosine_min:.4f}) "
            f"over {self.n} rows"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def fidelity(
    outputs: Sequence[Sequence[np.ndarray]],
    reference: Sequence[Sequence[np.ndarray]],
    masks: Sequence[np.ndarray | None] | None = None,
) -> OutputAgreement:
    """The agreement over several runs: ``outputs[i]`` and ``reference[i]`` are the outputs of run i.

    masks[i] (optional, e.g. run i's attention mask): outputs whose leading dimensions are the mask's
    shape count only the rows where it is non-zero (padding positions hold no meaning to compare)."""
    max_rel, cos = 0.0, []
    for i, (outs, refs) in enumerate(zip(outputs, reference)):
        mask = None if masks is None else masks[i]
        for a, b in zip(outs, refs):
            a = np.asarray(a, np.float64)
            b = np.asarray(b, np.float64)
            if a.shape != b.shape:
                raise GblrcError(f"output shapes differ: {a.shape} vs {b.shape}")
            if mask is not None and a.ndim == mask.ndim + 1 and a.shape[:-1] == mask.shape:
                keep = np.asarray(mask) != 0
                a, b = a[keep], b[keep]
            if not np.all(np.isfinite(a)):
                return OutputAgreement(float("inf"), float("nan"), float("nan"), 0)
            scale = float(np.max(np.abs(b))) if b.size else 0.0
            err = float(np.max(np.abs(a - b))) if a.size else 0.0
            max_rel = max(max_rel, err / scale if scale > 0 else (0.0 if err == 0 else float("inf")))
            a2 = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
            b2 = b.reshape(-1, b.shape[-1]) if b.ndim else b.reshape(1, 1)
            na, nb = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
            ok = (na > 0) & (nb > 0)
            cos.extend(((a2[ok] * b2[ok]).sum(1) / (na[ok] * nb[ok])).tolist())
            cos.extend([1.0 if x == y else 0.0 for x, y in zip(na[~ok], nb[~ok])])
    if not cos:
        return OutputAgreement(max_rel, float("nan"), float("nan"), 0)
    return OutputAgreement(max_rel, float(np.mean(cos)), float(np.min(cos)), len(cos))


def _run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    from gblrc.runtime import make_session

    return make_session(model, log=False, exact=True).run(None, dict(feeds))


def quantize_checked(
    model: onnx.ModelProto,
    check: Sequence[Mapping[str, np.ndarray]],
    *,
    mode: str = "dynamic",
    per_channel: bool | str = "auto",
    calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> tuple[onnx.ModelProto, bool, OutputAgreement, dict]:
    """:func:`quantize_int8` with its fidelity to ``model`` measured on the feeds ``check``.

    per_channel "auto": quantise both ways and keep the one with the higher mean cosine (per-channel
    weight scales help some models and hurt others: on MiniLM they help the dense model and hurt the
    lowered one).  Rows at padding positions (``attention_mask`` 0) are not compared.  Returns (int8 model,
    per_channel used, its fidelity, {"on"/"off": mean cosine}).
    """
    base = [_run(model, f) for f in check]
    masks = [f.get(MASK_INPUT) for f in check]
    choices = [True, False] if per_channel == "auto" else [bool(per_channel)]
    best, candidates = None, {}
    for pc in choices:
        q = quantize_int8(model, mode=mode, per_channel=pc, calibration=calibration)
        try:
            fid = fidelity([_run(q, f) for f in check], base, masks)
        except GblrcError:
            raise
        except Exception as e:
            raise GblrcError(f"running the int8 model failed: {' '.join(str(e).split())[:300]}") from None
        candidates["on" if pc else "off"] = fid.cosine_mean
        if best is None or fid.cosine_mean > best[2].cosine_mean:
            best = (q, pc, fid)
    q, pc, fid = best
    if not np.isfinite(fid.max_rel):
        raise GblrcError("the int8 model gives non-finite outputs; no file written")
    return q, pc, fid, candidates
