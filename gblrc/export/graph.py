"""ONNX export: every GBLRLinear becomes ONE ``gblrc::GBLRLinear`` node (docs/design.md §2), every
GBLRConv2d ONE ``gblrc::GBLRConv`` node (the same inputs and structure attributes plus the Conv
attributes kernel_shape, strides, pads, dilations; :mod:`gblrc.ir.conv`).

The node's inputs are X, the packed factors U_flat and V_flat (float32 initializers, the
layout of :func:`gblrc.ir.structure.pack_factors`) and the bias when the layer has one; its
attributes are exactly :func:`gblrc.ir.structure.to_onnx_attributes` of the hard structure.

Mechanism: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) with a
``torch.autograd.Function`` whose ``symbolic`` emits the custom node.  For the duration of
the export each GBLRLinear gets temporary buffers holding its packed factors and an
instance-level ``forward`` that calls the function; the forward value computed during
tracing is the layer's own eval-mode output, so the traced shapes are the real ones.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections import OrderedDict
from typing import Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from gblrc.errors import GblrcError
from gblrc.nn.conv import GBLRConv2d
from gblrc.ir.conv import ONNX_CONV_OP, conv_to_onnx_attributes
from gblrc.nn.layer import GBLRLinear
from gblrc.ir.structure import ONNX_DOMAIN, ONNX_OP, StructureError, pack_factors, to_onnx_attributes

__all__ = ["export_onnx", "normalize_inputs", "default_dynamic_axes", "wrap_for_export"]

_U_BUF, _V_BUF = "_gblrc_u_flat", "_gblrc_v_flat"


def _make_op(attrs: dict) -> type:
    """A torch.autograd.Function for one layer: forward = the layer's eval-mode output (from its
    dense weight, passed as the last input and unused by the node); symbolic = one
    gblrc::GBLRLinear node with the structure's attributes."""
    kw = {f"{k}_i": (list(map(int, v)) if isinstance(v, (list, tuple)) else int(v)) for k, v in attrs.items()}
    n_out = int(attrs["out_features"])

    def forward(ctx, x, u, v, b, w):
        return torch.nn.functional.linear(x, w, b)

    def symbolic(g, x, u, v, b, w):
        inputs = (x, u, v) if _is_none(b) else (x, u, v, b)
        y = g.op(f"{ONNX_DOMAIN}::{ONNX_OP}", *inputs, **kw)
        try:  # output type: X's type with the last dimension replaced by out_features
            sizes = x.type().varyingSizes()
            y.setType(x.type().with_sizes(list(sizes[:-1]) + [n_out]) if sizes else x.type())
        except Exception:  # pragma: no cover - type info is a hint only
            pass
        return y

    return type(
        "GBLRLinearOnnxOp",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "symbolic": staticmethod(symbolic)},
    )


def _make_conv_op(attrs: dict, layer: GBLRConv2d) -> type:
    """As :func:`_make_op` for a GBLRConv2d: forward = the convolution with the dense kernel ``w``;
    symbolic = one gblrc::GBLRConv node."""
    kw = {f"{k}_i": (list(map(int, v)) if isinstance(v, (list, tuple)) else int(v)) for k, v in attrs.items()}
    geo, n_out = layer.geometry(), int(attrs["out_features"])

    def forward(ctx, x, u, v, b, w):
        return layer._conv(x, w, b, layer.stride, layer.dilation)

    def symbolic(g, x, u, v, b, w):
        inputs = (x, u, v) if _is_none(b) else (x, u, v, b)
        y = g.op(f"{ONNX_DOMAIN}::{ONNX_CONV_OP}", *inputs, **kw)
        try:  # output type: (N, out, H_out, W_out)
            sizes = list(x.type().varyingSizes())
            h, wd = sizes[-2:]
            hw = list(geo.output_size(h, wd)) if h is not None and wd is not None else [None, None]
            y.setType(x.type().with_sizes(sizes[:-3] + [n_out] + hw))
        except Exception:  # pragma: no cover - type info is a hint only
            pass
        return y

    return type(
        "GBLRConvOnnxOp",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "symbolic": staticmethod(symbolic)},
    )


def _is_none(v) -> bool:
    if v is None:
        return True
    try:  # a TorchScript value standing for None
        return v.node().mustBeNone()
    except AttributeError:
        return False


@contextlib.contextmanager
def _export_mode(root: nn.Module):
    """Eval mode + GBLRLinear layers routed through their export op; everything restored afterwards."""
    layers = [m for m in root.modules() if isinstance(m, GBLRLinear)]
    modes = {m: m.training for m in root.modules()}
    root.eval()
    patched = []
    try:
        for name, layer in ((n, m) for n, m in root.named_modules() if isinstance(m, GBLRLinear)):
            try:
                ir = layer.structure()
            except StructureError as e:
                raise GblrcError(f"GBLR layer {name or '(root)'!r} cannot be exported: {e}") from None
            u, v = pack_factors(ir)
            ref = next(p for p in layer.parameters() if p.is_floating_point())  # (V of a BlockSparseLinear is made)
            dev = ref.device
            patched.append(layer)
            layer.register_buffer(_U_BUF, torch.from_numpy(np.ascontiguousarray(u)).to(dev))
            layer.register_buffer(_V_BUF, torch.from_numpy(np.ascontiguousarray(v)).to(dev))
            w = torch.from_numpy(ir.dense(np.float64)).to(device=dev, dtype=ref.dtype)
            if isinstance(layer, GBLRConv2d):
                op = _make_conv_op(conv_to_onnx_attributes(ir.structure, layer.geometry()), layer)
                w = w.reshape(layer.out_channels, layer.in_channels, *layer.kernel_size)
            else:
                op = _make_op(to_onnx_attributes(ir.structure))

            def fwd(x, _l=layer, _op=op, _w=w):
                return _op.apply(x, getattr(_l, _U_BUF), getattr(_l, _V_BUF), _l.bias, _w.to(x.dtype))

            layer.forward = fwd
        yield layers
    finally:
        for layer in patched:
            layer.__dict__.pop("forward", None)
            for name in (_U_BUF, _V_BUF):
                layer._buffers.pop(name, None)
        for m, t in modes.items():
            m.training = t


def _is_hf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.") and hasattr(module, "config")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    raise GblrcError(f"the model returned {type(out).__name__}, not a tensor; cannot export it to ONNX")


class _Wrapper(nn.Module):
    """Positional inputs in the order of ``names``; returns the first output tensor.

    Hugging Face models are called with keyword arguments (input_ids=..., attention_mask=...),
    other modules positionally.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], keywords: bool):
        super().__init__()
        self.model, self.names, self.keywords = model, list(names), keywords

    def forward(self, *args):
        if self.keywords:
            out = self.model(**dict(zip(self.names, args)))
        else:
            out = self.model(*args)
        return _first_tensor(out)


def normalize_inputs(example_inputs) -> "OrderedDict[str, torch.Tensor]":
    """A tensor, a tuple/list of tensors or a mapping name -> tensor, as an OrderedDict."""
    if isinstance(example_inputs, torch.Tensor):
        return OrderedDict(input=example_inputs)
    if isinstance(example_inputs, Mapping):
        items = list(example_inputs.items())
    elif isinstance(example_inputs, (list, tuple)):
        items = [(f"input_{i}" if len(example_inputs) > 1 else "input", t) for i, t in enumerate(example_inputs)]
    else:
        raise GblrcError(
            f"example inputs must be tensors, a tuple of tensors or a dict, got {type(example_inputs).__name__}"
        )
    if not items:
        raise GblrcError("no example inputs given; the model needs at least one input tensor")
    for k, t in items:
        if not isinstance(t, torch.Tensor):
            raise GblrcError(f"example input {k!r} is a {type(t).__name__}, not a tensor")
    return OrderedDict((str(k), t) for k, t in items)


def _leading_axes(t: torch.Tensor) -> dict[int, str]:
    """Batch/sequence axes: dims 0 and 1 of integer inputs (token ids, masks) of 2-D+;
    for float inputs every dim but the last (the features), at most dims 0 and 1."""
    nd = t.dim()
    if nd == 0:
        return {}
    n = min(2, nd) if not t.is_floating_point() else min(2, nd - 1)
    if nd == 1:
        n = 1
    return {i: ("batch", "sequence")[i] for i in range(n)}


def default_dynamic_axes(inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> dict:
    """Dynamic batch (and sequence) axes for every input and output."""
    axes = {k: _leading_axes(t) for k, t in inputs.items()}
    for k, t in outputs.items():
        axes[k] = {i: ("batch", "sequence")[i] for i in range(min(2, max(t.dim() - 1, 0)))}
    return {k: v for k, v in axes.items() if v}


def wrap_for_export(module: nn.Module, names: Sequence[str]) -> nn.Module:
    return _Wrapper(module, names, keywords=_is_hf(module))


def export_onnx(
    module: nn.Module,
    example_inputs,
    path: str | os.PathLike | None = None,
    *,
    opset: int = 17,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping | None = None,
) -> onnx.ModelProto:
    """Export ``module`` (eval mode) to ONNX with one gblrc::GBLRLinear node per GBLR layer.

    example_inputs: a tensor, a tuple of tensors, or an ordered mapping name -> tensor (the
    names become the graph input names unless ``input_names`` is given).  Default dynamic
    axes: batch and sequence axes of every input/output (see :func:`default_dynamic_axes`);
    pass ``dynamic_axes={}`` for a fully static graph.  Returns the ModelProto; also writes
    it to ``path`` when given (atomically: no partial file on failure).
    """
    inputs = normalize_inputs(example_inputs)
    names = list(input_names) if input_names is not None else list(inputs)
    if len(names) != len(inputs):
        raise GblrcError(f"{len(names)} input names for {len(inputs)} example inputs")
    args = tuple(inputs.values())
    wrapper = wrap_for_export(module, list(inputs))
    with _export_mode(module), torch.no_grad():
        ref = wrapper(*args)
        outs = ref if isinstance(ref, (tuple, list)) else (ref,)
        onames = (
            list(output_names)
            if output_names is not None
            else (["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))])
        )
        if dynamic_axes is None:
            dynamic_axes = default_dynamic_axes(OrderedDict(zip(names, args)), OrderedDict(zip(onames, outs)))
        buf = io.BytesIO()
        from gblrc.export.symbolic import register as register_symbolics

        register_symbolics(opset)  # aten::diff, bool cumsum (HF decoders called without an attention mask)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    wrapper,
                    args,
                    buf,
                    dynamo=False,
                    opset_version=int(opset),
                    input_names=names,
                    output_names=onames,
                    dynamic_axes=dict(dynamic_axes),
                    do_constant_folding=True,
                    custom_opsets=(
                        {ONNX_DOMAIN: 1} if any(isinstance(m, GBLRLinear) for m in module.modules()) else None
                    ),
                    export_params=True,
                )
            except GblrcError:
                raise
            except Exception as e:
                msg = " ".join(str(e).split())[:300]
                raise GblrcError(
                    f"ONNX export failed ({type(e).__name__}: {msg}); check the model and its example inputs"
                ) from None
    model = onnx.load_from_string(buf.getvalue())
    _materialize_factor_inputs(model)
    _check_export(module, model)
    if path is not None:
        from gblrc.io.fileio import atomic_path

        with atomic_path(path) as tmp:
            onnx.save(model, os.fspath(tmp))
    return model


def _materialize_factor_inputs(model: onnx.ModelProto) -> None:
    """The exporter deduplicates equal constants (e.g. the empty factors of two empty layers) into
    ``Identity(initializer)``; give each GBLRLinear factor/bias input its own initializer again."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    users = [n for n in g.node if n.domain == ONNX_DOMAIN and n.op_type in (ONNX_OP, ONNX_CONV_OP)]
    for n in users:
        for name in n.input[1:]:
            src, node = name, producer.get(name)
            while src not in inits and node is not None and node.op_type == "Identity":
                src = node.input[0]
                node = producer.get(src)
            if name not in inits and src in inits:
                t = onnx.TensorProto()
                t.CopyFrom(inits[src])
                t.name = name
                g.initializer.append(t)
                inits[name] = t
    # an Identity whose output is now an initializer is gone (SSA: one producer per name)
    keep = [n for n in g.node if not (n.op_type == "Identity" and n.output[0] in inits)]
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)


def _check_export(module: nn.Module, model: onnx.ModelProto) -> None:
    """One GBLRLinear node per layer, factor inputs are initializers, opset import present."""
    n_layers = sum(isinstance(m, GBLRLinear) for m in module.modules())
    nodes = [n for n in model.graph.node if n.domain == ONNX_DOMAIN and n.op_type in (ONNX_OP, ONNX_CONV_OP)]
    if n_layers and not nodes:
        raise GblrcError(
            f"export produced no GBLRLinear node for {n_layers} GBLR layers; "
            "does the model's forward call its GBLR layers?"
        )
    inits = {i.name for i in model.graph.initializer}
    for n in nodes:
        for name in n.input[1:]:
            if name not in inits:
                raise GblrcError(f"GBLRLinear node {n.name!r}: input {name!r} is not an initializer")
    if nodes and not any(o.domain == ONNX_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(ONNX_DOMAIN, 1))
