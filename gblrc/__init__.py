"""gblrc: learn Generalized Block Low-Rank weights and compile them into fast ONNX graphs.

The package reads as the pipeline (each subpackage's docstring says what it may import):

- ``gblrc.ir``      the structure IR: spans, blocks, factors, conv geometry (numpy, no torch)
- ``gblrc.nn``      PyTorch modules: GBLRLinear, GBLRConv2d, Gaudi masks, fitting a dense weight, replacement
- ``gblrc.io``      models, data and files in and out: loading, save/load of compressed models, the offline zoo
- ``gblrc.learn``   learning ends here: calibration, allocation, init refits, the trainer, ``compress``
- ``gblrc.export``  compiling starts here: ONNX export, the lowering driver, precision, benchmarking
- ``gblrc.passes``  the ONNX graph passes (installed from ``passes/``; onnx + graph-surgeon + ir only)
- ``gblrc.runtime`` ONNX Runtime sessions, parity and timing (onnxruntime + numpy only)
- ``gblrc.cli``     the ``gblrc`` command

The names below are loaded on first use, so ``import gblrc.passes`` or ``import gblrc.ir`` does not
import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "gaudi_mask": "gblrc.nn.masks",
    "boxcar_mask": "gblrc.nn.masks",
    "GBLRLinear": "gblrc.nn.layer",
    "GBLRConv2d": "gblrc.nn.conv",
    "Span": "gblrc.ir.structure",
    "Block": "gblrc.ir.structure",
    "Structure": "gblrc.ir.structure",
    "GBLRWeights": "gblrc.ir.structure",
    "StructureError": "gblrc.ir.structure",
    "CompressConfig": "gblrc.learn.config",
    "TrainingConfig": "gblrc.learn.config",
    "LowerConfig": "gblrc.export.options",
    "Controller": "gblrc.learn.controller",
    "GBLRCallback": "gblrc.learn.hf",
    "DistillationLoss": "gblrc.learn.distill",
    "fully_shard": "gblrc.learn.dist",
}
_SUBPACKAGES = ("ir", "nn", "io", "learn", "export", "passes", "runtime", "cli")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"gblrc.{name}")
    raise AttributeError(f"module 'gblrc' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))


def load(path, *, trust_pickle: bool = False):
    """Load a compressed model (``gblrc compress`` output) as an nn.Module in eval mode.

    See :func:`gblrc.io.modelio.load`; the model carries ``gblrc_example_inputs``.
    """
    from gblrc.io.modelio import load as _load

    return _load(path, trust_pickle=trust_pickle)


def compress(model, config=None, **kwargs):
    """Compress ``model``'s linear layers into GBLR layers under a budget and train them with gblrc's own
    loop; ``config`` is a :class:`CompressConfig` or the budget (see gblrc.learn.compress.compress)."""
    from gblrc.learn.compress import compress as _compress

    return _compress(model, config, **kwargs)


def prepare(model, config=None, **kwargs):
    """Replace and initialise ``model``'s linear layers for training in your own loop; returns
    (model, Controller) (see gblrc.learn.compress.prepare)."""
    from gblrc.learn.compress import prepare as _prepare

    return _prepare(model, config, **kwargs)


def finalize(model):
    """Harden and trim a prepared model to its budget after your loop; returns the report
    (see gblrc.learn.compress.finalize)."""
    from gblrc.learn.compress import finalize as _finalize

    return _finalize(model)


def save(model, path, *, example_inputs=None, meta=None, auto_class=None):
    """Save a model with GBLR layers so that :func:`gblrc.load` rebuilds it (see gblrc.io.modelio.save)."""
    from gblrc.io.modelio import save as _save

    return _save(model, path, example_inputs=example_inputs, meta=meta, auto_class=auto_class)


def lower(module, example_inputs, path, config=None, **kwargs):
    """Export ``module`` to ONNX with its GBLR layers lowered to standard ops, checked against
    PyTorch, as ``config`` (a :class:`LowerConfig`; or its fields as keywords) says (see
    :func:`gblrc.export.lowering.lower`); returns a LowerReport."""
    from gblrc.export.lowering import lower as _lower

    return _lower(module, example_inputs, path, config, **kwargs)


__all__ = [
    "gaudi_mask",
    "boxcar_mask",
    "GBLRLinear",
    "GBLRConv2d",
    "Span",
    "Block",
    "Structure",
    "GBLRWeights",
    "StructureError",
    "CompressConfig",
    "TrainingConfig",
    "LowerConfig",
    "Controller",
    "GBLRCallback",
    "DistillationLoss",
    "load",
    "compress",
    "prepare",
    "finalize",
    "save",
    "lower",
    "fully_shard",
]
