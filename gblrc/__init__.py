"""gblrc: learn Generalized Block Low-Rank weights and compile them into fast ONNX graphs."""
from .masks import boxcar_mask, gaudi_mask
from .layer import GBLRLinear
from .structure import Block, GBLRWeights, Span, Structure, StructureError

__version__ = "0.1.0"

__all__ = [
    "gaudi_mask",
    "boxcar_mask",
    "GBLRLinear",
    "Span",
    "Block",
    "Structure",
    "GBLRWeights",
    "StructureError",
]
