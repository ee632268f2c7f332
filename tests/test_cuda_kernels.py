"""Every op in gblrc's lowered graphs, fp32 and fp16, has a CUDA provider kernel for its types and opset.

No GPU is needed: the kernels are ONNX Runtime's documented registrations for the CUDA provider
(docs/OperatorKernels.md, "Operators implemented by CUDAExecutionProvider", microsoft/onnxruntime at
001d12d2623fd411ce0f83d05abb5e82304a3389), kept below as (op, domain) -> (first opset of the
registrations that reach the latest opset, the element types they accept).  The graphs are the
lowerings themselves (each linear strategy, both conv strategies) and whole models lowered by
`gblrc.lower` (an MLP with LayerNorm/GELU/Softmax, a small BERT with attention masks), each in fp32
and fp16 (`--precision fp16`).  Where this ONNX Runtime has the CUDA provider, a last test also
creates CUDA sessions that refuse CPU fallback.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

import gblrc
from _onnx_builders import gblr_model, random_weights
from gblrc.passes import PASSES
from gblrc.passes.base import run_passes
from gblrc.passes.lower_gblr import LowerGBLR
from gblrc.passes.lower_gblr_conv import LowerGBLRConv
from gblrc.export.precision import to_fp16

pytestmark = pytest.mark.usefixtures("one_thread")

F, H, D, BF = "float", "float16", "double", "bfloat16"
INTS = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
ALL = {F, H, D, BF, "bool"} | INTS
# (op, domain) -> (first opset, element types), ai.onnx domain, CUDAExecutionProvider (see the module docstring)
CUDA_KERNELS = {
    "Add": (7, {F, H, D, BF} | INTS),
    "Sub": (7, {F, H, D, BF} | INTS),
    "Mul": (7, {F, H, D, BF} | INTS),
    "Div": (7, {F, H, D, BF} | INTS),
    "Neg": (6, {F, H, D, BF, "int8", "int16", "int32", "int64"}),
    "Sum": (6, {F, H, D, BF}),
    "Sqrt": (6, {F, H, D, BF}),
    "Pow": (7, {F, H, D, BF, "int32", "int64"}),
    "Erf": (9, {F, H, D, BF}),
    "Tanh": (6, {F, H, D, BF}),
    "Sigmoid": (6, {F, H, D, BF}),
    "Relu": (6, {F, H, D, BF}),
    "MatMul": (1, {F, H, D, BF}),
    "Gemm": (7, {F, H, D, BF}),
    "Conv": (1, {F, H, D, BF}),
    "Softmax": (1, {F, H, D, BF}),
    "LayerNormalization": (17, {F, H, D, BF}),
    "ReduceMean": (1, {F, H, D, "int32"}),
    "ReduceSum": (1, {F, H, D, BF, "int32", "int64"}),
    "Cast": (6, ALL),
    "Concat": (4, ALL),
    "Slice": (1, ALL),
    "Reshape": (5, ALL),
    "Transpose": (1, ALL),
    "Unsqueeze": (1, ALL),
    "Squeeze": (1, ALL),
    "Shape": (1, ALL),
    "Gather": (1, ALL),
    "Expand": (8, ALL),
    "Flatten": (1, ALL),
    "Identity": (1, ALL),
    "Split": (2, ALL),
    "GatherElements": (11, ALL),
    "ConstantOfShape": (9, ALL),
    "Where": (9, {"bool", F, H, D, BF, "int32", "int64", "uint8"}),
    "Equal": (11, {"bool", F, H, D, "int32", "int64", "uint32", "uint64"}),
    "Less": (9, {"bool", F, H, D, "int32", "int64", "uint32", "uint64"}),
    "Greater": (9, {"bool", F, H, D, "int32", "int64", "uint32", "uint64"}),
    "GreaterOrEqual": (12, {"bool", F, H, D, "int32", "int64", "uint32", "uint64"}),
    "And": (7, {"bool"}),
    "Or": (7, {"bool"}),
    "Not": (1, {"bool"}),
    "IsNaN": (9, {"bool", F, H, D, BF}),
    "Range": (11, {F, D, "int16", "int32", "int64"}),  # no float16 kernel: gblrc's fp16 keeps Range in fp32
}
NO_KERNEL_NEEDED = {"Constant"}  # folded into initializers when the session is created


def _elem_types(model: onnx.ModelProto) -> dict[str, str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out = {t.name: TensorProto.DataType.Name(t.data_type).lower() for t in g.initializer}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        if v.type.tensor_type.elem_type:
            out[v.name] = TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = TensorProto.DataType.Name(a.t.data_type).lower()
    return out


def missing_cuda_kernels(model: onnx.ModelProto) -> list[str]:
    """(op, type) pairs of ``model`` without a documented CUDA kernel; [] when every node has one."""
    opset = {o.domain: o.version for o in model.opset_import}.get("", 0)
    types = _elem_types(model)
    bad = []
    for n in model.graph.node:
        if n.op_type in NO_KERNEL_NEEDED:
            continue
        if n.domain not in ("", "ai.onnx") or n.op_type not in CUDA_KERNELS:
            bad.append(f"{n.domain or 'ai.onnx'}::{n.op_type} (not in the CUDA kernel list)")
            continue
        first, allowed = CUDA_KERNELS[n.op_type]
        if opset < first:
            bad.append(f"{n.op_type} at opset {opset} (CUDA kernels from {first})")
        for t in [x for x in list(n.input) + list(n.output) if x]:
            if t not in types:
                bad.append(f"{n.op_type}: type of {t!r} unknown")
            elif types[t] not in allowed:
                bad.append(f"{n.op_type} on {types[t]}")
    return sorted(set(bad))


def _both(model):
    return {"fp32": model, "fp16": to_fp16(model)}


def _has_fp16_matmul(model) -> bool:
    types = _elem_types(model)
    return any(n.op_type in ("MatMul", "Conv") and types.get(n.input[1]) == H for n in model.graph.node)


@pytest.mark.parametrize("strategy", ["dense", "stacked", "sliced", "segmented"])
def test_linear_lowerings_have_cuda_kernels(strategy):
    w = random_weights(np.random.default_rng(7), 48, 40, 6, 2, max_col_frac=0.5)
    out, _ = run_passes(gblr_model(w, lead=2), [LowerGBLR(force=strategy), PASSES["cleanup"]])
    for name, m in _both(out).items():
        assert missing_cuda_kernels(m) == [], (strategy, name)
    assert _has_fp16_matmul(_both(out)["fp16"])


@pytest.mark.parametrize("strategy", ["dense", "stacked"])
def test_conv_lowerings_have_cuda_kernels(strategy):
    from test_pass_lower_conv import conv_node_model

    from gblrc.ir.conv import ConvGeometry

    geo = ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1))
    w = random_weights(np.random.default_rng(3), 4 * 9, 6, 3, 2)
    out, _ = run_passes(conv_node_model(w, geo), [LowerGBLRConv(force=strategy), PASSES["cleanup"]])
    for name, m in _both(out).items():
        assert missing_cuda_kernels(m) == [], (strategy, name)
    assert _has_fp16_matmul(_both(out)["fp16"])


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = gblrc.compress(
            BertModel(cfg).eval(), 0.5, steps=0, progress=False, init="svd", structure="lowrank", allocate="uniform"
        )
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return model.eval(), OrderedDict(input_ids=ids, attention_mask=mask)


def _mlp():
    from test_precision import block

    return block(5), OrderedDict(input=torch.randn(2, 5, 12))


@pytest.mark.parametrize("make", [_mlp, _tiny_bert], ids=["mlp-layernorm-softmax", "bert"])
def test_lowered_models_have_cuda_kernels_in_fp32_and_fp16(make, tmp_path):
    model, ex = make()
    for precision in ("fp32", "fp16"):
        path = tmp_path / f"{precision}.onnx"
        rep = gblrc.lower(model, ex, path, precision=precision)
        m = onnx.load(path)
        assert missing_cuda_kernels(m) == [], precision
        if precision == "fp16":
            assert rep.fp16 and _has_fp16_matmul(m)


def test_the_check_catches_a_missing_kernel():
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Range", ["a", "b", "c"], ["y"]), onnx.helper.make_node("Celu", ["x"], ["z"])],
        "g",
        [onnx.helper.make_tensor_value_info(n, TensorProto.FLOAT16, []) for n in "abc"]
        + [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [
            onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT16, None),
            onnx.helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
        ],
    )
    bad = missing_cuda_kernels(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    assert "Range on float16" in bad and "ai.onnx::Celu (not in the CUDA kernel list)" in bad


def test_cuda_sessions_take_every_node_when_a_gpu_is_there(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(
            "no CUDA provider in this ONNX Runtime build (no GPU lent): the documented kernel list is checked above"
        )
    model, ex = _tiny_bert()
    for precision in ("fp32", "fp16"):
        path = tmp_path / f"{precision}.onnx"
        gblrc.lower(model, ex, path, precision=precision)
        so = ort.SessionOptions()
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        sess = ort.InferenceSession(str(path), so, providers=["CUDAExecutionProvider"])
        sess.run(None, {k: v.numpy() for k, v in ex.items()})
