"""gblrc: learn Generalized Block Low-Rank weights and compile them into fast ONNX graphs."""
from .masks import boxcar_mask, gaudi_mask
from .layer import GBLRLinear
from .conv import GBLRConv2d
from .structure import Block, GBLRWeights, Span, Structure, StructureError

__version__ = "0.1.0"


def load(path, *, trust_pickle: bool = False):
    """Load a compressed model (``gblrc compress`` output) as an nn.Module in eval mode.

    See :func:`gblrc.modelio.load`; the model carries ``gblrc_example_inputs``.
    """
    from .modelio import load as _load

    return _load(path, trust_pickle=trust_pickle)


def compress(model, budget, **kwargs):
    """Compress ``model``'s linear layers into GBLR layers under ``budget`` (see gblrc.compressor.compress)."""
    from .compressor import compress as _compress

    return _compress(model, budget, **kwargs)


def save(model, path, *, example_inputs=None, meta=None, auto_class=None):
    """Save a model with GBLR layers so that :func:`gblrc.load` rebuilds it (see gblrc.modelio.save)."""
    from .modelio import save as _save

    return _save(model, path, example_inputs=example_inputs, meta=meta, auto_class=auto_class)


def lower(module, example_inputs, path, **kwargs):
    """Export ``module`` to ONNX with its GBLR layers lowered to standard ops, checked against
    PyTorch (see :func:`gblrc.lowering.lower`); returns a LowerReport."""
    from .lowering import lower as _lower

    return _lower(module, example_inputs, path, **kwargs)


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
    "load",
    "compress",
    "save",
    "lower",
]
